"""The subcommands of ``delrec``, one thin module each: parse the arguments, call the library,
leave errors to :func:`fail`, which maps them to exit codes by one convention.

Exit codes (every command):

* 0 — success;
* 1 — a failure at run time: training diverged or lost a process, a download failed, a seed
  run side by side failed, a file could not be written, the memory ran out;
* 2 — bad usage or bad input: an unknown option or a bad argument value, a bad
  configuration value, a missing, corrupt or unsuitable file or run directory, a run
  directory in use by another process;
* 3 — the command ran and its check failed: ``delrec report --target``'s verdict is FAIL
  (the network does not fit the chip; the report is written all the same);
* 130 — interrupted (Ctrl-C);
* 143 — terminated (SIGTERM, e.g. a scheduler's time limit).

:data:`EXIT_CODES_HELP` says the same at the end of ``delrec --help``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from delrec.analysis.compare import CompareError
from delrec.analysis.sweeps import SweepError
from delrec.checkpoint import CheckpointError
from delrec.config import MAX_SEED, ConfigError, check_new_seed, is_seed
from delrec.data import DataError, DownloadError
from delrec.deploy import NIRExportError
from delrec.files import file_in_the_way
from delrec.runs import RunError, owning_run
from delrec.training import TrainingError

EXIT_FAILURE = 1
EXIT_USAGE = 2
CHECK_FAILED = 3  # the command ran; the check it was asked for failed
MAX_SEEDS = 100_000  # seeds one --seeds may name
EXIT_CODES_HELP = (
    "exit codes: 0 success; 1 a failure at run time (training diverged, download failed, a "
    "file could not be written, out of memory); 2 bad usage or bad input (unknown option, bad "
    "configuration value, missing or corrupt file, run directory in use); 3 a check failed "
    "(report --target: the network does not fit the chip); 130 interrupted "
    "(Ctrl-C); 143 terminated (SIGTERM)"
)


def described(module) -> str:
    """A command's ``--help`` description: the docstring of ``module`` after its first
    paragraph, its reST markup (````code````, ``:func:`name```) as plain text."""
    text = module.__doc__.split("\n\n", 1)[1]
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")


class UsageError(Exception):
    """A command's arguments that cannot be used together or have a bad value."""


# first match wins: the failures that are kinds of bad-input errors come first
_EXIT_CODES = (
    (DownloadError, EXIT_FAILURE),
    (TrainingError, EXIT_FAILURE),
    (ImportError, EXIT_FAILURE),  # an optional package is missing
    (OSError, EXIT_FAILURE),
    (UsageError, EXIT_USAGE),
    (ConfigError, EXIT_USAGE),
    (DataError, EXIT_USAGE),
    (CheckpointError, EXIT_USAGE),
    (RunError, EXIT_USAGE),
    (CompareError, EXIT_USAGE),
    (SweepError, EXIT_USAGE),
    (NIRExportError, EXIT_USAGE),
)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation: Python's and numpy's ``MemoryError``, torch's
    ``OutOfMemoryError`` (a GPU) and the ``RuntimeError`` of its CPU allocator."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def exit_code(error: BaseException) -> int | None:
    """The exit code of ``error`` by the convention above; ``None`` for an error no command
    expects (a bug: it propagates with its traceback)."""
    if out_of_memory(error):
        return EXIT_FAILURE
    for kind, code in _EXIT_CODES:
        if isinstance(error, kind):
            return code
    return None


def interruption_behind(error: BaseException) -> BaseException | None:
    """The interruption (Ctrl-C, SIGTERM, exit: a ``BaseException`` that is no ``Exception``)
    that ``error`` was raised while handling, or ``None``. A library whose cleanup fails when
    interrupted in the middle of a write (``torch.save``'s archive writer: "unexpected pos")
    puts an error of its own in the interruption's place."""
    context = error.__context__
    while context is not None:
        if not isinstance(context, Exception):
            return context
        context = context.__context__
    return None


def fail(command: str, error: Exception, prefix: str = "") -> int:
    """Print ``delrec COMMAND: error: PREFIX MESSAGE`` on stderr and return the exit code of
    ``error``; re-raise an error no command expects, and the interruption behind an error
    raised while handling one (:func:`interruption_behind`), which ends the command as
    interrupted."""
    interruption = interruption_behind(error)
    if interruption is not None:
        raise interruption
    code = exit_code(error)
    if code is None:
        raise error
    message = str(error)
    if isinstance(error, OSError) and error.strerror and error.filename is None:
        message = error.strerror  # delrec's own message, without the "[Errno N] " of str()
    if out_of_memory(error):  # numpy and torch name the allocation; Python's says nothing
        detail = message.strip().splitlines()[0] if message.strip() else "no detail"
        message = (
            f"out of memory ({detail}): the sizes asked for (data, network, batch size) do not "
            "fit this machine; use smaller ones or a machine with more memory"
        )
    print(f"delrec {command}: error: {prefix}{message}", file=sys.stderr)
    return code


def check_outputs(outputs: dict, protected: set[Path], fix: str) -> None:
    """A UsageError for an output path (``{option: path or None}``) that cannot be written (a
    folder, a file where a folder should be, a folder this user may not write into) or that
    resolves, symlinks followed, to a file of ``protected`` (``runs.run_files``), to a file any
    run keeps (``runs.owning_run``: its config, metrics, results, checkpoints) or to another
    output's file or folder; ``fix`` says where to write instead of a run's file. Run before
    the work, so that no work is lost to a path that fails at the end."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        problem = unwritable(Path(path))
        if problem is not None:
            raise UsageError(f"{option} {path} cannot be written: {problem}; give another path")
        target = Path(path).resolve()
        if target in protected:
            raise UsageError(
                f"{option} {path} would overwrite {target}, a file of the run being read; {fix}"
            )
        run = owning_run(target)
        if run is not None:
            raise UsageError(
                f"{option} {path} would overwrite {target}, a file of the run {run}; {fix}"
            )
        if target in seen:
            raise UsageError(
                f"{seen[target]} and {option} both name {target}: one would overwrite the other; "
                "give each its own path"
            )
        seen[target] = option
    for target, option in seen.items():  # a file written where another output needs a folder
        inside = next((o for t, o in seen.items() if target in t.parents), None)
        if inside is not None:
            raise UsageError(
                f"{option} {outputs[option]} would also be the folder of {inside} "
                f"{outputs[inside]}: one path cannot be a file and a folder; give each output "
                "its own path"
            )


def unwritable(path: Path) -> str | None:
    """Why a file cannot be written at ``path``, or None (missing folders are made when the
    file is written, :func:`delrec.files.write_atomic`)."""
    if path.is_dir():
        return "it is a folder, give the path of a file"
    blocking = file_in_the_way(path.parent)
    if blocking is not None:
        return f"{blocking} is a file, not a folder"
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"this user may not write into {folder}"
    try:  # what the permission bits do not tell: a read-only or special file system (/proc)
        descriptor, probe = tempfile.mkstemp(prefix=".delrec-probe-", dir=folder)
    except OSError as error:
        return f"no file can be made in {folder} ({error.strerror or error})"
    os.close(descriptor)
    os.unlink(probe)
    return None


def add_set_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE …`` (repeatable) into ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=help,
    )


def nonempty(kind: Callable[[str], object] = Path):
    """An argparse type: ``kind(text)``, refusing an empty value (an unset shell variable),
    which would otherwise read as the current folder or fall back to the default."""

    def parse(text: str):
        if not text.strip():
            raise argparse.ArgumentTypeError("is empty (an unset shell variable?): give a value")
        return kind(text)

    return parse


def comma_list(kind):
    """An argparse type: ``"a,b,c"`` → a tuple of ``kind`` values (an empty item, as in
    ``"1,,2"``, is an error: a value may have been lost)."""

    def parse(text: str) -> tuple:
        items = text.split(",")
        if not all(item.strip() for item in items):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of values, got {text!r}, which has an empty "
                "item: write the values separated by single commas"
            )
        what = {int: "whole numbers", float: "numbers"}.get(kind, "values")
        try:
            return tuple(kind(item) for item in items)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {what}, got {text!r}"
            ) from None

    return parse


def parse_seeds(spec: str) -> list[int]:
    """``"0-4"`` → [0, 1, 2, 3, 4]; ``"0,3,7"``; ``"0-2,9"``."""
    seeds = []
    try:
        for part in spec.split(","):
            low, dash, high = part.strip().partition("-")
            span = range(int(low), int(high) + 1) if dash else range(int(low), int(low) + 1)
            if len(seeds) + len(span) > MAX_SEEDS:  # before a list of them fills the memory
                raise UsageError(f"--seeds {spec!r} names more than {MAX_SEEDS} seeds")
            seeds.extend(span)
    except ValueError:
        raise UsageError(f"--seeds expects a list like 0-4 or 0,3,7, got {spec!r}") from None
    if not seeds or not all(map(is_seed, seeds)) or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {spec!r} must name distinct seeds, each in 0…{MAX_SEED}")
    for seed in seeds:
        check_new_seed(seed)
    return seeds
