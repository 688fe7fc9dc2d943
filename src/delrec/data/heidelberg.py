"""SHD and SSC: the Heidelberg spiking audio data sets, binned once and cached.

File layout (HDF5, read with h5py): ``spikes/times`` (ragged, seconds), ``spikes/units``
(ragged, channel ids 0…699), ``labels`` (N,), ``extra/…`` (metadata, not used).

Binning (:class:`Binning`): a spike at time t (rounded to the nearest microsecond) falls into
time bin ``floor(t / dt)`` — a spike exactly on an edge belongs to the later bin — and into
input ``unit // group`` (700 channels by 5 → 140 inputs). Entries are spike counts.
With a fixed number of bins (SSC: 250 bins of 5.6 ms = 1.4 s) spikes at or after the end of
the last bin are dropped. Without one (SHD), a sample has ``floor(t_last / dt) + 1`` bins.

Parsing happens once per file and binning setting; the result is cached as compact arrays in
``<data dir>/cache/`` (atomic write) and invalidated when the source file changes. A cache file
that cannot be read or does not hold what it should (truncated, overwritten) is rebuilt from
the source with a warning; temporaries of interrupted cache writes are cleared once they are
an hour old (another process may still be writing a younger one: the cache is shared).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delrec import files

from .core import DatasetInfo, SparseFrames
from .errors import DataError

NUM_UNITS = 700
MAX_DT_MS = 1e6  # 1000 s: one bin longer than any recording
# 2: ``empty`` counts the samples left without a spike by the binning; 3: the source stamp
# holds a digest of the file's content (another version's caches keep their own files)
CACHE_VERSION = 3
# a spike later than this is not a time in seconds of SHD or SSC (recordings of about 1 s)
MAX_SPIKE_TIME_S = 30.0
_CHUNK = 1024  # samples parsed per HDF5 read, bounds the memory used while binning


@dataclass(frozen=True)
class Binning:
    """How spike trains become frames: bin width ``dt_ms`` (milliseconds), a fixed number of
    bins ``steps`` (None: up to each sample's last spike) and ``group`` units per input."""

    dt_ms: float
    steps: int | None
    group: int = 5

    def __post_init__(self):
        if not 0.001 <= self.dt_ms <= MAX_DT_MS:
            raise DataError(
                f"bin width dt_ms={self.dt_ms} must be between 0.001 and {MAX_DT_MS:g} ms"
            )
        if not math.isclose(self.dt_ms * 1000, self.dt_us, rel_tol=1e-9):
            raise DataError(
                f"bin width dt_ms={self.dt_ms} is not a whole number of microseconds, the "
                f"resolution of the binning (it would bin by {self.dt_us / 1000:g} ms): give "
                "dt_ms in steps of 0.001"
            )
        if self.steps is not None and not 0 < self.steps < 2**16:
            raise DataError(f"steps={self.steps} must be between 1 and 65535 (or None)")
        if not 1 <= self.group <= NUM_UNITS:
            raise DataError(f"group={self.group} must be between 1 and {NUM_UNITS}")

    @property
    def dt_us(self) -> int:
        return int(round(self.dt_ms * 1000))

    @property
    def input_size(self) -> int:
        return -(-NUM_UNITS // self.group)

    def cache_name(self, source: Path) -> str:
        steps = "var" if self.steps is None else str(self.steps)
        return f"{source.stem}.dt{self.dt_us}us.T{steps}.g{self.group}.v{CACHE_VERSION}.npz"


def bin_spikes(
    times: list[np.ndarray],
    units: list[np.ndarray],
    binning: Binning,
) -> dict[str, np.ndarray]:
    """Bin ragged spike trains into sparse counts.

    ``times[i]`` (seconds) and ``units[i]`` (ids < 700) are sample i's spikes. Returns arrays
    ``offsets`` (N+1,), per-entry ``steps``, ``channels``, ``counts`` (uint16) sorted by
    sample, then time, then channel, and ``lengths`` (N,) bins per sample (≥ 1, an empty
    sample has one).
    Raises ValueError naming the first bad sample (negative, infinite or NaN time, unit out of
    range).
    """
    sizes = np.array([len(t) for t in times], dtype=np.int64)
    n = len(sizes)
    t_all = np.concatenate(times).astype(np.float64) if n else np.zeros(0)
    u_raw = np.concatenate(units) if n else np.zeros(0, np.int64)
    sample = np.repeat(np.arange(n), sizes)
    bad = u_raw >= NUM_UNITS  # before the cast: a uint64 id above 2⁶³ would read negative
    if bad.any():
        raise ValueError(
            f"sample {sample[bad.argmax()]} has unit id {u_raw[bad.argmax()]}, "
            f"outside 0…{NUM_UNITS - 1}"
        )
    u_all = u_raw.astype(np.int64)
    bad = ~((t_all >= 0) & (t_all < np.inf))
    if bad.any():
        raise ValueError(
            f"sample {sample[bad.argmax()]} has the spike time {t_all[bad.argmax()]}: spike "
            "times must be finite and >= 0 seconds"
        )
    bad = (u_all < 0) | (u_all >= NUM_UNITS)
    if bad.any():
        raise ValueError(
            f"sample {sample[bad.argmax()]} has unit id {u_all[bad.argmax()]}, "
            f"outside 0…{NUM_UNITS - 1}"
        )
    # a time past the last possible bin (2¹⁶) lands there: it is dropped or reported below,
    # and a huge time never overflows the integer conversion
    beyond = 2**16 * binning.dt_us
    step = np.rint(np.minimum(t_all * 1e6, beyond)).astype(np.int64) // binning.dt_us
    channel = u_all // binning.group
    if binning.steps is None:
        lengths = np.ones(n, dtype=np.int64)
        np.maximum.at(lengths, sample, step + 1)
        if lengths.max(initial=0) >= 2**16:
            raise ValueError(
                f"a sample spans {lengths.max()} bins of {binning.dt_ms} ms, more than 65535 "
                f"(its last spike at {t_all[sample == lengths.argmax()].max():g}): spike times "
                "are read in seconds, so convert times in ms or µs; else use a larger dt_ms or "
                "a fixed number of steps"
            )
    else:
        keep = step < binning.steps
        sample, step, channel = sample[keep], step[keep], channel[keep]
        lengths = np.full(n, binning.steps, dtype=np.int64)
    width = binning.input_size
    span = int(lengths.max(initial=1)) * width
    keys, counts = np.unique(sample * span + step * width + channel, return_counts=True)
    if counts.max(initial=0) >= 2**16:
        raise ValueError(
            f"a bin holds {counts.max()} spikes, more than 65535: use a smaller dt_ms or group"
        )
    entry_sample, rest = np.divmod(keys, span)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(entry_sample, minlength=n), out=offsets[1:])
    return {
        "offsets": offsets,
        "steps": (rest // width).astype(np.uint16),
        "channels": (rest % width).astype(np.uint16),
        "counts": counts.astype(np.uint16),
        "lengths": lengths.astype(np.uint16),
    }


def _concat_chunks(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    offsets = [np.zeros(1, dtype=np.int64)]
    total = 0
    for c in chunks:
        offsets.append(c["offsets"][1:] + total)
        total += int(c["offsets"][-1])
    out = {
        k: np.concatenate([c[k] for c in chunks])
        for k in ("steps", "channels", "counts", "lengths")
    }
    out["offsets"] = np.concatenate(offsets)
    return out


def parse_file(
    path: Path,
    binning: Binning,
    num_classes: int,
    dataset: str,
) -> dict[str, np.ndarray]:
    """Read one Heidelberg HDF5 file and bin it; every problem becomes a DataError naming
    ``path`` and the fix. Returns :func:`bin_spikes`'s arrays plus ``labels`` (N,) int64 and
    ``empty``, the indices of samples without any spike once binned (none in the file, or none
    within a fixed number of bins). More than half of the spikes after the last of a fixed
    number of bins is an error: their times are not in seconds."""
    import h5py

    fix = f"delete it and run `delrec data download {dataset} --to {path.parent}`"
    try:
        # no HDF5 file lock: a read needs none (the files are replaced only by a rename), and
        # taking one fails on file systems without locks (NFS, Lustre) or while another
        # process holds the file open for writing, which read as "corrupt: delete it" here
        h5 = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise DataError(
            f"{path} is not a readable HDF5 file ({exc}); it may be truncated or corrupt: {fix}"
        ) from exc
    with h5:
        try:
            _check_layout(h5, path, dataset, fix)
            labels = np.asarray(h5["labels"][()])
            n = len(labels)
            if len(h5["spikes/times"]) != n or len(h5["spikes/units"]) != n:
                raise DataError(
                    f"{path}: spikes/times, spikes/units and labels have different "
                    f"lengths ({len(h5['spikes/times'])}, {len(h5['spikes/units'])},"
                    f" {n}): {fix}"
                )
            chunks, spikes, latest = [], 0, 0.0
            for lo in range(0, n, _CHUNK):
                times = list(h5["spikes/times"][lo : lo + _CHUNK])
                units = list(h5["spikes/units"][lo : lo + _CHUNK])
                if any(len(t) != len(u) for t, u in zip(times, units)):
                    raise DataError(
                        f"{path}: a sample in {lo}…{lo + len(times) - 1} has "
                        f"different numbers of spike times and units: {fix}"
                    )
                spikes += sum(len(t) for t in times)
                latest = max([latest, *(float(np.max(t)) for t in times if len(t))])
                try:
                    chunks.append(bin_spikes(times, units, binning))
                except ValueError as exc:
                    raise DataError(
                        f"{path}: {exc} (sample numbers counted from {lo}): {fix}"
                    ) from exc
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{path} could not be read ({exc}); it may be truncated or corrupt: {fix}"
            ) from exc
    if n == 0:
        raise DataError(f"{path} holds no samples: {fix}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(
            f"{path}: labels must be integers in 0…{num_classes - 1} for "
            f"{dataset.upper()}, found values in {labels.min()}…{labels.max()}: {fix}"
        )
    if latest > MAX_SPIKE_TIME_S:
        raise DataError(
            f"{path}: the latest spike is at {latest:g}, while {dataset.upper()} recordings "
            f"last about a second: spike times are read in seconds, so convert times in ms or "
            f"µs (a file of recordings longer than {MAX_SPIKE_TIME_S:g} s is not one of these "
            "data sets)"
        )
    arrays = _concat_chunks(chunks)
    dropped = spikes - int(arrays["counts"].sum(dtype=np.int64))
    if binning.steps is not None and dropped > spikes / 2:
        end = binning.steps * binning.dt_ms / 1000
        raise DataError(
            f"{path}: {dropped / spikes:.0%} of the spikes fall after the last of the "
            f"{binning.steps} bins of {binning.dt_ms:g} ms ({end:g} s; the latest spike is at "
            f"{latest:g}): spike times are read in seconds, so convert times in ms or µs, or "
            "raise data.steps"
        )
    arrays["labels"] = labels.astype(np.int64)
    arrays["empty"] = np.flatnonzero(np.diff(arrays["offsets"]) == 0)
    return arrays


def _check_layout(h5, path: Path, dataset: str, fix: str) -> None:
    """A DataError unless ``h5`` holds the Heidelberg layout: 1-D ragged ``spikes/times``
    (floats) and ``spikes/units`` (integers), one array per sample, and 1-D integer
    ``labels``."""
    import h5py

    for key in ("spikes/times", "spikes/units", "labels"):
        if key not in h5:
            raise DataError(
                f"{path} has no '{key}' dataset, so it is not a Heidelberg "
                f"{dataset.upper()} file (expected spikes/times, spikes/units, labels): {fix}"
            )
        item = h5[key]
        if not isinstance(item, h5py.Dataset) or item.ndim != 1:
            found = f"a {item.ndim}-D dataset" if isinstance(item, h5py.Dataset) else "a group"
            raise DataError(
                f"{path}: '{key}' must be a 1-D dataset, one entry per sample; found {found}: {fix}"
            )
    for key, kinds, what in (
        ("spikes/times", "f", "real floats (seconds)"),
        ("spikes/units", "iu", "integers (channel ids)"),
    ):
        base = h5py.check_vlen_dtype(h5[key].dtype)
        if base is None:
            raise DataError(
                f"{path}: '{key}' must be ragged (variable-length), one array of {what} per "
                f"sample; found fixed-size {h5[key].dtype} entries, whose padding would read "
                f"as spikes: {fix}"
            )
        if base.kind not in kinds:
            raise DataError(f"{path}: '{key}' must hold {what}, found {base}: {fix}")
    if h5["labels"].dtype.kind not in "iu":
        raise DataError(
            f"{path}: labels must be integers (class ids), found {h5['labels'].dtype}: {fix}"
        )


def write_heidelberg(
    path: str | os.PathLike,
    samples,
    labels,
    time_dtype=np.float32,
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Write spike trains in the Heidelberg HDF5 layout (for synthetic data and tests).

    ``samples``: one ``(times in s, unit ids 0…699)`` pair of 1-D arrays per sample;
    ``labels``: ``(N,)`` class ids; ``extra``: metadata arrays stored under ``extra/``. Unit
    ids and labels must be whole numbers in 0…65535 (they are stored as uint16); a ValueError
    names one that is not, before anything is written.
    """
    import h5py

    labels = _whole_numbers(labels, "labels")
    samples = [
        (t, _whole_numbers(u, f"the unit ids of sample {i}")) for i, (t, u) in enumerate(samples)
    ]
    with h5py.File(path, "w") as f:
        times = f.create_dataset(
            "spikes/times", (len(samples),), dtype=h5py.vlen_dtype(np.dtype(time_dtype))
        )
        units = f.create_dataset(
            "spikes/units", (len(samples),), dtype=h5py.vlen_dtype(np.dtype(np.uint16))
        )
        for i, (t, u) in enumerate(samples):
            times[i] = np.asarray(t, dtype=time_dtype)
            units[i] = np.asarray(u, dtype=np.uint16)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.uint16))
        for name, values in (extra or {}).items():
            f.create_dataset(f"extra/{name}", data=values)


def _whole_numbers(values, what: str) -> np.ndarray:
    """``values`` as uint16, or a ValueError unless they are whole numbers in 0…65535 (a cast
    would wrap 65539 to 3 and cut 3.9 to 3)."""
    array = np.asarray(values)
    if array.size and (
        array.dtype.kind not in "iuf"
        or not np.all(np.isfinite(array))
        or not np.all(array == np.round(array))
        or array.min() < 0
        or array.max() > 65535
    ):
        raise ValueError(f"{what} must be whole numbers in 0…65535, got {array}")
    return array.astype(np.uint16)


def _source_stamp(path: Path) -> np.ndarray:
    """What a cache was made from: the file's size and modification time, and a digest of its
    labels and first and last spike times. A file changed in place with its size and time
    kept (``cp -p``, rsync, tar), or another folder's file of the same size and time sharing a
    cache folder, then differs; a copy of the data folder with its cache does not."""
    import h5py

    st = path.stat()
    digest = hashlib.sha256()
    try:
        with h5py.File(path, "r", locking=False) as h5:
            times = h5["spikes/times"]
            ends = sorted({0, len(times) - 1}) if len(times) else []
            for array in (h5["labels"][()], *(times[index] for index in ends)):
                digest.update(np.ascontiguousarray(array).tobytes())
    except (OSError, KeyError, TypeError, ValueError):
        pass  # an unreadable file: parsing it reports what is wrong
    content = int.from_bytes(digest.digest()[:8], "little", signed=True)
    return np.array([st.st_size, st.st_mtime_ns, content], dtype=np.int64)


def _write_cache(target: Path, arrays: dict[str, np.ndarray]) -> None:
    def save(temporary: Path) -> None:
        with open(temporary, "wb") as handle:  # a file object: np.savez adds no ".npz"
            np.savez(handle, **arrays)

    files.write_atomic(target, save)


def load_binned(
    path: Path,
    binning: Binning,
    num_classes: int,
    dataset: str,
    cache_dir: str | Path | None = None,
    keep_empty: bool = False,
) -> dict[str, np.ndarray]:
    """The binned arrays of ``path``, from the cache when it matches the file, else parsed and
    cached. Cache: ``cache_dir`` (default ``<file's directory>/cache``); when it cannot be
    written a warning is given and the data is used uncached.

    A sample without any spike in the file is an error unless ``keep_empty``: then it is an
    all-zero frame (one time bin, or the fixed number of steps)."""
    cache = Path(cache_dir or path.parent / "cache") / binning.cache_name(path)
    files.remove_temporaries(cache.parent, older_than=files.STALE_AFTER_S)
    arrays = _cached(cache, path)
    if arrays is None:
        stamp = _source_stamp(path)  # before parsing: a file replaced meanwhile is parsed again
        arrays = parse_file(path, binning, num_classes, dataset)
        try:
            _write_cache(cache, {**arrays, "source": stamp})
        except OSError as exc:
            warnings.warn(
                f"could not write the cache {cache} ({exc}); {path} will be parsed "
                "again next time: pass cache_dir= a writable directory",
                stacklevel=2,
            )
    empty = arrays.pop("empty")
    if len(empty) and not keep_empty:
        within = "" if binning.steps is None else f" within the {binning.steps} bins"
        raise DataError(
            f"{path}: {len(empty)} sample(s) have no spikes{within} (first: sample "
            f"{empty[0]}); pass keep_empty=True (on the command line: --set "
            "data.keep_empty=true) to use them as all-zero frames"
        )
    return arrays


CACHE_ARRAYS = ("offsets", "steps", "channels", "counts", "lengths", "labels", "empty", "source")


def _cached(cache: Path, path: Path) -> dict[str, np.ndarray] | None:
    """The arrays in ``cache`` if it exists, is whole and was made from ``path`` as it is; a
    cache that is damaged is reported (a warning) and ``None`` returned, to rebuild it."""
    if not cache.exists():
        return None
    try:
        with np.load(cache) as z:
            arrays = {k: z[k] for k in z.files}
        problem = _cache_problem(arrays)
    except Exception as error:  # zipfile, zlib, numpy and OS errors of a damaged file
        problem = f"{type(error).__name__}: {error}"
    if problem is not None:
        warnings.warn(
            f"the binning cache {cache} is damaged ({problem}); rebuilding it from {path}",
            stacklevel=3,
        )
        return None
    if not np.array_equal(arrays.pop("source"), _source_stamp(path)):
        return None  # the source file changed since: rebuild
    return arrays


def _cache_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """What is wrong with the arrays of a cache file, or ``None`` when they fit together."""
    missing = [name for name in CACHE_ARRAYS if name not in arrays]
    if missing:
        return f"no {', '.join(missing)}"
    offsets, entries = arrays["offsets"], len(arrays["steps"])
    samples = len(arrays["labels"])
    if not (
        len(offsets) == samples + 1
        and len(arrays["lengths"]) == samples
        and len(arrays["channels"]) == len(arrays["counts"]) == entries
        and offsets[0] == 0
        and offsets[-1] == entries
        and (np.diff(offsets) >= 0).all()
    ):
        return "its arrays do not fit together"
    return None


NUM_CLASSES = {"shd": 20, "ssc": 35}
FILES = {
    "shd": {"train": "shd_train.h5", "valid": "shd_train.h5", "test": "shd_test.h5"},
    "ssc": {"train": "ssc_train.h5", "valid": "ssc_valid.h5", "test": "ssc_test.h5"},
}


def heidelberg_info(name: str, binning: Binning) -> DatasetInfo:
    """Sizes of "shd" or "ssc" under ``binning``."""
    return DatasetInfo(name, "classification", binning.input_size, NUM_CLASSES[name], binning.steps)


def _source(root: Path, name: str, split: str) -> Path:
    path = root / FILES[name][split]
    holding = ", ".join(sorted(set(FILES[name].values())))
    if root.exists() and not root.is_dir():
        raise DataError(
            f"{name.upper()} directory {root} is a file, not a folder: point root= "
            f"(`--data-root` on the command line) at the folder holding {holding}"
        )
    if path.is_dir():
        raise DataError(f"{path} is a folder, not the HDF5 file: put {path.name} there instead")
    if not root.is_dir():
        raise DataError(
            f"{name.upper()} directory {root} does not exist: run `delrec data "
            f"download {name} --to {root}`, or point root= (`--data-root` on the "
            f"command line) at the folder holding {holding}"
        )
    if not path.is_file():
        raise DataError(
            f"{path} not found: run `delrec data download {name} --to {root}`, or "
            f"put {path.name} there by hand"
        )
    return path


def load_shd(
    root: Path,
    split: str,
    dt_ms: float = 10.0,
    steps: int | None = None,
    group: int = 5,
    valid_fraction: float = 0.2,
    split_seed: int = 0,
    keep_empty: bool = False,
    cache_dir: str | Path | None = None,
) -> SparseFrames:
    """SHD: train/valid are a seeded ``1 - valid_fraction`` / ``valid_fraction`` split of
    shd_train.h5, test is shd_test.h5. Items: ((T_i, 700/group) counts, label 0…19)."""
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"valid_fraction={valid_fraction} must be strictly between 0 and 1")
    binning = Binning(dt_ms, steps, group)
    path = _source(root, "shd", split)
    arrays = load_binned(path, binning, NUM_CLASSES["shd"], "shd", cache_dir, keep_empty)
    indices = None
    if split != "test":
        n = len(arrays["labels"])
        order = np.random.default_rng(split_seed).permutation(n)
        n_valid = int(round(valid_fraction * n))
        if not 0 < n_valid < n:
            raise DataError(
                f"{path} holds {n} sample(s), and valid_fraction={valid_fraction} of them "
                f"leaves no {'validation' if n_valid == 0 else 'training'} sample: each split "
                "needs one at least; choose another valid_fraction (--set "
                "data.valid_fraction=…) or use a file of more samples"
            )
        indices = np.sort(order[:n_valid] if split == "valid" else order[n_valid:])
    return SparseFrames(arrays, heidelberg_info("shd", binning), split, indices)


def load_ssc(
    root: Path,
    split: str,
    dt_ms: float = 5.6,
    steps: int | None = 250,
    group: int = 5,
    keep_empty: bool = False,
    cache_dir: str | Path | None = None,
) -> SparseFrames:
    """SSC from its official train/valid/test files. Items: ((steps, 700/group) counts,
    label 0…34); spikes at or after steps * dt_ms (1.4 s) are dropped."""
    binning = Binning(dt_ms, steps, group)
    path = _source(root, "ssc", split)
    arrays = load_binned(path, binning, NUM_CLASSES["ssc"], "ssc", cache_dir, keep_empty)
    return SparseFrames(arrays, heidelberg_info("ssc", binning), split)
