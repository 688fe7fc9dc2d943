"""`delrec sweep …`: the experiment drivers of the paper's figures, over training jobs.

* ``models``: models of the ablation family with the task's own network (the layout of the
  paper's Table S5) → test metric against trainable parameters;
* ``params``: models of the ablation family at several hidden sizes (every hidden layer that
  size) → test accuracy against trainable parameters;
* ``rate``: values λ of the firing-rate penalty → test accuracy against mean firing rate.

Each point of a sweep is one run of several seeds (as ``delrec train --seeds …``) in
``OUT/<point>``; finished points are skipped and interrupted ones resumed, so running a sweep
again continues it (a point trained with other settings, seeds, epochs or ``--set``, is
refused: sweep into another ``OUT``). The results go through ``delrec compare`` into
``OUT/table.md``, ``OUT/table.csv`` and ``OUT/figure.png``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from delrec.analysis import compare
from delrec.config import (
    ConfigError,
    TrainConfig,
    comparable,
    given_settings,
    ignored_notes,
    resolve,
    resolve_device,
)
from delrec.data import dataset_info
from delrec.runs import SEEDS, RunDir
from delrec.training import jobs
from delrec.training.loop import TrainingError, check_memory


class SweepError(Exception):
    """A sweep that cannot be set up or go on; the message names the point and what to do."""


@dataclass(frozen=True)
class SweepPoint:
    """One training run of a sweep: its directory name, model and ``--set`` overrides."""

    name: str
    model: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainOptions:
    """What every point of a sweep shares (as the options of ``delrec train``)."""

    task: str = "digits-8x8"
    seeds: tuple[int, ...] = (0,)
    epochs: int | None = None
    overrides: tuple[str, ...] = ()
    device: str | None = None
    data_root: str | None = None
    progress: bool = False

    @property
    def place(self) -> dict:
        """Where the runs train and read their data: ``device`` and ``data_root``."""
        return {"device": self.device, "data_root": self.data_root}


def model_points(models) -> list[SweepPoint]:
    """One point per model, with the task's network as its recipe builds it."""
    return [SweepPoint(model, model) for model in models]


def parameter_points(options: TrainOptions, models, sizes) -> list[SweepPoint]:
    """``model × size`` points; the number of hidden layers is the preset's (after overrides)."""
    points = []
    for model in models:
        try:
            layers = len(
                resolve(options.task, model, overrides=list(options.overrides)).network[
                    "hidden_sizes"
                ]
            )
        except ConfigError as error:
            raise SweepError(f"model {model}: {error}") from None
        for size in sizes:
            hidden = json.dumps([size] * layers, separators=(",", ":"))
            points.append(
                SweepPoint(f"{model}-h{size}", model, (f"network.hidden_sizes={hidden}",))
            )
    return points


def rate_points(model: str, penalties) -> list[SweepPoint]:
    """One point per firing-rate penalty λ, named by its short form (``1e-05``) unless that
    stands for another number too (``0.1000001``: then its exact form)."""
    return [
        SweepPoint(f"{model}-rate-{_short(penalty)}", model, (f"rate_penalty={penalty!r}",))
        for penalty in penalties
    ]


def _short(value: float) -> str:
    return f"{value:g}" if float(f"{value:g}") == value else repr(value)


def point_config(point: SweepPoint, out: Path, options: TrainOptions) -> TrainConfig:
    """The configuration of one point, checked against the run already in its directory and
    the memory of its device (a SweepError naming the point when it cannot be trained)."""
    try:
        config = resolve(
            options.task,
            point.model,
            overrides=[*options.overrides, *point.overrides],
            flags={"epochs": options.epochs, **options.place},
        )
        info = dataset_info(config.task, **config.data)
        network = config.network_config(info.input_size, info.output_size)
        check_memory(network, resolve_device(config.device))
    except (ConfigError, TrainingError) as error:
        raise SweepError(
            f"sweep point {point.name}: {error}; fix the sweep's settings (every point is "
            "checked before any is trained)"
        ) from None
    run = RunDir(out / point.name)
    if run.is_multi_seed():
        _check_same_point(point, run, config, options.seeds)
    elif not run.is_unstarted():
        what = "a run of one seed" if run.is_single() else "files of no sweep point"
        raise SweepError(
            f"sweep point {point.name}: {run.path} holds {what} (a point is a run of "
            f"`delrec train --seeds`, with {SEEDS}); sweep into another --out, or move "
            f"{run.path} away"
        )
    return config


def train_point(point: SweepPoint, config: TrainConfig, out: Path, options: TrainOptions) -> Path:
    """Train (or resume, or skip if finished) one point with its ``config``; its run
    directory."""
    run = RunDir(out / point.name)
    summary = run.read_summary()
    if summary is not None and summary.get("status") == "complete":
        return run.path
    try:
        if run.is_multi_seed():
            print(f"sweep point {point.name}: resuming {run.path}", file=sys.stderr)
            jobs.resume(run.path, **options.place, progress=options.progress)
        else:
            settings = " ".join([*options.overrides, *point.overrides])
            print(
                f"sweep point {point.name}: training {options.task} · {point.model} · seeds "
                f"{','.join(map(str, options.seeds))}{' · ' + settings if settings else ''} "
                f"in {run.path}",
                file=sys.stderr,
            )
            jobs.train_seeds(config, list(options.seeds), run.path, progress=options.progress)
    except Exception:
        print(
            f"sweep point {point.name} failed; fix the error below and run the sweep again "
            "to continue",
            file=sys.stderr,
        )
        raise
    return run.path


def _check_same_point(point: SweepPoint, run: RunDir, config, seeds) -> None:
    """A SweepError unless the run already in ``run`` was started with ``config`` and
    ``seeds`` (the settings that may change on resuming aside): a sweep never answers with runs
    of other settings."""
    stored = run.read_seeds()
    theirs, ours = comparable(stored["config"]), comparable(config.to_dict())
    differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    if stored["seeds"] != list(seeds):
        differ.insert(0, f"seeds {stored['seeds']}")
    if differ:
        raise SweepError(
            f"sweep point {point.name} in {run.path} was trained with other settings than this "
            f"sweep asks for ({', '.join(map(str, differ))} differ); sweep into another --out, "
            f"or delete {run.path} to train it again"
        )


def run_sweep(
    points: list[SweepPoint], out: Path, options: TrainOptions, x: str, real_delays: bool = True
) -> list[compare.Row]:
    """Check every point, then train them, then write ``table.md``, ``table.csv`` and
    ``figure.png`` in ``out``."""
    configs = [point_config(point, out, options) for point in points]
    given = given_settings(overrides=list(options.overrides))  # the user's --set
    for point, config in zip(points, configs):
        for note in ignored_notes(config, given):
            print(f"{note} (sweep point {point.name})", file=sys.stderr)
    run_dirs = [train_point(*job, out, options) for job in zip(points, configs)]
    rows = compare.compare(run_dirs, real_delays)
    compare.write_outputs(rows, out / "table.md", out / "table.csv", out / "figure.png", x)
    return rows
