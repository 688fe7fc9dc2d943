"""Writing files whole or not at all: the one way delrec writes a file it keeps.

:func:`write_atomic` lets a writer fill a temporary file beside the target
(``.<name>.<random>.tmp`` in the same folder), flushes it to disk and renames it over the
target, so a reader sees the old file or the new one, never a part of one. An interrupted
write leaves only its temporary, which :func:`remove_temporaries` clears: a run directory's
lock clears its own at once; elsewhere (a shared data cache, a download folder, any target
of :func:`write_atomic`) a temporary untouched for ``STALE_AFTER_S`` is taken as left behind
and cleared, since a live writer may own a younger one. Every file is
created with mode ``0o666`` less the process's umask (``0o644`` under the usual umask 022),
as ``open()`` creates files.

The lock files that keep two processes off the same files (a run directory's, a data folder's
while a download runs) are taken and released here too (:func:`acquire_lock`).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import fcntl
import io
import json
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"
STALE_AFTER_S = 3600.0  # a temporary unmodified this long belongs to no live writer


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Replace ``path`` by what ``write(temporary path)`` writes, in one step; returns ``path``.

    The folder is created when missing. When ``write`` raises, the temporary is removed, the
    error propagates and an existing file at ``path`` is untouched. Temporaries of earlier,
    interrupted writes of ``path`` older than ``STALE_AFTER_S`` are removed first.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            errno.EISDIR,
            f"{path} is a folder: remove it, or give the path of a file to write instead",
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_temporaries(path.parent, [path.name], older_than=STALE_AFTER_S)
        temporary = _new_temporary(path)
    except OSError as error:
        blocking = file_in_the_way(path.parent)
        if blocking is not None:
            raise NotADirectoryError(
                errno.ENOTDIR,
                f"cannot write {path}: {blocking} is a file, not a folder; move it away, or "
                "write elsewhere",
            ) from None
        raise _cannot_write(path, error) from None
    try:
        write(temporary)
        _flush_to_disk(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno is not None:
            raise _cannot_write(path, error) from None
        raise
    return path


def _cannot_write(path: Path, error: OSError) -> OSError:
    """``error`` (a failed write of ``path`` or of its temporary) as an error naming ``path``."""
    reason = error.strerror or str(error)
    return type(error)(
        error.errno,
        f"cannot write {path}: {reason}; an existing file there is unchanged (write "
        "elsewhere, or free the disk or make the folder writable)",
    )


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The file (not a folder) at ``folder`` or at one of its parents, which stops the folder
    from being made; ``None`` when there is none."""
    folder = Path(folder)
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` of a UTF-8 text."""
    return write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def strict_json(value):
    """``value`` with every non-finite float, in lists and dicts too, made ``None``: strict
    JSON (``null``), which every reader accepts, where ``json.dumps`` writes ``NaN``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def write_json(path: str | os.PathLike, document, indent: int = 2) -> Path:
    """:func:`write_atomic` of ``document`` as indented JSON ending in a newline."""
    return write_text(path, json.dumps(document, indent=indent) + "\n")


def write_csv(path: str | os.PathLike, rows: Iterable[dict], fields: list[str]) -> Path:
    """:func:`write_atomic` of ``rows`` as CSV with the columns ``fields`` (a row's other keys
    are left out)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


FIGURE_FORMATS = (".png", ".pdf", ".svg")  # a figure's format, chosen by its file name


def figure_format(path: str | os.PathLike) -> str:
    """The format a figure's file name asks for (``"png"``, ``"pdf"``, ``"svg"``), or a
    ValueError for any other suffix."""
    kind = Path(path).suffix.lower()
    if kind not in FIGURE_FORMATS:
        raise ValueError(
            f"{path}: give a file name ending in {', '.join(FIGURE_FORMATS)} (the suffix "
            "chooses the format)"
        )
    return kind[1:]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed), imported by
    the first caller: the commands that draw nothing never load matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figure(path: str | os.PathLike, figure, dpi: int = 120) -> Path:
    """:func:`write_atomic` of a matplotlib ``figure`` in the format of ``path``'s suffix
    (:func:`figure_format`)."""
    kind = figure_format(path)
    return write_atomic(path, lambda temporary: figure.savefig(temporary, format=kind, dpi=dpi))


def temporary_target(path: str | os.PathLike) -> str | None:
    """The name of the file a temporary of :func:`write_atomic` was written for, or ``None``
    when ``path`` is not such a temporary."""
    name = Path(path).name
    if not (name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)):
        return None
    target, dot, token = name[1 : -len(TEMPORARY_SUFFIX)].rpartition(".")
    return target if dot and target and len(token) == 8 else None


def remove_temporaries(
    folder: str | os.PathLike,
    targets: Iterable[str] | None = None,
    older_than: float | None = None,
) -> list[Path]:
    """Delete the temporaries that interrupted writes left in ``folder`` (not its sub-folders):
    all of them, or those written for the file names in ``targets``; with ``older_than``
    (seconds), only those not modified for that long. Without it, call it only where no other
    process may be writing the same files (e.g. under a run directory's lock). Returns the
    paths removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if targets is None else set(targets)
    now = time.time()
    removed = []
    for entry in folder.iterdir():
        target = temporary_target(entry)
        if target is None or (wanted is not None and target not in wanted):
            continue
        try:
            if older_than is not None and now - entry.stat().st_mtime < older_than:
                continue
            entry.unlink()
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
        removed.append(entry)
    return removed


def _new_temporary(path: Path) -> Path:
    """An empty file of our own beside ``path`` (``O_EXCL``: never one another writer uses)."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temporary


def _flush_to_disk(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------- lock files
def lock_holder() -> str:
    """What a lock file holds while locked: this process's pid, host and start time (a JSON
    line), for the message of a process that finds the lock taken."""
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    return json.dumps(holder) + "\n"


def describe_holder(text: str) -> str:
    """``"pid P on host H (started S)"`` from a lock file's :func:`lock_holder` text."""
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']} (started {holder['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"


def live_holder(path: str | os.PathLike) -> str | None:
    """The description of the live process on this host that wrote the lock file ``path``, or
    ``None`` (no file, or its writer has ended). A look at the file, not a lock: it never
    makes a process that is taking the lock wait or give up."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        holder = json.loads(text)
        pid, host = int(holder["pid"]), holder["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return describe_holder(text)  # cannot look: say who may still hold it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return describe_holder(text)


def acquire_lock(path: str | os.PathLike, on_busy: Callable[[str], object]) -> tuple[int, str]:
    """Lock the file ``path`` (``flock``, released by the kernel if this process dies; the file
    is created if need be) and write :func:`lock_holder` into it. If another process holds it,
    call ``on_busy`` with a description of the holder: raise there to give up, return to wait
    for the lock. Returns the open descriptor (for :func:`release_lock`) and what the file held
    before, non-empty when its last holder died holding it."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_busy(describe_holder(_read_descriptor(descriptor)))
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:  # a releasing holder unlinks the file: the one we locked is then no lock
                current = os.path.samestat(os.fstat(descriptor), os.stat(path))
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(descriptor)
            raise
        if not current:
            os.close(descriptor)
            continue
        previous = _read_descriptor(descriptor)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, lock_holder().encode(), 0)
        return descriptor, previous


def release_lock(descriptor: int, path: str | os.PathLike) -> None:
    """Remove the lock file ``path`` and release the lock held on it through ``descriptor``."""
    try:
        Path(path).unlink(missing_ok=True)  # while still locked: nobody can take the old file
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def waiting_lock(path: str | os.PathLike, on_wait: Callable[[str], object]) -> Iterator[None]:
    """Hold the lock file ``path`` (:func:`acquire_lock`) while the body runs, removing it
    after. If another process holds it, call ``on_wait`` with a description of the holder and
    wait for it (Ctrl-C still interrupts)."""
    descriptor, _ = acquire_lock(path, on_wait)
    try:
        yield
    finally:
        release_lock(descriptor, path)


def _read_descriptor(descriptor: int) -> str:
    return os.pread(descriptor, 1 << 16, 0).decode(errors="replace")
