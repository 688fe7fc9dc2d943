"""The `delrec` command line: one subcommand per job.

Each subcommand is a module of :mod:`delrec.commands` providing ``add_parser(subparsers)``
(which sets ``run``), listed in ``COMMANDS`` below, so this file stays a table. Errors a
command expects become a one-line message and an exit code by the convention of
:mod:`delrec.commands` (1: a failure at run time; 2: bad usage or bad input).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from delrec import cpu
from delrec.commands import EXIT_CODES_HELP, fail

# subcommand name -> module providing add_parser(subparsers), imported when the parser is built.
COMMANDS = {
    "data": "delrec.commands.data",
    "analyze": "delrec.commands.analyze",
    "compare": "delrec.commands.compare",
    "sweep": "delrec.commands.sweep",
    "train": "delrec.commands.train",
    "eval": "delrec.commands.eval",
    "export": "delrec.commands.export",
    "report": "delrec.commands.report",
    "bench": "delrec.commands.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="delrec",
        description="Train spiking networks with learnable recurrent delays (DelRec) and "
        "deploy them with integer delays.",
        epilog=EXIT_CODES_HELP,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    cpu.configure()  # before any worker thread starts: they copy its flush-to-zero flag
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        return fail(args.command, error)


if __name__ == "__main__":
    raise SystemExit(main())
