"""`delrec analyze …`: the S3 spectral radius, the measured gradient experiment, and how
trained runs learned (validation, loss, firing rate and gradient norm per layer)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from delrec import files
from delrec.analysis import gradients, spectral
from delrec.commands import EXIT_CODES_HELP, UsageError, check_outputs, comma_list, nonempty
from delrec.data import dataset_info
from delrec.runs import METRICS, RESULTS, RunDir, run_files


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="the paper's gradient argument (S3): spectral radius and measurement; a run's "
        "training curves",
        epilog=EXIT_CODES_HELP,
    )
    actions = parser.add_subparsers(dest="analyze_command", metavar="ACTION")
    actions.required = True

    spec = actions.add_parser(
        "spectral",
        help="spectral radius r_d of λ^(d+1) − aλ^d − b = 0 for d = 0 … D",
        description="The paper's S3 argument: the spectral radius r_d of the recurrence of a "
        "layer with delay d, the roots of λ^(d+1) − aλ^d − b = 0, for d = 0 … D; r_d < 1 means "
        "gradients vanish through the loop, and longer delays bring r_d towards 1 "
        "(docs/analysis.md).",
        epilog=EXIT_CODES_HELP,
    )
    spec.add_argument("--a", type=float, required=True, help="leak coefficient a = sup|A_t|")
    spec.add_argument("--b", type=float, required=True, help="recurrent coefficient b = sup|B_t|")
    spec.add_argument("--max-delay", type=int, default=20, help="largest delay D (default 20)")
    _add_outputs(spec, "spectral.png")
    spec.set_defaults(run=run_spectral)

    grad = actions.add_parser(
        "gradients",
        help="measured ‖∂L/∂W_rec‖ and its growth for fixed delays, next to S3",
        description="Measure ‖∂L/∂W_rec‖ and its growth per step for a recurrent LIF layer "
        "with fixed delays, next to S3's r_d (docs/analysis.md).",
        epilog=EXIT_CODES_HELP,
    )
    defaults = gradients.GradientSetup()
    grad.add_argument(
        "--delays",
        type=comma_list(int),
        default=defaults.delays,
        help="comma-separated fixed delays (default 0,1,2,5,10,20)",
    )
    grad.add_argument(
        "--size", type=int, default=defaults.size, help="neurons N (default %(default)s)"
    )
    grad.add_argument(
        "--steps", type=int, default=defaults.steps, help="time steps T (default %(default)s)"
    )
    grad.add_argument(
        "--batch", type=int, default=defaults.batch, help="input sequences (default %(default)s)"
    )
    grad.add_argument(
        "--tau", type=float, default=defaults.tau, help="LIF τ in steps (default %(default)s)"
    )
    grad.add_argument(
        "--gain",
        type=float,
        default=defaults.gain,
        help="W = gain × orthogonal (default %(default)s: gradients explode)",
    )
    grad.add_argument(
        "--input-mean",
        type=float,
        default=defaults.input_mean,
        help="mean of the Gaussian input current (default %(default)s)",
    )
    grad.add_argument(
        "--input-std",
        type=float,
        default=defaults.input_std,
        help="standard deviation of the input current (default %(default)s)",
    )
    grad.add_argument(
        "--surrogate",
        choices=("triangle", "atan"),
        default=defaults.surrogate,
        help="surrogate gradient of the spike (default %(default)s)",
    )
    grad.add_argument(
        "--surrogate-scale",
        type=float,
        default=defaults.surrogate_scale,
        help="γ (triangle) or α (atan) (default %(default)s)",
    )
    grad.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the weights and inputs (default %(default)s)",
    )
    _add_outputs(grad, "gradients.png")
    grad.set_defaults(run=run_gradients)

    training = actions.add_parser(
        "training",
        help="how runs learned: validation, loss, firing rate and gradient norm per layer",
        description="One figure of the metrics.csv of every RUN_DIR (the runs of every seed "
        "of a run of several seeds), epoch by epoch: validation metric, training loss, the "
        "firing rate of each hidden layer and the gradient norm of each layer.",
        epilog=EXIT_CODES_HELP,
    )
    training.add_argument("run_dirs", nargs="+", type=nonempty(Path), metavar="RUN_DIR")
    training.add_argument(
        "--labels",
        type=comma_list(str),
        help="comma-separated legend labels, one per run, a folder of several seeds counting "
        "one per seed in seed order (default: the directory names)",
    )
    training.add_argument(
        "--figure",
        type=nonempty(Path),
        help="figure path, .png, .pdf or .svg (default training.png)",
    )
    training.set_defaults(run=run_training, no_figure=False, default_figure="training.png")


def _add_outputs(parser: argparse.ArgumentParser, figure: str) -> None:
    parser.add_argument(
        "--figure", type=nonempty(Path), help=f"figure path, .png, .pdf or .svg (default {figure})"
    )
    parser.set_defaults(default_figure=figure)
    parser.add_argument("--no-figure", action="store_true", help="write no figure")
    parser.add_argument("--csv", type=nonempty(Path), help="also write the table as CSV")
    parser.add_argument("--json", type=nonempty(Path), help="also write everything as JSON")


def _check_outputs(args: argparse.Namespace) -> Path | None:
    """The figure's path (None with ``--no-figure``), checked with the other outputs before any
    work: a format the suffix names, no two outputs to one file, none to a file of a run read
    (``analyze training``)."""
    if args.no_figure and args.figure is not None:
        raise UsageError("--no-figure and --figure contradict each other: give one")
    figure = None if args.no_figure else args.figure or Path(args.default_figure)
    if figure is not None:
        try:
            files.figure_format(figure)
        except ValueError as error:
            raise UsageError(f"--figure {error}") from None
    outputs = {"--figure": figure, "--csv": getattr(args, "csv", None)}
    outputs["--json"] = getattr(args, "json", None)
    protected = set().union(*map(run_files, getattr(args, "run_dirs", [])))
    check_outputs(outputs, protected, "write it outside the run directories")
    return figure


def _write_figure(figure: Path | None, plot) -> None:
    if figure is not None:
        plot(figure)
        print(f"figure: {figure}")


def run_spectral(args: argparse.Namespace) -> int:
    figure = _check_outputs(args)
    try:
        rows = spectral.spectral_table(args.a, args.b, args.max_delay)
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(f"roots of λ^(d+1) − {args.a:g}·λ^d − {args.b:g} = 0")
    print(spectral.format_table(rows))
    records = spectral.rows_as_records(args.a, args.b, rows)
    if args.csv:
        table = [{k: v for k, v in r.items() if k != "roots"} for r in records]
        files.write_csv(args.csv, table, list(table[0]))
    if args.json:
        files.write_json(args.json, records, indent=1)
    _write_figure(figure, lambda path: spectral.plot_spectral(args.a, args.b, rows, path))
    return 0


def run_gradients(args: argparse.Namespace) -> int:
    figure = _check_outputs(args)
    try:
        setup = gradients.GradientSetup(
            delays=args.delays,
            size=args.size,
            steps=args.steps,
            batch=args.batch,
            tau=args.tau,
            gain=args.gain,
            input_mean=args.input_mean,
            input_std=args.input_std,
            surrogate=args.surrogate,
            surrogate_scale=args.surrogate_scale,
            seed=args.seed,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    results = gradients.run_gradient_experiment(setup)
    print(gradients.format_results(results))
    for result in results:
        reason = gradients.why_no_gradient(result)
        if reason is not None:
            print(f"note: d = {result.delay} has no gradient to measure: {reason}", file=sys.stderr)
    payload = gradients.results_as_records(setup, results)
    if args.csv:
        scalar = ("backward_norms", "s3_bound", "step_contributions")
        table = [{k: v for k, v in r.items() if k not in scalar} for r in payload["results"]]
        files.write_csv(args.csv, table, list(table[0]))
    if args.json:
        files.write_json(args.json, payload, indent=1)
    _write_figure(figure, lambda path: gradients.plot_gradients(setup, results, path))
    return 0


def run_training(args: argparse.Namespace) -> int:
    from delrec.training.figures import training_dynamics

    figure = _check_outputs(args)
    runs = [run for path in args.run_dirs for run in RunDir(path).single_runs()]
    if args.labels is None:
        _check_runs_named_once(runs)
        labels = [str(run.path) for run in runs]
    else:
        labels = list(args.labels)
    if len(labels) != len(runs):
        raise UsageError(
            f"--labels names {len(labels)} runs, but the run directories hold {len(runs)} "
            f"(a folder of several seeds holds one per seed: "
            f"{', '.join(str(run.path) for run in runs)}): give {len(runs)} labels in that "
            "order, or leave out --labels"
        )
    if len(set(labels)) < len(labels):
        raise UsageError(f"--labels {','.join(labels)}: each run needs a label of its own")
    histories = {}
    for label, run in zip(labels, runs):
        rows = run.read_metrics()
        if not rows and (run.path / RESULTS).is_file():
            raise UsageError(
                f"{run.path / METRICS} is missing or empty, but the run finished "
                f"({RESULTS}): it was removed or emptied; restore it, or leave the run out"
            )
        if not rows:
            raise UsageError(f"{run.path} has no metrics.csv yet: it has not finished an epoch")
        histories[label] = rows
    configs = [run.read_config() for run in runs]  # config.json checked too
    kinds = {dataset_info(c.task, **c.data).task for c in configs}
    if len(kinds) > 1:
        raise UsageError("the runs mix classification and regression; give runs of one kind")
    metric = "accuracy" if kinds.pop() == "classification" else "nmse"
    for rows, run in zip(histories.values(), runs):
        _check_metrics(run, rows, metric)
    training_dynamics(histories, metric, figure)
    for label, rows in histories.items():
        last = rows[-1]
        print(
            f"{label}: {len(rows)} epochs, last valid {metric} {float(last[f'valid_{metric}']):.4g}"
        )
    print(f"figure: {figure}")
    return 0


def _check_runs_named_once(runs: list[RunDir]) -> None:
    """A UsageError for a run that the RUN_DIRs name twice (the same directory, or a run of a
    run of several seeds that is also given by itself)."""
    named: dict[Path, Path] = {}  # resolved path → the path as first given
    for run in runs:
        first = named.get(run.path.resolve())
        if first is not None:
            spelled = "" if first == run.path else f" (as {first} and {run.path})"
            raise UsageError(f"the run {first} is named twice{spelled}; give each run once")
        named[run.path.resolve()] = run.path


def _check_metrics(run: RunDir, rows: list[dict], metric: str) -> None:
    """A RunError naming the line and column of ``metrics.csv`` that the figure cannot read."""
    needed = ["epoch", f"valid_{metric}", "train_loss"]
    columns = needed + [c for c in rows[0] if c.startswith(("firing_rate_", "grad_norm_"))]
    for line, row in enumerate(rows, start=2):
        for column in columns:
            run.metrics_number(line, row, column)
