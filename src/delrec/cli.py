"""The `delrec` command line: one subcommand per job.

Each subcommand lives in the module that owns its concept and registers itself through an
``add_parser(subparsers)`` function listed in ``COMMANDS`` below, so this file stays a table.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module providing add_parser(subparsers), imported when the parser is built.
COMMANDS = {
    "data": "delrec.data.cli",
    "analyze": "delrec.analysis.cli",
    "compare": "delrec.analysis.compare",
    "sweep": "delrec.analysis.sweeps",
    "train": "delrec.training.train_cmd",
    "eval": "delrec.training.eval_cmd",
    "export": "delrec.deploy.nir_format",
    "report": "delrec.deploy.report",
    "bench": "delrec.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="delrec",
        description="Train spiking networks with learnable recurrent delays (DelRec) and "
        "deploy them with integer delays.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
