"""SHD/SSC: hand-computed binning of small files in the real layout, caching, splits, errors."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from delrec.data import DataError, dataset_info, heidelberg, load_dataset


def write_heidelberg(path, samples, labels, time_dtype=np.float32):
    """A Heidelberg-layout file with the metadata the real files carry under ``extra/``."""
    heidelberg.write_heidelberg(
        path,
        samples,
        labels,
        time_dtype,
        extra={
            "speaker": np.zeros(len(samples), dtype=np.uint16),
            "keys": np.array([b"zero", b"one"]),
        },
    )


def random_samples(n, seed=0, max_time=0.9):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(5, 40))
        out.append((np.sort(rng.uniform(0, max_time, k)), rng.integers(0, 700, k)))
    return out


# sample 0 of the hand-computed example: (time s, unit) -> (10 ms bin, unit // 5)
EDGE_SAMPLE = ([0.0, 0.0099, 0.010, 0.0305, 0.030, 0.0301], [0, 4, 5, 699, 3, 699])


@pytest.fixture
def shd_dir(tmp_path):
    write_heidelberg(tmp_path / "shd_train.h5", random_samples(20, seed=1), list(range(20)))
    write_heidelberg(
        tmp_path / "shd_test.h5",
        [EDGE_SAMPLE, ([0.5], [10])] + random_samples(3, seed=2),
        [7, 19, 0, 1, 2],
    )
    return tmp_path


def test_shd_binning_matches_hand_count(shd_dir):
    frames, label = load_dataset("shd", split="test", root=shd_dir)[0]
    expected = np.zeros((4, 140), dtype=np.float32)
    expected[0, 0] = 2  # 0.0 s and 0.0099 s, units 0 and 4
    expected[1, 1] = 1  # 0.010 s lies on the edge: the later bin
    expected[3, 139] = 2  # 0.0305 s and 0.0301 s, units 699
    expected[3, 0] = 1  # 0.030 s on an edge, unit 3
    assert label == 7
    assert frames.dtype == torch.float32
    np.testing.assert_array_equal(frames.numpy(), expected)


def test_fixed_steps_drop_spikes_after_the_last_bin(shd_dir):
    write_heidelberg(shd_dir / "ssc_train.h5", [EDGE_SAMPLE], [34])
    ds = load_dataset("ssc", split="train", root=shd_dir, dt_ms=10.0, steps=3)
    frames, label = ds[0]
    expected = np.zeros((3, 140), dtype=np.float32)
    expected[0, 0], expected[1, 1] = 2, 1  # everything at or after 30 ms is dropped
    np.testing.assert_array_equal(frames.numpy(), expected)
    assert label == 34


def test_ssc_default_binning_250_bins_over_1_4_s(tmp_path):
    sample = ([0.00559, 0.0056, 1.3999, 1.4, 2.0], [0, 1, 2, 3, 4])
    write_heidelberg(tmp_path / "ssc_valid.h5", [sample], [3], time_dtype=np.float16)
    frames, _ = load_dataset("ssc", split="valid", root=tmp_path)[0]
    assert frames.shape == (250, 140)
    # float16 rounds 1.3999 to 1.3994 s: still bin 249; 1.4 s and 2.0 s are dropped
    assert {tuple(ix) for ix in np.argwhere(frames.numpy())} == {(0, 0), (1, 0), (249, 0)}
    assert frames.sum() == 3


def test_grouping_is_configurable(shd_dir):
    ds = load_dataset("shd", split="test", root=shd_dir, group=10, dt_ms=100.0)
    frames, label = ds[1]
    assert ds.info.input_size == 70 == dataset_info("shd", group=10).input_size
    assert frames.shape == (6, 70) and frames[5, 1] == 1 and frames.sum() == 1 and label == 19


def test_shd_split_is_seeded_disjoint_and_complete(shd_dir):
    train = load_dataset("shd", split="train", root=shd_dir)
    valid = load_dataset("shd", split="valid", root=shd_dir)
    assert (len(train), len(valid)) == (16, 4)
    assert set(train.indices).isdisjoint(valid.indices)
    assert set(train.indices) | set(valid.indices) == set(range(20))
    again = load_dataset("shd", split="valid", root=shd_dir)
    other = load_dataset("shd", split="valid", root=shd_dir, split_seed=1)
    np.testing.assert_array_equal(valid.indices, again.indices)
    assert not np.array_equal(valid.indices, other.indices)
    assert train.info.num_classes == 20 and train.info.steps is None


def test_cache_is_used_and_follows_the_source(shd_dir, monkeypatch):
    load_dataset("shd", split="test", root=shd_dir)
    caches = list((shd_dir / "cache").iterdir())
    assert [c.name for c in caches] == [
        f"shd_test.dt10000us.Tvar.g5.v{heidelberg.CACHE_VERSION}.npz"
    ]

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed the HDF5 file again")

    with monkeypatch.context() as m:
        m.setattr(heidelberg, "parse_file", no_parse)
        frames, label = load_dataset("shd", split="test", root=shd_dir)[1]
    assert label == 19 and frames[50, 2] == 1

    write_heidelberg(shd_dir / "shd_test.h5", [([0.25], [20])], [5])  # the file changes
    os.utime(shd_dir / "shd_test.h5", ns=(1, 1))
    frames, label = load_dataset("shd", split="test", root=shd_dir)[0]
    assert label == 5 and frames[25, 4] == 1
    load_dataset("shd", split="test", root=shd_dir, dt_ms=5.0)
    assert len(list((shd_dir / "cache").iterdir())) == 2


def test_a_copy_of_the_data_folder_keeps_using_its_cache(shd_dir, tmp_path, monkeypatch):
    """`cp -a` of the data folder to a node's local disk: its cache still applies (a stamp
    holding the file's path made every job parse SSC again)."""
    load_dataset("shd", split="test", root=shd_dir)  # writes shd_dir/cache
    copy = tmp_path / "copy"
    shutil.copytree(shd_dir, copy)  # copy2: times kept

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed the HDF5 file again")

    monkeypatch.setattr(heidelberg, "parse_file", no_parse)
    assert load_dataset("shd", split="test", root=copy)[1][1] == 19


def test_a_cache_follows_content_that_keeps_size_and_time(shd_dir, tmp_path):
    """The cache was keyed by the file's size and modification time only: relabelled in place
    with its time restored (as `cp -p`, rsync and tar keep it), or another folder's file of
    the same size and time sharing a cache folder, served the old labels."""
    source = shd_dir / "shd_test.h5"
    cache = tmp_path / "cache"
    before = load_dataset("shd", split="test", root=shd_dir, cache_dir=cache).labels.copy()
    stat = source.stat()
    with h5py.File(source, "r+") as h5:
        h5["labels"][...] = 19 - h5["labels"][()]
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source.stat().st_size == stat.st_size
    after = load_dataset("shd", split="test", root=shd_dir, cache_dir=cache).labels
    np.testing.assert_array_equal(after, 19 - before)
    first = load_dataset("shd", split="test", root=shd_dir, cache_dir=cache)[0][0]
    with h5py.File(source, "r+") as h5:  # the first sample's spikes a step later, same size
        h5["spikes/times"][0] = h5["spikes/times"][0] + np.float32(0.01)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    moved = load_dataset("shd", split="test", root=shd_dir, cache_dir=cache)[0][0]
    assert moved.shape[0] == first.shape[0] + 1 and torch.equal(moved[1:], first)

    other = tmp_path / "other"
    other.mkdir()
    (other / "shd_test.h5").write_bytes(source.read_bytes())
    with h5py.File(other / "shd_test.h5", "r+") as h5:
        h5["labels"][...] = np.zeros_like(h5["labels"][()])
    os.utime(other / "shd_test.h5", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    theirs = load_dataset("shd", split="test", root=other, cache_dir=cache).labels
    assert not theirs.any()
    mine = load_dataset("shd", split="test", root=shd_dir, cache_dir=cache).labels
    np.testing.assert_array_equal(mine, 19 - before)


@pytest.mark.parametrize(
    "samples, labels, problem",
    [
        ([([0.01], [65536 + 3])], [0], "the unit ids of sample 0 must be whole numbers"),
        ([([0.01], [3.9])], [0], "the unit ids of sample 0 must be whole numbers"),
        ([([0.01], [-1])], [0], "the unit ids of sample 0 must be whole numbers"),
        ([([0.01], [3])], [65536 + 4], "labels must be whole numbers in 0…65535"),
        ([([0.01], [3])], [3.7], "labels must be whole numbers in 0…65535"),
    ],
)
def test_the_writer_refuses_ids_and_labels_a_cast_would_change(tmp_path, samples, labels, problem):
    """Stored as uint16, 65539 became 3, 3.9 became 3 and -1 became 65535, without a word."""
    with pytest.raises(ValueError, match=problem):
        write_heidelberg(tmp_path / "shd_test.h5", samples, labels)
    assert not (tmp_path / "shd_test.h5").exists()


def test_bin_widths_and_values_the_binning_cannot_read_as_given_are_named(tmp_path):
    """dt_ms=0.0015 binned by 2 µs and 0.0006 (below the stated minimum) by 1 µs; a complex
    time read as its real part; a uint64 unit id of 2⁶⁴-1 was reported as -1."""
    for dt_ms, problem in [
        (0.0015, "dt_ms=0.0015 is not a whole number of microseconds"),
        (0.0006, "dt_ms=0.0006 must be between 0.001 and"),
    ]:
        with pytest.raises(DataError, match=problem):
            heidelberg.Binning(dt_ms, None)
    heidelberg.Binning(0.003, None)  # 3 µs
    heidelberg.Binning(5.6, 250)
    for name, dtype, values, problem in [
        ("spikes/times", np.complex64, [0.01 + 3j], r"must hold real floats \(seconds\)"),
        ("spikes/units", np.uint64, [2**64 - 1], "unit id 18446744073709551615, outside 0…699"),
    ]:
        path = tmp_path / "shd_test.h5"
        write_heidelberg(path, [([0.01], [3])], [0])
        with h5py.File(path, "r+") as h5:
            del h5[name]
            data = h5.create_dataset(name, (1,), dtype=h5py.vlen_dtype(np.dtype(dtype)))
            data[0] = np.asarray(values, dtype=dtype)
        with pytest.raises(DataError, match=problem):
            load_dataset("shd", split="test", root=tmp_path, cache_dir=tmp_path / name[7:])


def test_a_source_replaced_while_it_is_parsed_is_parsed_again_next_time(shd_dir, monkeypatch):
    """`data download` replaces a file by a rename: the cache of the old file, parsed while
    the new one arrived, carries the old file's stamp, so the next load parses the new one."""
    parse = heidelberg.parse_file

    def parse_then_replace(path, *args):
        arrays = parse(path, *args)
        write_heidelberg(path.with_suffix(".new"), [([0.25], [20])], [5])
        os.replace(path.with_suffix(".new"), path)
        return arrays

    with monkeypatch.context() as m:
        m.setattr(heidelberg, "parse_file", parse_then_replace)
        assert len(load_dataset("shd", split="test", root=shd_dir)) == 5  # the old file
    again = load_dataset("shd", split="test", root=shd_dir)
    assert len(again) == 1 and again[0][1] == 5


@pytest.mark.parametrize(
    "task, longest, message",
    [
        (
            "ssc",
            0.9,
            r"ssc_test.h5: the latest spike is at 8\d\d.*, while SSC recordings last about a "
            r"second: spike times are read in seconds",
        ),
        (
            "shd",
            0.9,
            r"spans \d+ bins of 10.0 ms, more than 65535 \(its last spike at 8\d\d.*in seconds",
        ),
        (  # 60,000 bins of mostly nothing: under the bin limit, so it loaded without a word
            "shd",
            0.6,
            r"shd_test.h5: the latest spike is at 5\d\d.*, while SHD recordings last about a "
            r"second: spike times are read in seconds, so convert times in ms",
        ),
    ],
)
def test_spike_times_not_in_seconds_are_refused(tmp_path, task, longest, message):
    """Times in milliseconds put every spike after SSC's last bin, or SHD's samples beyond
    65535 bins or at tens of thousands of nearly empty ones: refused, naming seconds, where
    SSC's binning dropped them and trained on empty frames."""
    samples = random_samples(6, seed=3, max_time=longest)
    write_heidelberg(tmp_path / f"{task}_test.h5", [(t * 1000, u) for t, u in samples], [0] * 6)
    with pytest.raises(DataError, match=message):
        load_dataset(task, split="test", root=tmp_path)


def test_a_sample_whose_spikes_all_fall_after_the_last_bin_counts_as_empty(tmp_path):
    write_heidelberg(
        tmp_path / "ssc_test.h5",
        [([0.1, 0.2, 0.3], [0, 1, 2]), ([1.5, 1.6], [0, 1])] * 3,
        [0, 1] * 3,
    )
    with pytest.raises(
        DataError, match=r"3 sample\(s\) have no spikes within the 250 bins \(first: sample 1\)"
    ):
        load_dataset("ssc", split="test", root=tmp_path)
    frames, _ = load_dataset("ssc", split="test", root=tmp_path, keep_empty=True)[1]
    assert frames.shape == (250, 140) and frames.sum() == 0


def _layout(path, times=None, units=None, labels=None):
    """A Heidelberg file of 3 samples with one dataset replaced."""
    with h5py.File(path, "w") as f:
        for key, given, base in (
            ("spikes/times", times, np.float32),
            ("spikes/units", units, np.uint16),
        ):
            if given is None:
                data = f.create_dataset(key, (3,), dtype=h5py.vlen_dtype(base))
                for i in range(3):
                    data[i] = np.array([0.1 * (i + 1)], dtype=base) if base is np.float32 else [i]
            else:
                f.create_dataset(key, data=given)
        f.create_dataset("labels", data=np.arange(3, dtype=np.uint16) if labels is None else labels)


@pytest.mark.parametrize(
    "replaced, message",
    [
        (
            {"times": np.zeros((3, 4), np.float32), "units": np.zeros((3, 4), np.uint16)},
            r"'spikes/times' must be a 1-D dataset.*found a 2-D dataset",
        ),
        ({"times": np.float32(0.1)}, r"'spikes/times' must be a 1-D dataset.*found a 0-D"),
        (
            {"times": np.zeros(3, np.float32)},
            r"'spikes/times' must be ragged \(variable-length\).*padding would read as spikes",
        ),
        ({"labels": np.zeros((3, 1), np.uint16)}, r"'labels' must be a 1-D dataset.*2-D"),
        (
            {"labels": np.array([b"a", b"b", b"c"])},
            r"labels must be integers \(class ids\), found \|S1",
        ),
        ({"labels": np.uint16(1)}, r"'labels' must be a 1-D dataset"),
    ],
)
def test_a_file_of_another_layout_is_refused_naming_the_dataset(tmp_path, replaced, message):
    _layout(tmp_path / "shd_test.h5", **replaced)
    with pytest.raises(DataError, match=message):
        load_dataset("shd", split="test", root=tmp_path)


def test_float_unit_ids_are_refused_not_truncated(tmp_path):
    with h5py.File(tmp_path / "shd_test.h5", "w") as f:
        units = f.create_dataset("spikes/units", (1,), dtype=h5py.vlen_dtype(np.float32))
        units[0] = np.array([3.9], np.float32)
        times = f.create_dataset("spikes/times", (1,), dtype=h5py.vlen_dtype(np.float32))
        times[0] = np.array([0.1], np.float32)
        f.create_dataset("labels", data=np.zeros(1, np.uint16))
    with pytest.raises(
        DataError, match=r"'spikes/units' must hold integers \(channel ids\), found float32"
    ):
        load_dataset("shd", split="test", root=tmp_path)


def test_unreadable_cache_is_rebuilt(shd_dir):
    load_dataset("shd", split="test", root=shd_dir)
    cache = next((shd_dir / "cache").iterdir())
    cache.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"binning cache .* is damaged .*; rebuilding it"):
        assert load_dataset("shd", split="test", root=shd_dir)[0][1] == 7


@pytest.mark.parametrize(
    "valid_fraction, split, empty", [(0.01, "valid", "validation"), (0.99, "train", "training")]
)
def test_a_valid_fraction_that_leaves_a_split_empty_is_refused(
    shd_dir, valid_fraction, split, empty
):
    with pytest.raises(DataError, match=f"holds 20 sample.*leaves no {empty} sample"):
        load_dataset("shd", split=split, root=shd_dir, valid_fraction=valid_fraction)


def test_bin_widths_beyond_any_recording_are_refused(shd_dir):
    for dt_ms in (1e300, 0.0004):
        with pytest.raises(DataError, match=re.escape(f"dt_ms={dt_ms} must be between 0.001")):
            dataset_info("shd", dt_ms=dt_ms)


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*delrec data download shd"):
        load_dataset("shd", root=tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"shd_test.h5 not found.*delrec data download shd"):
        load_dataset("shd", split="test", root=tmp_path)
    (tmp_path / "shd_test.h5").mkdir()  # the messages named a missing folder and file
    with pytest.raises(DataError, match=r"shd_test.h5 is a folder, not the HDF5 file"):
        load_dataset("shd", split="test", root=tmp_path)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DataError, match=r"a-file is a file, not a folder: point root="):
        load_dataset("shd", split="test", root=tmp_path / "a-file")
    with pytest.raises(DataError, match=r"ssc_valid.h5 not found"):
        load_dataset("ssc", split="valid", root=tmp_path)


def test_corrupt_and_truncated_files(tmp_path):
    (tmp_path / "shd_train.h5").write_bytes(b"not an hdf5 file at all" * 100)
    with pytest.raises(DataError, match=r"shd_train.h5 is not a readable HDF5 file.*download"):
        load_dataset("shd", root=tmp_path)
    write_heidelberg(tmp_path / "shd_test.h5", random_samples(50), [1] * 50)
    data = (tmp_path / "shd_test.h5").read_bytes()
    (tmp_path / "shd_test.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"shd_test.h5.*(truncated|corrupt)"):
        load_dataset("shd", split="test", root=tmp_path)


def test_wrong_layout_names_the_missing_key(tmp_path):
    with h5py.File(tmp_path / "shd_test.h5", "w") as f:
        f.create_dataset("spikes/times", (1,), dtype=h5py.vlen_dtype(np.float32))
        f.create_dataset("labels", data=np.zeros(1, dtype=np.uint16))
    with pytest.raises(DataError, match=r"shd_test.h5 has no 'spikes/units'"):
        load_dataset("shd", split="test", root=tmp_path)


@pytest.mark.parametrize(
    "samples, labels, message",
    [
        ([([0.1], [1])], [20], r"labels must be integers in 0…19"),
        ([([0.1], [700])], [0], r"unit id 700"),
        ([([-0.1], [0])], [0], r"sample 3 has the spike time -0.1\d*: .* finite and >= 0"),
        ([([np.inf], [0])], [0], r"sample 3 has the spike time inf: .* finite and >= 0"),
        ([([np.nan], [0])], [0], r"sample 3 has the spike time nan: .* finite and >= 0"),
        ([([0.1, 0.2], [1])], [0], r"different numbers of spike times and units"),
    ],
)
def test_bad_content(tmp_path, samples, labels, message):
    write_heidelberg(tmp_path / "shd_test.h5", [([0.3], [0])] * 3 + samples, [0] * 3 + labels)
    with pytest.raises(DataError, match=message) as err:
        load_dataset("shd", split="test", root=tmp_path)
    assert "shd_test.h5" in str(err.value)


def test_empty_samples_are_an_error_unless_kept(tmp_path):
    write_heidelberg(tmp_path / "shd_test.h5", [([0.3], [0]), ([], [])], [0, 1])
    with pytest.raises(DataError, match=r"shd_test.h5: 1 sample\(s\) have no spikes.*keep_empty"):
        load_dataset("shd", split="test", root=tmp_path)
    ds = load_dataset("shd", split="test", root=tmp_path, keep_empty=True)
    frames, label = ds[1]
    assert frames.shape == (1, 140) and frames.sum() == 0 and label == 1


@contextlib.contextmanager
def held_open_for_writing(path):
    """Another process holds the HDF5 file ``path`` open for writing (and HDF5's lock on it)
    while the block runs."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, h5py; f = h5py.File(sys.argv[1], 'a'); print('open', flush=True); "
            "sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(OSError, match="unable to lock file"):  # what a locking read meets
            h5py.File(path, "r")
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_file_another_process_holds_open_for_writing_is_read(shd_dir):
    """HDF5's file lock fails on file systems without locks (NFS, Lustre) and while another
    process has the file open for writing; reads take none. The error used to call the file
    corrupt and say to delete it."""
    with held_open_for_writing(shd_dir / "shd_test.h5"):
        frames, label = load_dataset("shd", split="test", root=shd_dir)[0]
    assert label == 7 and frames.shape == (4, 140)
