"""The files delrec writes: whole or not at all, one permission policy for every writer,
temporaries of interrupted writes recognised and removed."""

import gzip
import os
import stat
from pathlib import Path

import pytest
import torch

from delrec import files
from delrec.checkpoint import save_checkpoint
from delrec.data import download, heidelberg, load_dataset
from delrec.data.fetch import Resource, md5_of, record_path
from delrec.deploy.report import hardware_report, write_report
from delrec.models import NetworkConfig, build_network
from delrec.training import figures


@pytest.fixture
def umask_027():
    """A umask other than the usual 022, to see that files honour it."""
    previous = os.umask(0o027)
    yield 0o640
    os.umask(previous)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "sub" / "notes.txt"
    files.write_text(target, "first\n")

    def broken(temporary: Path) -> None:
        temporary.write_text("half of the secon", encoding="utf-8")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.write_atomic(target, broken)
    assert target.read_text() == "first\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["notes.txt"]


def test_stale_temporaries_are_recognised_and_removed(tmp_path):
    seen = []
    files.write_atomic(tmp_path / "last.pt", lambda temporary: seen.append(temporary))
    assert files.temporary_target(seen[0]) == "last.pt" and not seen[0].exists()
    # a killed writer leaves its temporary behind: two of them, named as write_atomic names them
    left = [tmp_path / ".last.pt.0a1b2c3d.tmp", tmp_path / ".model.nir.89abcdef.tmp"]
    for path in left:
        path.write_bytes(b"partial")
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden.tmp", tmp_path / "last.pt"]
    for path in keep:
        path.write_bytes(b"mine")
    assert [files.temporary_target(p) for p in left] == ["last.pt", "model.nir"]
    assert [files.temporary_target(p) for p in keep] == [None, None, None]
    assert files.remove_temporaries(tmp_path, ["last.pt"]) == [left[0]]
    assert files.remove_temporaries(tmp_path) == [left[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)


def _tiny_network():
    return build_network(NetworkConfig(1, (4,), 3, neuron={"reset": "hard"}), seed=0).eval()


def _write_checkpoint(folder: Path) -> list[Path]:
    path = folder / "checkpoints" / "best.pt"
    save_checkpoint({"weights": torch.ones(3)}, path)
    return [path]


def _write_report(folder: Path) -> list[Path]:
    return list(write_report(hardware_report(_tiny_network()), folder / "report"))


def _write_nir(folder: Path) -> list[Path]:
    pytest.importorskip("nir", reason="NIR export needs the optional `nir` package")
    from delrec.deploy import export_nir

    export_nir(_tiny_network(), folder / "model.nir")
    return [folder / "model.nir"]


def _write_cache(folder: Path) -> list[Path]:
    heidelberg.write_heidelberg(folder / "shd_test.h5", [([0.1], [3])], [1])
    load_dataset("shd", "test", root=folder)
    return list((folder / "cache").iterdir())


def _write_download(folder: Path) -> list[Path]:
    """An archive put there by hand, verified and extracted: the file and its MD5 record."""
    archive = folder / "labels.gz"
    archive.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9])))
    resource = Resource("http://127.0.0.1:9/labels.gz", md5_of(archive), "t10k-labels-idx1-ubyte")
    (target,) = download("mnist", folder, resources=[resource], progress=False)
    return [target, record_path(target)]


def _write_figure(folder: Path) -> list[Path]:
    path = folder / "figures" / "raster.png"
    figures.spike_raster([torch.zeros(5, 3)], path)
    return [path]


@pytest.mark.parametrize(
    "writer",
    [_write_checkpoint, _write_report, _write_nir, _write_cache, _write_download, _write_figure],
    ids=["checkpoint", "report", "nir", "data-cache", "download", "figure"],
)
def test_every_writer_creates_files_with_one_mode_under_the_umask(tmp_path, umask_027, writer):
    written = writer(tmp_path)
    assert written
    for path in written:
        assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == umask_027, path.name
    assert not [p for p in tmp_path.rglob(".*.tmp")]


def test_a_write_that_cannot_happen_names_the_target_and_keeps_the_old_file(tmp_path):
    import errno

    with pytest.raises(
        IsADirectoryError, match=f"{tmp_path} is a folder: remove it, or give the path of a file"
    ):
        files.write_text(tmp_path, "x")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("old")
    with pytest.raises(NotADirectoryError, match=f"{blocker} is a file, not a folder"):
        files.write_text(blocker / "sub" / "out.json", "x")

    def disk_full(temporary):
        temporary.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"cannot write {blocker}: No space left on device"):
        files.write_atomic(blocker, disk_full)
    assert blocker.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt"
    ]
