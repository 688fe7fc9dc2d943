"""Download the official data files: MD5-verified, resumable (HTTP Range), extracted.

Each :class:`Resource` is an archive (``.zip`` holding one file, or ``.gz``) at an official
URL with its published MD5. The archive is fetched into ``<name>.part`` (resumed from its
current size when present, keeping every byte that arrived before a stall), verified, then
extracted next to it, and removed. The MD5 of the extracted file is recorded beside it in
``<file>.md5`` (``md5sum`` format); a file that is already there is checked against that
record (or, put there by hand or beside a damaged record, for its format) before it is
reported. Interrupted transfers are resumed automatically (``retries`` times); without a
network connection the first attempt fails at once with a DataError saying where to put the
files by hand.

A mirror (``mirror=``, ``delrec data download --mirror``, or the environment variable
``DELREC_MIRROR``) replaces the official servers: a base URL (``https://…``, ``file://…``)
or a folder under which the archives are found by their file names.

One download runs in a folder at a time (a lock file, ``.delrec-download.lock``, removed
after, and released by the kernel if its process dies): a second process, e.g. another job of
an array started at the same time, says whom it waits for, waits, then finds the files done
and verifies them.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

from delrec.files import file_in_the_way, waiting_lock, write_atomic, write_text

from .errors import DataError, DownloadError

HEIDELBERG_URL = "https://zenkelab.org/datasets/"
MNIST_URL = "http://yann.lecun.com/exdb/mnist/"
MIRROR_VARIABLE = "DELREC_MIRROR"
RECORD_SUFFIX = ".md5"  # beside each extracted file: its MD5, md5sum format
LOCK = ".delrec-download.lock"  # in the data folder: one download into it at a time
_BLOCK = 1 << 16


@dataclass(frozen=True)
class Resource:
    """An archive ``url`` with its ``md5``, extracting to ``target`` (a file name)."""

    url: str
    md5: str
    target: str

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def url_from(self, mirror: str | None) -> str:
        """The archive's URL on ``mirror`` (a base URL or a folder), or the official one."""
        if not mirror:
            return self.url
        if "://" not in mirror:  # a folder
            mirror = Path(mirror).expanduser().resolve().as_uri()
        return f"{mirror.rstrip('/')}/{self.archive}"


RESOURCES: dict[str, list[Resource]] = {
    "shd": [
        Resource(
            HEIDELBERG_URL + "shd_train.h5.zip", "f3252aeb598ac776c1b526422d90eecb", "shd_train.h5"
        ),
        Resource(
            HEIDELBERG_URL + "shd_test.h5.zip", "1503a5064faa34311c398fb0a1ed0a6f", "shd_test.h5"
        ),
    ],
    "ssc": [
        Resource(
            HEIDELBERG_URL + "ssc_train.h5.zip", "d102be95e7144fcc0553d1f45ba94170", "ssc_train.h5"
        ),
        Resource(
            HEIDELBERG_URL + "ssc_valid.h5.zip", "b4eee3516a4a90dd0c71a6ac23a8ae43", "ssc_valid.h5"
        ),
        Resource(
            HEIDELBERG_URL + "ssc_test.h5.zip", "a35ff1e9cffdd02a20eb850c17c37748", "ssc_test.h5"
        ),
    ],
    "mnist": [
        Resource(
            MNIST_URL + "train-images-idx3-ubyte.gz",
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-images-idx3-ubyte",
        ),
        Resource(
            MNIST_URL + "train-labels-idx1-ubyte.gz",
            "d53e105ee54ea40749a09fcbcd1e9432",
            "train-labels-idx1-ubyte",
        ),
        Resource(
            MNIST_URL + "t10k-images-idx3-ubyte.gz",
            "9fb629c4189551a2d022fa330f9573f3",
            "t10k-images-idx3-ubyte",
        ),
        Resource(
            MNIST_URL + "t10k-labels-idx1-ubyte.gz",
            "ec29112dd5afa0611ce80d1b7f02629c",
            "t10k-labels-idx1-ubyte",
        ),
    ],
}


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_path(target: Path) -> Path:
    """Where the MD5 of an extracted file is recorded: ``<file>.md5``."""
    return target.with_name(target.name + RECORD_SUFFIX)


def _recorded_md5(target: Path) -> str | None:
    """The MD5 recorded beside ``target``; ``None`` when there is no record or it is damaged
    (not 32 hex digits, not text)."""
    try:
        recorded = record_path(target).read_bytes().split()[0].decode("ascii").lower()
    except (OSError, IndexError, UnicodeDecodeError):
        return None
    return recorded if re.fullmatch("[0-9a-f]{32}", recorded) else None


def _write_record(target: Path, digest: str) -> None:
    write_text(record_path(target), f"{digest}  {target.name}\n")


class _Interrupted(Exception):
    """The transfer stopped early; the .part file keeps what arrived."""


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Append the missing bytes at ``url`` to ``part`` (a Range request when it exists)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # range past the end: the .part is already complete
            return
        raise
    with response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with (
            open(part, "ab" if have else "wb") as out,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=part.name.removesuffix(".part"),
                disable=None if progress else True,  # None: off where stderr is no terminal
            ) as bar,
        ):
            try:  # read1: what has arrived, so that a stall loses nothing already received
                for block in iter(lambda: response.read1(_BLOCK), b""):
                    out.write(block)
                    bar.update(len(block))
            except (OSError, HTTPException) as exc:
                raise _Interrupted(str(exc)) from exc
    if total is not None and part.stat().st_size < total:
        raise _Interrupted(f"{part.stat().st_size} of {total} bytes")


def _extract(archive: Path, target: Path) -> None:
    """Write the single member of a .zip (or the content of a .gz) to ``target`` atomically,
    then its MD5 to ``<target>.md5``."""
    digest = hashlib.md5()

    def copy(source, temporary: Path) -> None:
        with source, open(temporary, "wb") as destination:
            for block in iter(lambda: source.read(_BLOCK), b""):
                digest.update(block)
                destination.write(block)

    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf:
                members = [m for m in zf.namelist() if not m.endswith("/")]
                if len(members) != 1:
                    raise DownloadError(f"{archive} holds {len(members)} files, expected one")
                write_atomic(target, lambda temporary: copy(zf.open(members[0]), temporary))
        else:
            write_atomic(target, lambda temporary: copy(gzip.open(archive), temporary))
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DownloadError(
            f"{archive} could not be extracted ({exc}): delete it and download again"
        ) from exc
    _write_record(target, digest.hexdigest())


def _check_extracted(target: Path, name: str) -> bool:
    """Whether ``target`` (already there) is whole: its MD5 equals the one recorded when it was
    extracted (False, with a notice, when it differs: it is fetched again), or, put there by
    hand without a record or beside a damaged one, its format is right (a DataError naming the
    fix when it is not); a damaged record is then written anew."""
    recorded = _recorded_md5(target)
    if recorded is not None:
        digest = md5_of(target)
        if digest == recorded:
            return True
        print(
            f"note: {target} has MD5 {digest}, not the {recorded} it had when extracted; "
            "it is damaged: fetching it again",
            file=sys.stderr,
        )
        target.unlink()
        return False
    problem = _format_problem(target)
    if problem is not None:
        raise DataError(
            f"{target} is already there but {problem}; delete it and run "
            f"`delrec data download {name} --to {target.parent}` again"
        )
    if record_path(target).is_file():  # a damaged record: the file is whole, record it anew
        print(
            f"note: {record_path(target)} is damaged (not an MD5); {target} has the right "
            "format: its MD5 is recorded again",
            file=sys.stderr,
        )
        _write_record(target, md5_of(target))
    return True


def _format_problem(path: Path) -> str | None:
    """What is wrong with a data file put there by hand (``None``: it looks right): an HDF5
    file's signature and its last sample (a truncated file cannot give it), an idx file's
    header and size."""
    if path.suffix == ".h5":
        import h5py

        if not h5py.is_hdf5(path):
            return "it is not an HDF5 file"
        try:
            with h5py.File(path, "r", locking=False) as h5:  # as heidelberg.parse_file
                for key in ("spikes/times", "spikes/units", "labels"):
                    h5[key][len(h5[key]) - 1]
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            return f"it cannot be read to its end ({exc}): it is truncated or not a Heidelberg file"
        return None
    if "-idx" in path.name:
        from .mnist import read_idx

        try:
            read_idx(path)
        except DataError:
            return "it is not a whole idx file"
    return None


def _by_hand(name: str, resources: list[Resource], folder: Path) -> str:
    listing = "\n".join(
        f"  {r.url}  (md5 {r.md5}) -> extract to {folder / r.target}" for r in resources
    )
    return (
        f"Download the {name} files by hand and put them (extracted, or the archives for "
        f"`delrec data download {name} --to {folder}` to verify and extract) in "
        f"{folder}:\n{listing}"
    )


def download(
    name: str,
    to: Path,
    resources: list[Resource] | None = None,
    retries: int = 3,
    timeout: float = 30.0,
    progress: bool = True,
    mirror: str | None = None,
) -> list[Path]:
    """Fetch, verify and extract the files of data set ``name`` ("shd", "ssc", "mnist") into
    the folder ``to``; returns the extracted paths. ``resources`` replaces the official list
    (tests serve their own archives). ``mirror``: a base URL or folder holding the archives
    (default ``$DELREC_MIRROR``, else the official servers). An archive already in ``to`` is
    verified and used; one that fails its MD5 is reported (a DataError), not replaced. A file
    already extracted is verified (module docstring)."""
    if resources is None:
        if name not in RESOURCES:
            raise DataError(
                f"nothing to download for '{name}': choose one of {', '.join(RESOURCES)}"
            )
        resources = RESOURCES[name]
    if mirror is None:
        mirror = os.environ.get(MIRROR_VARIABLE) or None
    if mirror is not None:
        _check_mirror(mirror)
    to = Path(to)
    blocking = file_in_the_way(to)
    if blocking is not None:
        raise DataError(f"cannot put {name} in {to}: {blocking} is a file, not a folder")
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a read-only or special file system (/proc), no permission
        raise DataError(
            f"cannot put {name} in {to}: the folder cannot be made ({error.strerror or error}); "
            "give --to a folder you can write"
        ) from None

    def wait(holder: str) -> None:
        print(f"note: {holder} is downloading into {to}; waiting for it", file=sys.stderr)

    # one download per folder at a time: the next finds the files done and verifies them
    with waiting_lock(to / LOCK, wait):
        return [
            _fetch_resource(name, resource, resources, to, mirror, retries, timeout, progress)
            for resource in resources
        ]


def _fetch_resource(
    name: str,
    resource: Resource,
    resources: list[Resource],
    to: Path,
    mirror: str | None,
    retries: int,
    timeout: float,
    progress: bool,
) -> Path:
    """The extracted file of ``resource`` in ``to``: verified if already there, else
    extracted from the archive there (verified) or from a download."""
    target = to / resource.target
    if target.exists() and _check_extracted(target, name):
        return target
    archive = to / resource.archive
    if archive.exists():
        digest = md5_of(archive)
        if digest != resource.md5:
            raise DataError(
                f"{archive} fails its checksum: MD5 {digest}, expected {resource.md5}; it is "
                f"damaged or not the official {resource.archive}: delete it (or put the "
                "official file there) and run the command again"
            )
    else:
        url = resource.url_from(mirror)
        _check_mirror_holds(url, resource, resources)
        _download_verified(name, resource, url, archive, resources, to, retries, timeout, progress)
    _extract(archive, target)
    archive.unlink()
    return target


def _check_mirror(mirror: str) -> None:
    """A DataError unless ``mirror`` is an http(s) or file URL with somewhere to go, or an
    existing folder."""
    if "://" in mirror:
        parts = urllib.parse.urlsplit(mirror)
        if parts.scheme not in ("http", "https", "file") or (
            parts.scheme != "file" and not parts.netloc
        ):
            raise DataError(
                f"mirror {mirror!r} is not a URL delrec can fetch from: give an http(s):// "
                "address with a host, a file:// URL or a folder"
            )
    elif Path(mirror).expanduser().exists() and not Path(mirror).expanduser().is_dir():
        raise DataError(f"mirror {mirror} is a file, not a folder: give the folder of the archives")
    elif not Path(mirror).expanduser().is_dir():
        raise DataError(f"mirror folder {mirror} does not exist: give the folder of the archives")


def _check_mirror_holds(url: str, resource: Resource, resources: list[Resource]) -> None:
    """A DataError when ``url`` is a file of a mirror folder (``file://``) that is not there:
    it says which archives the folder must hold."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file":
        return
    path = Path(urllib.request.url2pathname(parts.path))
    if not path.is_file():
        names = ", ".join(r.archive for r in resources)
        raise DataError(
            f"the mirror folder {path.parent} holds no {resource.archive}: put the official "
            f"archives there ({names}), or leave out --mirror (and {MIRROR_VARIABLE}) to fetch "
            f"them from {urllib.parse.urlsplit(resource.url).netloc}"
        )


def _download_verified(
    name: str,
    resource: Resource,
    url: str,
    archive: Path,
    resources: list[Resource],
    to: Path,
    retries: int,
    timeout: float,
    progress: bool,
) -> None:
    part = archive.with_name(archive.name + ".part")
    for attempt in range(1 + retries):
        try:
            _fetch(url, part, timeout, progress)
            break
        except _Interrupted as exc:
            if attempt == retries:
                raise DownloadError(
                    f"the transfer of {url} broke off ({exc}) after "
                    f"{1 + retries} attempts; {part} keeps what arrived: run the "
                    "command again to resume"
                ) from exc
        except urllib.error.HTTPError as exc:
            raise DownloadError(
                f"{url} answered HTTP {exc.code} {exc.reason}.\n" + _by_hand(name, resources, to)
            ) from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            official = url == resource.url
            hint = (
                f"no network? (a mirror: --mirror URL or {MIRROR_VARIABLE})"
                if official
                else "is the mirror right, and does it hold this archive?"
            )
            raise DownloadError(
                f"cannot reach {url} ({reason}): {hint}\n" + _by_hand(name, resources, to)
            ) from exc
    digest = md5_of(part)
    if digest != resource.md5:
        part.unlink()
        if url.startswith("file:"):  # a copy on disk: fetching it again gives the same bytes
            raise DataError(
                f"{url} has MD5 {digest}, expected {resource.md5}: the archive in the mirror "
                "folder is damaged or another version; replace it with the official one.\n"
                + _by_hand(name, resources, to)
            )
        raise DownloadError(
            f"{url} arrived with MD5 {digest}, expected {resource.md5}; "
            "the download was removed: run the command again, or fetch the file "
            "by hand.\n" + _by_hand(name, resources, to)
        )
    os.replace(part, archive)
