"""`delrec sweep …`: the experiment drivers of the paper's figures, over `delrec train`.

* ``params``: models of the ablation family at several hidden sizes (every hidden layer that
  size) → test accuracy against trainable parameters;
* ``rate``: values λ of the firing-rate penalty → test accuracy against mean firing rate.

Each point of a sweep is one ``delrec train --seeds …`` run in ``OUT/<point>``; finished points
are skipped and interrupted ones resumed, so running a sweep again continues it. The results
go through ``delrec compare`` into ``OUT/table.md``, ``OUT/table.csv`` and ``OUT/figure.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from delrec.analysis import compare
from delrec.checkpoint import CheckpointError
from delrec.models import MODELS, VARIANTS
from delrec.runs import RunError

ABLATION_MODELS = tuple(model for model, variant in VARIANTS.items() if variant.ablation)


class SweepError(Exception):
    """A sweep that cannot go on; the message names the point and what to do."""


@dataclass(frozen=True)
class SweepPoint:
    """One training run of a sweep: its directory name, model and ``--set`` overrides."""

    name: str
    model: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainOptions:
    """What every point of a sweep shares (passed to ``delrec train``)."""

    task: str = "digits-8x8"
    seeds: str = "0"
    epochs: int | None = None
    overrides: tuple[str, ...] = ()
    device: str | None = None
    data_root: str | None = None
    progress: bool = False


def parameter_points(options: TrainOptions, models, sizes) -> list[SweepPoint]:
    """``model × size`` points; the number of hidden layers is the preset's (after overrides)."""
    from delrec.config import ConfigError, resolve

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
    """One point per firing-rate penalty λ."""
    return [
        SweepPoint(f"{model}-rate-{penalty:g}", model, (f"rate_penalty={penalty!r}",))
        for penalty in penalties
    ]


def train_point(point: SweepPoint, out: Path, options: TrainOptions) -> Path:
    """Train (or resume, or skip if finished) one point with ``delrec train``; its run dir."""
    from delrec.cli import main

    run_dir = out / point.name
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("status") == "complete":
        return run_dir
    shared = [
        *(["--device", options.device] if options.device else []),
        *(["--data-root", options.data_root] if options.data_root else []),
        *([] if options.progress else ["--no-progress"]),
    ]
    if run_dir.exists():
        argv = ["train", "--resume", str(run_dir), *shared]
    else:
        argv = [
            "train",
            "--task",
            options.task,
            "--model",
            point.model,
            "--seeds",
            options.seeds,
            "--run-dir",
            str(run_dir),
            *(["--epochs", str(options.epochs)] if options.epochs else []),
            "--set",
            *options.overrides,
            *point.overrides,
            *shared,
        ]
    print(f"sweep point {point.name}: delrec {' '.join(argv)}", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # train's JSON summary is progress here
        status = main(argv)
    if status != 0:
        raise SweepError(
            f"training point {point.name} failed (exit status {status}); see the "
            f"message above, fix it and run the sweep again to continue"
        )
    return run_dir


def run_sweep(
    points: list[SweepPoint], out: Path, options: TrainOptions, x: str, real_delays: bool = True
) -> list[compare.Row]:
    """Train every point, then write ``table.md``, ``table.csv`` and ``figure.png`` in ``out``."""
    run_dirs = [train_point(point, out, options) for point in points]
    rows = compare.compare(run_dirs, real_delays)
    compare.write_outputs(rows, out / "table.md", out / "table.csv", out / "figure.png", x)
    return rows


# --------------------------------------------------------------------------- CLI
def _list(kind):
    def parse(text: str):
        try:
            return tuple(kind(item) for item in text.split(",") if item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list, got {text!r}"
            ) from None

    return parse


def _add_common(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument(
        "--task",
        default="digits-8x8",
        help="preset / data set (default digits-8x8, embedded, no download)",
    )
    parser.add_argument("--seeds", default="0", metavar="SPEC", help="seeds, e.g. 0-4 (default 0)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the preset's)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="settings for every run, as in `delrec train`",
    )
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--data-root", help="folder of the data set's files")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(default_out),
        help="sweep folder: one run directory per point, table, figure (default %(default)s)",
    )
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    parser.add_argument(
        "--rounded-only",
        action="store_true",
        help="skip re-evaluating learned delays with real values",
    )


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="accuracy vs parameters or vs firing rate: many `delrec train` runs",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = parser.add_subparsers(dest="sweep_command", metavar="SWEEP")
    kinds.required = True
    params = kinds.add_parser("params", help="ablation-family models at several hidden sizes")
    params.add_argument(
        "--models",
        type=_list(str),
        default=ABLATION_MODELS,
        help="comma-separated models (default snn,rsnn,fixed,delrec)",
    )
    params.add_argument(
        "--sizes",
        type=_list(int),
        default=(16, 32, 64),
        help="comma-separated hidden sizes (default 16,32,64)",
    )
    _add_common(params, "runs/sweep-params")
    params.set_defaults(run=run)
    rate = kinds.add_parser("rate", help="firing-rate penalty values λ for one model")
    rate.add_argument("--model", default="delrec", help="model (default delrec)")
    rate.add_argument(
        "--penalties",
        type=_list(float),
        default=(0.0, 1.0, 10.0),
        help="comma-separated λ values (default 0,1,10)",
    )
    _add_common(rate, "runs/sweep-rate")
    rate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = TrainOptions(
        args.task,
        args.seeds,
        args.epochs,
        tuple(args.overrides),
        args.device,
        args.data_root,
        args.progress,
    )
    try:
        if args.sweep_command == "params":
            unknown = sorted(set(args.models) - set(MODELS))
            if unknown or not args.models or not args.sizes or min(args.sizes) < 1:
                known = ", ".join(MODELS)
                raise SweepError(
                    f"--models must name models from {known} "
                    f"and --sizes positive sizes (got {list(args.models)}, "
                    f"{list(args.sizes)})"
                )
            points, x = parameter_points(options, args.models, args.sizes), "parameters"
        else:
            if not args.penalties or min(args.penalties) < 0:
                raise SweepError(f"--penalties must be values >= 0, got {list(args.penalties)}")
            points, x = rate_points(args.model, args.penalties), "firing-rate"
        rows = run_sweep(points, args.out, options, x, real_delays=not args.rounded_only)
    except (SweepError, compare.CompareError, CheckpointError, RunError) as error:
        print(f"delrec sweep: error: {error}", file=sys.stderr)
        return 2
    print(compare.format_markdown(rows))
    print(
        f"table: {args.out / 'table.md'}, {args.out / 'table.csv'}; figure: "
        f"{args.out / 'figure.png'}",
        file=sys.stderr,
    )
    return 0
