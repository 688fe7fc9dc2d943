"""`delrec compare RUN_DIR…`: trained runs side by side, in the layout of Table S5."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from delrec import files
from delrec.analysis import compare
from delrec.commands import EXIT_CODES_HELP, UsageError, check_outputs, described, nonempty
from delrec.config import check_device
from delrec.runs import run_files


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="table (Markdown, CSV) and figure of trained runs, Table S5 layout",
        description=described(compare),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("run_dirs", nargs="+", type=nonempty(Path), metavar="RUN_DIR")
    parser.add_argument("--markdown", type=nonempty(Path), help="write the Markdown table here")
    parser.add_argument("--csv", type=nonempty(Path), help="write the table as CSV here")
    parser.add_argument(
        "--figure",
        type=nonempty(Path),
        help="write the figure here (.png, .pdf or .svg, by its suffix)",
    )
    parser.add_argument(
        "--x",
        choices=sorted(compare.X_AXES),
        default="parameters",
        help="x axis of the figure (default parameters)",
    )
    parser.add_argument(
        "--rounded-only",
        action="store_true",
        help="skip re-evaluating learned delays with real values (faster)",
    )
    parser.add_argument(
        "--device", default="auto", help="where runs are re-evaluated: auto, cpu, cuda, cuda:N"
    )
    parser.add_argument(
        "--data-root", help="folder of the data set's files for the re-evaluation, if they moved"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_outputs(
        {"--markdown": args.markdown, "--csv": args.csv, "--figure": args.figure},
        set().union(*(run_files(path) for path in args.run_dirs)),
        "write the table and figure outside the run directories",
    )
    if args.figure is not None:
        try:
            files.figure_format(args.figure)
        except ValueError as error:
            raise UsageError(f"--figure {error}") from None
    check_device(args.device)  # also with --rounded-only, which runs nothing on it
    rows = compare.compare(args.run_dirs, not args.rounded_only, args.device, args.data_root)
    print(compare.format_markdown(rows))
    unlabelled = compare.unlabelled_differences(rows)
    if unlabelled:
        print(
            "note: the rows differ in more than their models and labels, so the ranking "
            f"compares these settings too: {' | '.join(unlabelled)}",
            file=sys.stderr,
        )
    compare.write_outputs(rows, args.markdown, args.csv, args.figure, args.x)
    return 0
