"""`delrec sweep models|params|rate`: the experiment drivers of the paper's figures
(:mod:`delrec.analysis.sweeps`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from delrec.analysis import compare, sweeps
from delrec.commands import (
    EXIT_CODES_HELP,
    UsageError,
    add_set_option,
    comma_list,
    described,
    parse_seeds,
)
from delrec.config import parse_override
from delrec.models import MODELS, VARIANTS
from delrec.runs import RunDir

ABLATION_MODELS = tuple(model for model, variant in VARIANTS.items() if variant.ablation)


def _add_common(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument(
        "--task",
        default="digits-8x8",
        help="preset / data set (default digits-8x8, embedded, no download)",
    )
    parser.add_argument("--seeds", default="0", metavar="SPEC", help="seeds, e.g. 0-4 (default 0)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the preset's)")
    add_set_option(parser, "settings for every run, as in `delrec train`")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--data-root", help="folder of the data set's files")
    parser.add_argument(
        "--out",
        type=_out_folder,
        default=Path(default_out),
        help="sweep folder: one run directory per point, table, figure (default %(default)s)",
    )
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    parser.add_argument(
        "--rounded-only",
        action="store_true",
        help="skip re-evaluating learned delays with real values",
    )


def _out_folder(text: str) -> Path:
    """``--out``: a folder; an empty value (an unset shell variable) is refused, not read as
    the current folder, where a sweep would scatter its runs."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give the sweep's folder")
    return Path(text)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="accuracy vs parameters or vs firing rate: many `delrec train` runs",
        description=described(sweeps),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXIT_CODES_HELP,
    )
    kinds = parser.add_subparsers(dest="sweep_command", metavar="SWEEP")
    kinds.required = True
    models = kinds.add_parser(
        "models",
        help="models of the ablation family on the task's network (Table S5 layout)",
        description="Train each model of --models on the task's preset network, every seed, "
        "and write the table of test metrics in the layout of the paper's Table S5.",
        epilog=EXIT_CODES_HELP,
    )
    models.add_argument(
        "--models",
        type=comma_list(str),
        default=MODELS,
        help=f"comma-separated models (default all: {','.join(MODELS)})",
    )
    _add_common(models, "runs/sweep-models")
    models.set_defaults(run=run)
    params = kinds.add_parser(
        "params",
        help="ablation-family models at several hidden sizes",
        description="Train each model of --models at each hidden size of --sizes, every seed: "
        "test metric against the number of parameters.",
        epilog=EXIT_CODES_HELP,
    )
    params.add_argument(
        "--models",
        type=comma_list(str),
        default=ABLATION_MODELS,
        help=f"comma-separated models (default {','.join(ABLATION_MODELS)})",
    )
    params.add_argument(
        "--sizes",
        type=comma_list(int),
        default=(16, 32, 64),
        help="comma-separated hidden sizes (default 16,32,64)",
    )
    _add_common(params, "runs/sweep-params")
    params.set_defaults(run=run)
    rate = kinds.add_parser(
        "rate",
        help="firing-rate penalty values λ for one model",
        description="Train one model at each firing-rate penalty λ of --penalties, every seed: "
        "test metric against the firing rate it reached.",
        epilog=EXIT_CODES_HELP,
    )
    rate.add_argument("--model", choices=MODELS, default="delrec", help="model (default delrec)")
    rate.add_argument(
        "--penalties",
        type=comma_list(float),
        default=(0.0, 1.0, 10.0),
        help="comma-separated λ values (default 0,1,10)",
    )
    _add_common(rate, "runs/sweep-rate")
    rate.set_defaults(run=run)


def _check_overrides(args: argparse.Namespace) -> None:
    """A UsageError for a ``--set`` of a setting the sweep gives every point itself, which
    would be overridden without a word."""
    owned = {"task": "--task", "seed": "--seeds"}
    owned["model"] = "--model" if args.sweep_command == "rate" else "--models"
    if args.sweep_command == "params":
        owned["network.hidden_sizes"] = "--sizes"
    if args.sweep_command == "rate":
        owned["rate_penalty"] = "--penalties"
    for item in args.overrides:
        key = parse_override(item)[0]
        if key in owned:
            raise UsageError(
                f"--set {item}: {key} is the sweep's own setting for each point; give it "
                f"with {owned[key]}"
            )


def run(args: argparse.Namespace) -> int:
    _check_overrides(args)
    if RunDir(args.out).is_single() or RunDir(args.out).is_multi_seed():
        raise UsageError(
            f"--out {args.out} is the folder of a training run; its points and tables would "
            "land among the run's files: give the sweep a folder of its own"
        )
    options = sweeps.TrainOptions(
        args.task,
        tuple(parse_seeds(args.seeds)),
        args.epochs,
        tuple(args.overrides),
        args.device,
        args.data_root,
        args.progress,
    )
    if args.sweep_command in ("models", "params"):
        unknown = sorted(set(args.models) - set(MODELS))
        if unknown or not args.models or len(set(args.models)) < len(args.models):
            raise UsageError(
                f"--models must name distinct models from {', '.join(MODELS)} (got "
                f"{list(args.models)})"
            )
    if args.sweep_command == "models":
        points, x = sweeps.model_points(args.models), "parameters"
    elif args.sweep_command == "params":
        sizes = list(args.sizes)
        if not sizes or len(set(sizes)) < len(sizes) or min(sizes) < 1:
            raise UsageError(f"--sizes must be distinct hidden sizes >= 1 (neurons), got {sizes}")
        points, x = sweeps.parameter_points(options, args.models, args.sizes), "parameters"
    else:
        penalties = list(args.penalties)
        if not penalties or min(penalties) < 0 or len(set(penalties)) < len(penalties):
            raise UsageError(f"--penalties must be distinct values >= 0, got {penalties}")
        points, x = sweeps.rate_points(args.model, args.penalties), "firing-rate"
    rows = sweeps.run_sweep(points, args.out, options, x, real_delays=not args.rounded_only)
    print(compare.format_markdown(rows))
    print(
        f"table: {args.out / 'table.md'}, {args.out / 'table.csv'}; figure: "
        f"{args.out / 'figure.png'}",
        file=sys.stderr,
    )
    return 0
