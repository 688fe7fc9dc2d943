"""The `delrec` command line: one subcommand per job.

Each subcommand is a module of :mod:`delrec.commands` providing ``add_parser(subparsers)``
(which sets ``run``), listed in ``COMMANDS`` below, so this file stays a table. Errors a
command expects become a one-line message and an exit code by the convention of
:mod:`delrec.commands` (1: a failure at run time; 2: bad usage or bad input). This module
imports only the standard library: torch and the commands load inside :func:`main`, so that
Ctrl-C during those first seconds also ends with "interrupted" and exit 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings

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
    import platform

    import torch

    from delrec import __version__
    from delrec.commands import EXIT_CODES_HELP

    parser = argparse.ArgumentParser(
        prog="delrec",
        description="Train spiking networks with learnable recurrent delays (DelRec) and "
        "deploy them with integer delays.",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"delrec {__version__} (torch {torch.__version__}, Python "
        f"{platform.python_version()})",
        help="the versions of delrec, torch and Python (for a bug report)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


class Terminated(BaseException):
    """SIGTERM (a scheduler's time limit, ``kill``): unwinds like Ctrl-C, so that locks are
    released and a parallel-seeds parent stops its workers. ``then``: how the command goes on,
    from its ``after_termination(args)`` where it has one."""

    then: str | None = None


def _terminate(signum, frame) -> None:
    raise Terminated


# how to go on after SIGTERM, by command, where the command has no after_termination(args) or
# the signal came before its arguments were read (the others: run it again)
AFTER_TERMINATION = {
    "train": "run the same command again, or resume the run its first line named",
    "sweep": "the same `delrec sweep …` command continues the sweep where it stopped",
}


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, ``warning (Category): message``: on the command line the file
    and line of the code that warned say nothing to the user."""
    return f"warning ({category.__name__}): {message}\n"


def main(argv: list[str] | None = None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    formatted, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated as stop:
        words = sys.argv[1:] if argv is None else argv
        command = next((word for word in words if not word.startswith("-")), None)
        then = stop.then or AFTER_TERMINATION.get(command, "run the command again")
        print(f"terminated (SIGTERM); what was written is whole: {then}", file=sys.stderr)
        return 143
    finally:
        warnings.formatwarning = formatted
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> int:
    if {"bench", "--dry-run"} <= set(sys.argv[1:] if argv is None else argv):
        # the GPU bench's dry run interprets the Triton kernels on the CPU; triton reads this
        # when torch first imports it, i.e. below
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from delrec import cpu
    from delrec.commands import fail

    cpu.configure()  # before any worker thread starts: they copy its flush-to-zero flag
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # said by the (sub)command they were given to, with its usage
        _innermost(parser, sys.argv[1:] if argv is None else argv).error(
            f"unrecognized arguments: {' '.join(extras)}"
        )
    try:
        return int(args.run(args) or 0)
    except Terminated as stop:
        if hasattr(args, "after_termination"):
            stop.then = args.after_termination(args)
        raise
    except Exception as error:  # named as invoked: `delrec analyze training: error: …`
        action = getattr(args, f"{args.command}_command", None)
        return fail(f"{args.command} {action}" if action else args.command, error)


def _innermost(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the deepest subcommand named in ``argv`` (``delrec data download …``)."""
    for token in argv:
        commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if commands and token in commands[0].choices:
            parser = commands[0].choices[token]
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
