"""The run directory: its layout, its lock, every read and write of its files, and its data.

A run of ``delrec train`` (one seed) is a directory::

    config.json            the resolved TrainConfig and the data set's sizes
    metrics.csv            one row per epoch
    checkpoints/last.pt    everything needed to resume (rewritten every epoch)
    checkpoints/best.pt    the network of the best validation epoch
    test_results.json      the best-validation network on the test split, integer delays
    figures/*.png          learning curves, training dynamics, delay histograms, spike raster,
                           predictions
    report/                what `delrec report` writes (by default)
    model.nir              what `delrec export` writes (by default)
    run.lock               while a process trains in it: who (pid, host, start time)

A run of several seeds holds ``seeds.json`` (the seeds and their shared configuration), one
run per seed in ``seed-<s>/`` and, once every seed is complete, ``summary.json``.

Every file is written whole or not at all (:mod:`delrec.files`). One process at a time trains
in a run directory: :meth:`RunDir.lock` holds it, refuses a second process with a message
naming the holder, takes over the lock of a process that died, and clears the temporaries
that interrupted writes left behind.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from delrec import files
from delrec.checkpoint import (
    REREAD,
    CheckpointError,
    network_from,
    read_checkpoint,
    save_checkpoint,
)
from delrec.config import MAX_SEED, TrainConfig, is_seed
from delrec.data import TripleAugmented, load_dataset, make_loader
from delrec.models import MODELS, SpikingNetwork

CONFIG = "config.json"
METRICS = "metrics.csv"
RESULTS = "test_results.json"
SEEDS = "seeds.json"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
FIGURES = "figures"
REPORT = "report"
NIR = "model.nir"
LOCK = "run.lock"
RUN_FILES = (CONFIG, METRICS, RESULTS, SEEDS, SUMMARY)  # written only by the lock's holder


class RunError(Exception):
    """A directory that is not the run a command needs (not a run, not finished, not empty);
    the message says what to do."""


class RunInUse(RunError):
    """Another process holds the run directory's lock."""


class RunDir:
    """The run directory at ``path`` (which need not exist yet)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ layout
    def checkpoint_path(self, which: str) -> Path:
        """``checkpoints/{which}.pt``, ``which`` = ``"best"`` or ``"last"``."""
        return self.path / CHECKPOINTS / f"{which}.pt"

    def figure_path(self, name: str) -> Path:
        return self.path / FIGURES / f"{name}.png"

    def seed(self, seed: int) -> RunDir:
        """The run of ``seed`` in a run of several seeds."""
        return RunDir(self.path / f"seed-{seed}")

    def train_again(self) -> str:
        """How to train this run again from the start, for a message's fix: into a new
        ``--run-dir``, or, for a seed of a run of several seeds, by moving its folder away and
        resuming the parent run (which trains a seed without a folder from the start)."""
        parent = RunDir(self.path.parent)
        if self.path.name.startswith("seed-") and parent.is_multi_seed():
            return (
                f"train that seed again: move {self.path} away and resume "
                f"`delrec train --resume {parent.path}`"
            )
        return "train again into a new --run-dir"

    def is_single(self) -> bool:
        """A run of one seed (its ``config.json`` is written once its data has loaded)."""
        return (self.path / CONFIG).is_file()

    def is_multi_seed(self) -> bool:
        return (self.path / SEEDS).is_file()

    def has_checkpoint(self, which: str) -> bool:
        return self.checkpoint_path(which).is_file()

    def single_runs(self) -> list[RunDir]:
        """This run, or the run of every seed of a run of several seeds."""
        if self.is_multi_seed():
            return [self.seed(seed) for seed in self.read_seeds()["seeds"]]
        if self.is_single():
            return [self]
        raise self._not_a_run("give directories written by `delrec train`")

    def _not_a_run(self, fix: str) -> RunError:
        if not self.path.exists():
            return RunError(f"{self.path} does not exist; {fix}")
        if self.path.is_dir() and self.is_unstarted() and any(self.path.rglob(LOCK)):
            return RunError(
                f"{self.path} holds no run yet (nothing but lock files: its start was stopped "
                "before the data had loaded); start the training again with this --run-dir"
            )
        return RunError(f"{self.path} is not a run directory (no {CONFIG} or {SEEDS}); {fix}")

    def is_unstarted(self) -> bool:
        """Missing, or holding nothing but lock files, here and in seed folders: a start
        killed before it wrote anything (a new run may start here)."""
        if not self.path.is_dir():
            return not self.path.exists()
        return all(
            entry.name == LOCK
            or (entry.name.startswith("seed-") and entry.is_dir() and RunDir(entry).is_unstarted())
            for entry in self.path.iterdir()
        )

    def require_new(self) -> None:
        """Refuse a directory that holds anything but lock files (a new run starts empty)."""
        if self.path.is_dir() and not self.is_unstarted():
            raise RunError(
                f"run directory {self.path} already exists and is not empty; pick "
                f"another --run-dir or continue it with --resume {self.path}"
            )

    # ------------------------------------------------------------------ writing
    def write_config(self, config: TrainConfig, dataset: dict) -> None:
        """``config.json``: the resolved configuration and the data set's sizes."""
        files.write_json(self.path / CONFIG, {"config": config.to_dict(), "dataset": dataset})

    def write_metrics(self, history: list[dict]) -> None:
        """``metrics.csv``: one row per epoch (columns of the first row)."""
        buffer = io.StringIO()
        if history:
            writer = csv.DictWriter(buffer, fieldnames=list(history[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(history)
        files.write_text(self.path / METRICS, buffer.getvalue())

    def write_results(self, results: dict) -> None:
        files.write_json(self.path / RESULTS, results)

    def save_checkpoint(self, which: str, payload: dict) -> None:
        save_checkpoint(payload, self.checkpoint_path(which))

    def write_seeds(self, seeds: list[int], config: TrainConfig) -> None:
        files.write_json(self.path / SEEDS, {"seeds": seeds, "config": config.to_dict()})

    def forget_seeds(self) -> None:
        """Remove ``seeds.json`` of a run of several seeds none of which started."""
        (self.path / SEEDS).unlink(missing_ok=True)

    def write_summary(self, summary: dict) -> None:
        files.write_json(self.path / SUMMARY, summary)

    # ------------------------------------------------------------------ reading
    def config_values(self) -> dict:
        """The configuration in ``config.json`` (or, for several seeds, ``seeds.json``), as
        written: a nested dict (a RunError when it names no task, model or seed)."""
        if self.is_single():
            name, document = CONFIG, self._read_json(CONFIG)
            config = document.get("config") if isinstance(document, dict) else None
        elif self.is_multi_seed():
            name, config = SEEDS, self.read_seeds()["config"]
        else:
            raise self._not_a_run("give the directory `delrec train` wrote")
        problem = _config_problem(config)
        if problem:
            raise RunError(
                f"{self.path / name} does not hold a run configuration ({problem}); it was "
                f"edited or damaged: restore it, or {self.train_again()}"
            )
        return config

    def read_config(self, **changes) -> TrainConfig:
        """The run's configuration, validated, with ``changes`` (those not ``None``) applied:
        only settings that may change on resuming (device, data root …)."""
        return config_with(self.config_values(), **changes)

    def read_dataset(self) -> dict:
        """What ``config.json`` records of a run's data set (sizes, item counts; ``{}``
        where it records nothing)."""
        document = self._read_json(CONFIG)
        dataset = document.get("dataset") if isinstance(document, dict) else None
        return dataset if isinstance(dataset, dict) else {}

    def read_results(self) -> dict:
        """``test_results.json`` of a finished run."""
        if not (self.path / RESULTS).is_file():
            parent = RunDir(self.path.parent)  # a seed's: resuming it also writes the summary
            seed = parent.is_multi_seed() and self.path.name.startswith("seed-")
            whole = parent if seed else self
            holder = files.live_holder(self.path / LOCK) or files.live_holder(whole.path / LOCK)
            if holder is not None:
                raise RunError(
                    f"{self.path} has no {RESULTS}: it is still training ({holder}); use it "
                    "once that process has ended"
                )
            raise RunError(
                f"{self.path} has no {RESULTS}: the run is not finished; complete it with "
                f"`delrec train --resume {whole.path}`"
            )
        results = self._read_json(RESULTS)
        metric = (
            next((m for m in ("accuracy", "nmse") if m in results), None)
            if isinstance(results, dict)
            else None
        )
        number = (
            metric is not None
            and type(results[metric]) in (int, float)
            and math.isfinite(results[metric])
        )
        if not number or type(results.get("best_epoch", 0)) is not int:
            raise RunError(
                f"{self.path / RESULTS} does not hold a test metric (accuracy or nmse, a finite "
                "number) and its best epoch; it was edited or damaged: restore it, or "
                f"{self.train_again()}"
            )
        return results

    def read_metrics(self) -> list[dict]:
        """The rows of ``metrics.csv`` (values as written, strings); ``[]`` without the file.
        A RunError where a row has more or fewer values than the header names, or the epochs
        are not 1, 2, 3 … in order (an edited file would plot shifted or repeated values)."""
        path = self.path / METRICS
        if not path.is_file():
            return []
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise RunError(
                f"{path} cannot be read ({error}); it was edited or damaged: restore it, or "
                "leave the run out"
            ) from None
        for line, row in enumerate(rows, start=2):
            problem = None
            if None in row or None in row.values():
                problem = "its number of values differs from the header's columns"
            elif self.metrics_number(line, row, "epoch") != line - 1:
                problem = f"epoch {row['epoch']} where epoch {line - 1} belongs"
            if problem:
                raise RunError(
                    f"{path} line {line}: {problem}; the file was edited or damaged: restore "
                    "it, or leave the run out"
                )
        return rows

    def metrics_number(self, line: int, row: dict, column: str) -> float:
        """``row[column]`` of ``metrics.csv`` (``line``: its line in the file) as a finite
        number, a whole one for the epoch (a RunError naming the line and column otherwise)."""
        text = row.get(column)
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or (column == "epoch" and value != int(value)):
            kind = "a whole number" if column == "epoch" else "a finite number"
            problem = "missing" if text is None else f"{text!r} is not {kind}"
            raise RunError(
                f"{self.path / METRICS} line {line}, column {column}: {problem}; the file was "
                "edited or cut short: restore it, or leave the run out"
            )
        return value

    def read_seeds(self) -> dict:
        """``seeds.json``: ``{"seeds": [...], "config": {...}}`` (a RunError when it holds
        anything else)."""
        document = self._read_json(SEEDS)
        seeds = document.get("seeds") if isinstance(document, dict) else None
        fine = (
            isinstance(seeds, list)
            and seeds
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
            and isinstance(document.get("config"), dict)
        )
        if not fine:
            raise RunError(
                f"{self.path / SEEDS} does not hold a list of seeds and a configuration; it was "
                "edited or damaged: restore it, or train again into a new --run-dir"
            )
        return document

    def read_summary(self) -> dict | None:
        """``summary.json`` of a run of several seeds, ``None`` before it is written."""
        return self._read_json(SUMMARY) if (self.path / SUMMARY).is_file() else None

    def _read_json(self, name: str) -> dict:
        path = self.path / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:  # RecursionError: nested deeply
            raise RunError(
                f"{path} cannot be read ({error}); it is not a delrec run file"
            ) from None

    # ------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self, log: Callable[[str], object] | None = None) -> Iterator[None]:
        """Hold this directory for one process while the block runs (creating it if needed).

        A second process is refused with :class:`RunInUse` naming the holder (pid, host,
        start time). The lock of a process that died is taken over, with a notice to ``log``
        (default: stderr). Under the lock, the temporaries of interrupted writes of the run's
        files are removed. On leaving, the lock is released and a directory this call
        created is removed again if nothing was written into it.
        """
        log = log or (lambda message: print(message, file=sys.stderr))
        blocking = files.file_in_the_way(self.path)
        if blocking is not None:
            raise RunError(
                f"cannot use {self.path} as a run directory: {blocking} is a file, not a "
                "folder; give a directory"
            )
        if (self.path / LOCK).is_dir():
            raise RunError(
                f"{self.path / LOCK} is a folder, where delrec keeps the run's lock file; "
                "remove it (delrec never makes one)"
            )
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            descriptor = _acquire(self.path / LOCK, log)
        except OSError as error:
            raise type(error)(
                error.errno,
                f"cannot create or lock the run directory {self.path}: "
                f"{error.strerror or error}; give a --run-dir (--out) where this user may write",
            ) from None
        try:
            removed = self._remove_temporaries()
            if removed:
                log(
                    f"note: removed {len(removed)} temporary file(s) of interrupted writes "
                    f"in {self.path}"
                )
            yield
        finally:
            files.release_lock(descriptor, self.path / LOCK)
            if created:
                with contextlib.suppress(OSError):  # not empty: keep it
                    self.path.rmdir()

    def _remove_temporaries(self) -> list[Path]:
        """Temporaries of the files only the lock's holder writes."""
        return [
            *files.remove_temporaries(self.path, RUN_FILES),
            *files.remove_temporaries(self.path / CHECKPOINTS),
            *files.remove_temporaries(self.path / FIGURES),
        ]


def _config_problem(config) -> str | None:
    """What a run's configuration lacks that readers of the run need, or ``None``."""
    if not isinstance(config, dict):
        return "no 'config' object"
    model, seed = config.get("model"), config.get("seed")
    if not isinstance(config.get("task"), str):
        return f"task {config.get('task')!r} is not a data set's name"
    if model not in MODELS:
        return f"model {model!r} is not one of {', '.join(MODELS)}"
    if not is_seed(seed):
        return f"seed {seed!r} is not a whole number in 0…{MAX_SEED}"
    return None


def owning_run(path: str | os.PathLike) -> Path | None:
    """The run directory (of one seed or several) whose own file ``path`` is or would be (one
    of RUN_FILES in it, or a file in its ``checkpoints/``), symlinks followed; else ``None``."""
    path = Path(path).resolve()
    for run, owned in (
        (path.parent, path.name in RUN_FILES),
        (path.parent.parent, path.parent.name == CHECKPOINTS),
    ):
        if owned and (RunDir(run).is_single() or RunDir(run).is_multi_seed()):
            return run
    return None


def run_files(path: str | os.PathLike) -> set[Path]:
    """The files an output must not replace, resolved (symlinks followed): every file under a
    run directory (or folder of seeds); for a checkpoint file, itself and, when it lies in a
    run's ``checkpoints/``, every file of that run."""
    root = Path(path).resolve()
    found = set()
    if root.is_file():
        found.add(root)
        run = root.parent.parent
        root = run if root.parent.name == CHECKPOINTS and RunDir(run).is_single() else None
    if root is not None and root.is_dir():
        found |= {file.resolve() for file in root.rglob("*") if file.is_file()}
    return found


# --------------------------------------------------------------------------- lock files
def _acquire(path: Path, log: Callable[[str], object]) -> int:
    """Lock the run's lock file ``path`` (:func:`delrec.files.acquire_lock`) or raise
    :class:`RunInUse` naming the holder; note a holder that died."""

    def refuse(holder: str) -> None:
        raise RunInUse(
            f"run directory {path.parent} is in use by {holder}; wait until it ends or "
            f"stop it, or give another run directory"
        ) from None

    descriptor, previous = files.acquire_lock(path, refuse)
    if previous.strip():
        log(
            f"note: {path.parent} was locked by {files.describe_holder(previous)}, which "
            "is no longer running; taking the lock over"
        )
    return descriptor


# --------------------------------------------------------------------------- checkpoints
def checkpoint_file(path: str | os.PathLike, which: str = "best") -> Path:
    """A checkpoint file from a file path or a run directory (its ``which`` checkpoint)."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        path = run.checkpoint_path(which)
        if run.is_single() and not path.is_file():
            other = "last" if which == "best" else "best"
            kept = f" ({other}.pt is there)" if run.has_checkpoint(other) else ""
            raise CheckpointError(
                f"the run {run.path} has no {which} checkpoint ({path} is missing{kept}): it "
                "was removed, or the run stopped before its first epoch ended; restore the "
                "file, or train the run again"
            )
    if not path.is_file():
        seeds = sorted(p.name for p in path.parent.parent.glob("seed-*") if p.is_dir())
        hint = (
            f"; {path.parent.parent} holds one run per seed: give one of them, e.g. "
            f"{path.parent.parent / seeds[0]}"
            if seeds and path.parent.name == "checkpoints"
            else ""
        )
        raise CheckpointError(
            f"no checkpoint at {path}: give a run directory written by "
            f"`delrec train` or a .pt checkpoint file{hint}"
        )
    return path


def load_checkpoint(path: str | os.PathLike, which: str = "best", fix: str = REREAD) -> dict:
    """Read a checkpoint (file or run directory) and check its format; ``fix`` ends the
    message of a damaged file."""
    return read_checkpoint(checkpoint_file(path, which), fix)


def load_trained(path: str | os.PathLike, which: str = "best") -> tuple[dict, SpikingNetwork]:
    """A checkpoint file's or run directory's checkpoint, read once: its payload and its
    trained network, in eval mode (a CheckpointError naming the file when it does not rebuild
    one)."""
    file = checkpoint_file(path, which)
    payload = read_checkpoint(file)
    return payload, network_from(payload, file)


def load_network(path: str | os.PathLike, which: str = "best") -> SpikingNetwork:
    """The trained network of a checkpoint file or run directory, in eval mode."""
    return load_trained(path, which)[1]


def checkpoint_config(payload: dict, path: str | os.PathLike, **changes) -> TrainConfig:
    """The training configuration a checkpoint was written with, ``changes`` applied."""
    if "train_config" not in payload:
        raise CheckpointError(
            f"{path} holds a network but no training configuration; "
            "evaluate checkpoints written by `delrec train`"
        )
    return config_with(payload["train_config"], **changes)


def config_with(values: dict, **changes) -> TrainConfig:
    """``TrainConfig.from_dict(values)`` with the settings of ``changes`` that are not None."""
    return TrainConfig.from_dict({**values, **{k: v for k, v in changes.items() if v is not None}})


def default_report_dir(path: str | os.PathLike) -> Path:
    """Where `delrec report` writes by default: ``RUN_DIR/report``, or beside a checkpoint."""
    path = Path(path)
    return (path if path.is_dir() else path.parent) / REPORT


def default_nir_path(path: str | os.PathLike) -> Path:
    """Where `delrec export` writes by default: ``RUN_DIR/model.nir``; for a checkpoint file,
    its name with ``.nir`` beside it, or beside the run's files for one in a run's
    ``checkpoints/`` (which holds checkpoints only: ``RUN_DIR/best.nir``)."""
    path = Path(path)
    if path.is_dir():
        return path / NIR
    if path.parent.name == CHECKPOINTS and RunDir(path.parent.parent).is_single():
        return path.parent.parent / path.with_suffix(".nir").name
    return path.with_suffix(".nir")


# --------------------------------------------------------------------------- data
class Standardized(torch.utils.data.Dataset):
    """A regression data set on the scale ``(value - mean) / std``, for frames and targets."""

    def __init__(self, base, mean: float, std: float):
        self.base, self.mean, self.std = base, mean, std
        self.info, self.split = base.info, base.split

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        frames, target = self.base[index]
        return (frames - self.mean) / self.std, (target - self.mean) / self.std


def target_moments(dataset) -> Tensor:
    """``[mean, std]`` (float64) of a regression data set's targets."""
    targets = torch.stack([dataset[i][1] for i in range(len(dataset))]).double()
    return torch.stack([targets.mean(), targets.std(correction=0)])


@dataclasses.dataclass
class Splits:
    """The data of a run: datasets by split, the seeded training loader (when "train" is
    loaded), the data set info, and what must be stored to rebuild the same inputs:
    ``permutation`` (PS-MNIST pixel order) and ``standardization`` (``[mean, std]``)."""

    datasets: dict
    train_loader: torch.utils.data.DataLoader | None
    info: object
    permutation: Tensor | None = None
    standardization: Tensor | None = None
    augmented: TripleAugmented | None = None


def load_splits(
    config: TrainConfig, splits=("train", "valid", "test"), stored: dict | None = None
) -> Splits:
    """Load the data sets of ``config`` and build the seeded training loader. ``stored``: a
    checkpoint's ``data_permutation`` and ``standardization``, to reproduce its inputs."""
    stored = stored or {}
    settings = dict(config.data)
    if stored.get("data_permutation") is not None:
        settings["permutation"] = stored["data_permutation"]

    def load(split):
        return load_dataset(config.task, split=split, root=config.data_root, **settings)

    datasets = {split: load(split) for split in splits}
    first = datasets[splits[0]]
    standardization = None
    if config.standardize:
        standardization = stored.get("standardization")
        if standardization is None:
            train = datasets["train"] if "train" in datasets else load("train")
            standardization = target_moments(train)
        mean, std = (float(v) for v in standardization)
        usable = math.isfinite(mean) and math.isfinite(std) and std > 0
        if not usable and stored.get("standardization") is not None:
            raise CheckpointError(
                f"the stored target standardisation (mean {mean}, std {std}) cannot be used: "
                "the checkpoint was edited or damaged; use the run's other checkpoint or retrain"
            )
        datasets = {split: Standardized(ds, mean, std) for split, ds in datasets.items()}
    augmented, train_loader = None, None
    if "train" in datasets:
        train = datasets["train"]
        if config.augment:
            train = augmented = TripleAugmented(train, seed=config.seed)
        if config.max_train_samples is not None and config.max_train_samples < len(train):
            generator = torch.Generator().manual_seed(config.seed)
            chosen = torch.randperm(len(train), generator=generator)[: config.max_train_samples]
            train = torch.utils.data.Subset(train, chosen.sort().values.tolist())
        datasets["train"] = train
        train_loader = make_loader(
            train, config.batch_size, shuffle=True, seed=config.seed, num_workers=config.num_workers
        )
    return Splits(
        datasets,
        train_loader,
        first.info,
        getattr(first, "permutation", None),
        standardization,
        augmented,
    )


def eval_loader(dataset, batch_size: int, num_workers: int = 0):
    """A loader in item order that never draws from the global RNG."""
    return make_loader(dataset, batch_size, shuffle=False, seed=0, num_workers=num_workers)
