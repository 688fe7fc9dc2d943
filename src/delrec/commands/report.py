"""`delrec report RUN_DIR`: what a chip needs to run a trained network with integer delays
(:mod:`delrec.deploy.report`), measured on the run's data or a named data set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

from delrec.commands import CHECK_FAILED, EXIT_CODES_HELP, UsageError, check_outputs
from delrec.data import SPLITS, load_dataset
from delrec.deploy.report import format_report, hardware_report, report_paths, write_report
from delrec.deploy.targets import TARGETS, UnknownTargetError, format_targets, get_target
from delrec.runs import (
    checkpoint_config,
    default_report_dir,
    eval_loader,
    load_splits,
    load_trained,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="hardware report: delays, buffer memory, spikes and synaptic operations",
        description="Report what a chip needs to run the network of a run directory with integer "
        "delays: per layer the neurons, synapses, delay histogram and buffer memory; every "
        "integer delay against the run's network.max_delay; on the run's test split (or --data) "
        "the spikes and synaptic operations per inference and the score with σ-spread versus "
        "integer delays. --target compares the network with a chip's published delay limits.",
        epilog="examples: delrec report runs/shd --target loihi2-lava-dl --no-data; "
        "delrec report --list-targets. A delay d counts the steps beyond the minimal latency (a "
        "recurrent spike arrives 1 + d steps later); train for a chip with "
        "--set network.max_delay=D. " + EXIT_CODES_HELP,
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", nargs="?", help="run directory or checkpoint .pt file"
    )
    parser.add_argument(
        "--checkpoint",
        choices=["best", "last"],
        default="best",
        help="which checkpoint of a run directory (default best)",
    )
    parser.add_argument("--split", choices=SPLITS, help="split to measure on (default test)")
    parser.add_argument(
        "--data",
        metavar="NAME",
        help="measure on this data set (see `delrec data list`) instead of the run's",
    )
    parser.add_argument("--data-root", metavar="DIR", help="folder holding the data set's files")
    parser.add_argument("--no-data", action="store_true", help="static report only, no data pass")
    parser.add_argument(
        "--target",
        metavar="NAME",
        help="compare the network with a chip's delay limits (longest delay, per-neuron or "
        "per-synapse delays, delay bits): PASS/FAIL lines, also written into the report JSON; "
        f"NAME is one of {', '.join(TARGETS)}",
    )
    parser.add_argument(
        "--list-targets",
        action="store_true",
        help="print the known targets with their limits and the source of every number, and exit",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    parser.add_argument(
        "--max-batches",
        type=int,
        help="measure a random subset (seed 0) of this many batches of the split, not all of it",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="where to write hardware_report.json and delay_histograms.png "
        "(default RUN_DIR/report, or beside a checkpoint file)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.list_targets:
        if args.run_dir is not None:
            raise UsageError("--list-targets prints the known targets and exits: drop RUN_DIR")
        print(format_targets())
        return 0
    if args.no_data:
        given = [
            option
            for option, value in (
                ("--split", args.split),
                ("--max-batches", args.max_batches),
                ("--data-root", args.data_root),
            )
            if value is not None
        ]
        if given:
            raise UsageError(
                f"{' and '.join(given)} {'chooses' if len(given) == 1 else 'choose'} the data "
                "to measure on, and --no-data measures none: give one or the other"
            )
    args.split = args.split or "test"
    if args.run_dir is None:
        raise UsageError("give a RUN_DIR (or --list-targets)")
    if args.batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
        raise UsageError("--batch-size and --max-batches must be >= 1")
    try:
        target = None if args.target is None else get_target(args.target)
    except UnknownTargetError as error:
        raise UsageError(str(error)) from None
    output = Path(args.output) if args.output else default_report_dir(args.run_dir)
    for path in report_paths(output):  # before the measurement, which takes a while
        check_outputs({"-o": path}, set(), "give -o a folder of its own")
    payload, network = load_trained(args.run_dir, args.checkpoint)
    try:
        report = hardware_report(
            network,
            _loader(args, payload),
            max_batches=args.max_batches,
            target=target,
        )
    except ValueError as error:  # no samples to measure on
        raise UsageError(str(error)) from None
    print(format_report(report))  # first: a failed write still shows the measurement
    paths = write_report(report, output)
    print(f"wrote {paths[0]} and {paths[1]}")
    if target is not None and not report["target"]["pass"]:
        print(
            f"delrec report: the network does not fit {target.name} (verdict FAIL above): "
            "exit code 3",
            file=sys.stderr,
        )
        return CHECK_FAILED
    return 0


def _check_fits(network: dict, info) -> None:
    """A UsageError unless the network (its configuration) answers data set ``info``'s task:
    one regression output from the ``"ema"`` readout, or a score for each of its classes."""
    regression = info.task == "regression"
    if network["output_size"] != info.output_size or regression and network["readout"] != "ema":
        kind = "one regression output" if regression else f"scores of {info.num_classes} classes"
        raise UsageError(
            f"data set {info.name} asks for {kind}, but the network has {network['output_size']} "
            f"output(s) and the {network['readout']!r} readout: measure it on the data set it "
            "was trained for (leave out --data) or on one of the same kind"
        )


def _loader(args: argparse.Namespace, payload: dict):
    """The loader to measure on: ``--data``, else the run's own data set (as the run saw it:
    its permutation, its standardised targets), else ``None``."""
    if args.no_data:
        if args.data:
            raise UsageError("--no-data and --data NAME contradict each other: give one")
        return None
    # the run's own data set, named: measured as the run saw it (below)
    own = "train_config" in payload and payload["train_config"].get("task") == args.data
    if args.data and not own:
        dataset = load_dataset(args.data, args.split, root=args.data_root)
        _check_fits(payload["network_config"], dataset.info)
        return _measured(dataset, args)
    if "train_config" not in payload:
        print(
            "note: the checkpoint holds no training configuration, so there is no data set to "
            "measure on; pass --data NAME for spikes, synaptic operations and scores",
            file=sys.stderr,
        )
        return None
    config = checkpoint_config(payload, args.run_dir, data_root=args.data_root)
    data = load_splits(config, splits=(args.split,), stored=payload)
    return _measured(data.datasets[args.split], args)


def _measured(dataset, args: argparse.Namespace):
    """A loader in item order over ``dataset``, or, with ``--max-batches``, over a random
    subset of that many batches (the same items on every pass, seed 0): the first batches of a
    split sorted by class would score a few classes only."""
    if args.max_batches is not None and args.max_batches * args.batch_size < len(dataset):
        items = args.max_batches * args.batch_size
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        dataset = Subset(dataset, order[:items].sort().values.tolist())
        print(
            f"note: --max-batches {args.max_batches}: measuring {items} of the {args.split} "
            f"split's {len(dataset.dataset)} items, drawn at random (seed 0)",
            file=sys.stderr,
        )
    return eval_loader(dataset, args.batch_size)
