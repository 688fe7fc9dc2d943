"""`delrec eval RUN_DIR`: re-evaluate a run's checkpoint on a split, with integer delays (as a
chip runs them) by default or with the σ-spread kernel saved with the checkpoint (the σ of
its epoch)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from delrec.commands import EXIT_CODES_HELP, UsageError, nonempty
from delrec.config import MAX_COUNT
from delrec.data import SPLITS
from delrec.files import strict_json
from delrec.training.evaluation import evaluate_run


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="re-evaluate a trained run (integer delays by default)",
        description="Evaluate the best (or last) checkpoint of a run directory on a split.",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument(
        "run_dir",
        type=nonempty(Path),
        metavar="RUN_DIR",
        help="a directory written by `delrec train` (or a .pt checkpoint)",
    )
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="which checkpoint of a run directory (default best; a .pt file is itself one)",
    )
    parser.add_argument(
        "--split", choices=SPLITS, default="test", help="split to evaluate (default test)"
    )
    parser.add_argument(
        "--spread",
        action="store_true",
        help="use the real-valued delays and σ-spread kernel of training instead of integer delays",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, help="evaluation batch size")
    parser.add_argument("--data-root", help="folder of the data set's files, if it moved")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size is not None and not 1 <= args.batch_size <= MAX_COUNT:
        raise UsageError(f"--batch-size must be in 1…{MAX_COUNT}, got {args.batch_size}")
    result = evaluate_run(
        args.run_dir,
        args.checkpoint,
        args.split,
        args.spread,
        args.device,
        args.batch_size,
        args.data_root,
    )
    if args.spread and result["delays"] == "integer":
        print(
            f"note: --spread changes nothing for the {result['model']} model, which learns no "
            "delays (its delays are integers either way)",
            file=sys.stderr,
        )
    shown = "  ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))
    print(
        f"{result['split']} ({result['checkpoint']} checkpoint, epoch {result['epoch']}, "
        f"{result['delays']} delays): {shown}",
        file=sys.stderr,
    )
    # strict JSON for the programs that read it: a metric that overflowed (inf) becomes null
    print(json.dumps(strict_json(result)), flush=True)
    return 0
