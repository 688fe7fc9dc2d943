"""`delrec data download` against a local HTTP server on 127.0.0.1 serving generated archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import socket
import threading
import time
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from test_data_heidelberg import held_open_for_writing, random_samples, write_heidelberg

from delrec.cli import main as delrec_main
from delrec.data import RESOURCES, DataError, download, load_dataset
from delrec.data.fetch import Resource


class Handler(BaseHTTPRequestHandler):
    """Serves ``files``; the paths in ``truncate`` send half their body, then hang up; the paths
    in ``no_ranges`` ignore a Range header (200 and the whole body, as some servers do); the
    paths in ``slow`` send their body in ten pieces, 50 ms apart."""

    files: dict[str, bytes] = {}
    truncate: set[str] = set()
    no_ranges: set[str] = set()
    slow: set[str] = set()
    log: list[tuple[str, str | None]] = []

    def do_GET(self):
        self.log.append((self.path, self.headers.get("Range")))
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range") and self.path not in self.no_ranges:
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_error(416)  # Range Not Satisfiable
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in self.truncate:
            self.truncate.discard(self.path)
            self.wfile.write(body[start : start + (len(body) - start) // 2])
            self.close_connection = True
            return
        if self.path in self.slow:
            piece = -(-(len(body) - start) // 10)
            for offset in range(start, len(body), piece):
                self.wfile.write(body[offset : offset + piece])
                self.wfile.flush()
                time.sleep(0.05)
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Handler.files, Handler.truncate, Handler.no_ranges, Handler.slow = {}, set(), set(), set()
    Handler.log = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def zipped(name: str, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(name, payload)
    return buffer.getvalue()


def serve(base: str, path: str, archive: bytes, target: str, md5: str | None = None) -> Resource:
    Handler.files[path] = archive
    return Resource(base + path, md5 or hashlib.md5(archive).hexdigest(), target)


@pytest.fixture
def shd_archives(tmp_path_factory, server):
    src = tmp_path_factory.mktemp("src")
    resources = []
    for part, labels in (("train", list(range(20))), ("test", [3, 4, 5])):
        write_heidelberg(src / f"shd_{part}.h5", random_samples(len(labels), seed=9), labels)
        payload = (src / f"shd_{part}.h5").read_bytes()
        resources.append(
            serve(
                server, f"/shd_{part}.h5.zip", zipped(f"shd_{part}.h5", payload), f"shd_{part}.h5"
            )
        )
    return resources


def test_download_verifies_extracts_and_loads(tmp_path, shd_archives):
    paths = download("shd", tmp_path, resources=shd_archives, progress=False)
    assert [p.name for p in paths] == ["shd_train.h5", "shd_test.h5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "shd_test.h5",
        "shd_test.h5.md5",
        "shd_train.h5",
        "shd_train.h5.md5",
    ]
    for path in paths:  # md5sum format: the MD5 of the extracted file, two spaces, its name
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        assert (tmp_path / f"{path.name}.md5").read_text() == f"{digest}  {path.name}\n"
    assert load_dataset("shd", split="test", root=tmp_path).labels.tolist() == [3, 4, 5]
    requests = len(Handler.log)
    download("shd", tmp_path, resources=shd_archives, progress=False)  # already there
    assert len(Handler.log) == requests


def test_wrong_checksum_is_refused(tmp_path, server):
    bad = serve(server, "/mnist.gz", gzip.compress(b"idx"), "mnist", md5="0" * 32)
    with pytest.raises(DataError, match=r"mnist.gz arrived with MD5 [0-9a-f]{32}, expected 0{32}"):
        download("mnist", tmp_path, resources=[bad], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_truncated_transfer_resumes_with_a_range_request(tmp_path, server):
    payload = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    archive = gzip.compress(payload, compresslevel=0)
    resource = serve(server, "/t10k.gz", archive, "t10k")
    Handler.truncate.add("/t10k.gz")
    download("mnist", tmp_path, resources=[resource], progress=False)
    assert (tmp_path / "t10k").read_bytes() == payload
    half = len(archive) // 2
    assert Handler.log == [("/t10k.gz", None), ("/t10k.gz", f"bytes={half}-")]


def test_broken_transfer_keeps_the_part_file_for_the_next_run(tmp_path, server):
    archive = gzip.compress(bytes(range(256)) * 500, compresslevel=0)
    resource = serve(server, "/big.gz", archive, "big")
    Handler.truncate.add("/big.gz")
    with pytest.raises(DataError, match=r"broke off .* run the command again to resume"):
        download("mnist", tmp_path, resources=[resource], retries=0, progress=False)
    part = tmp_path / "big.gz.part"
    assert part.read_bytes() == archive[: len(archive) // 2]
    download("mnist", tmp_path, resources=[resource], retries=0, progress=False)
    assert (tmp_path / "big").read_bytes() == bytes(range(256)) * 500
    assert Handler.log[-1] == ("/big.gz", f"bytes={len(archive) // 2}-")
    assert not part.exists()


def test_a_server_that_ignores_the_range_restarts_the_transfer(tmp_path, server):
    """The resumed request gets 200 and the whole archive: the .part file is rewritten from
    the start (appending would corrupt it), verified and extracted."""
    payload = np.random.default_rng(1).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    archive = gzip.compress(payload, compresslevel=0)
    resource = serve(server, "/whole.gz", archive, "whole")
    Handler.truncate.add("/whole.gz")
    Handler.no_ranges.add("/whole.gz")
    download("mnist", tmp_path, resources=[resource], progress=False)
    assert (tmp_path / "whole").read_bytes() == payload
    half = len(archive) // 2
    assert Handler.log == [("/whole.gz", None), ("/whole.gz", f"bytes={half}-")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole", "whole.md5"]


def test_a_complete_part_file_is_not_fetched_again(tmp_path, server):
    """A .part holding the whole archive: the server answers the Range past its end with 416,
    and the file is verified and extracted as it is."""
    archive = gzip.compress(b"complete" * 1000)
    resource = serve(server, "/done.gz", archive, "done")
    (tmp_path / "done.gz.part").write_bytes(archive)
    Handler.files["/done.gz"] = archive
    download("mnist", tmp_path, resources=[resource], progress=False)
    assert (tmp_path / "done").read_bytes() == b"complete" * 1000
    assert Handler.log == [("/done.gz", f"bytes={len(archive)}-")]


def test_an_archive_put_there_by_hand_is_verified_and_extracted(tmp_path, server):
    archive = zipped("ssc_valid.h5", b"payload")
    resource = Resource(server + "/not-served.zip", hashlib.md5(archive).hexdigest(), "x.h5")
    (tmp_path / "not-served.zip").write_bytes(archive)
    download("ssc", tmp_path, resources=[resource], progress=False)
    assert (tmp_path / "x.h5").read_bytes() == b"payload" and Handler.log == []


def test_a_file_put_there_by_hand_is_checked_while_another_process_holds_it(tmp_path):
    """The format check of a file without a record reads it without HDF5's file lock (which
    fails while another process writes the file, or on NFS): it used to call it truncated."""
    write_heidelberg(tmp_path / "shd_test.h5", random_samples(3, seed=4), [1, 2, 3])
    resource = Resource("http://127.0.0.1:9/shd_test.h5.zip", "0" * 32, "shd_test.h5")
    with held_open_for_writing(tmp_path / "shd_test.h5"):
        assert download("shd", tmp_path, resources=[resource], progress=False) == [
            tmp_path / "shd_test.h5"
        ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shd_test.h5"]  # checked, kept


@pytest.mark.parametrize("record", [b"garbage  shd_train.h5\n", b"", b"\xff\xfe\x00\x81"])
def test_a_damaged_record_keeps_the_extracted_file_and_is_written_again(
    tmp_path, shd_archives, record, capsys
):
    """A .md5 record that is not an MD5 (text or binary) says nothing about the file: the file
    is kept, checked for its format, and its MD5 recorded again, with nothing fetched."""
    download("shd", tmp_path, resources=shd_archives[:1], progress=False)
    target, requests = tmp_path / "shd_train.h5", len(Handler.log)
    data = target.read_bytes()
    (tmp_path / "shd_train.h5.md5").write_bytes(record)
    assert download("shd", tmp_path, resources=shd_archives[:1], progress=False) == [target]
    assert target.read_bytes() == data and len(Handler.log) == requests
    assert "shd_train.h5.md5 is damaged" in capsys.readouterr().err
    digest = hashlib.md5(data).hexdigest()
    assert (tmp_path / "shd_train.h5.md5").read_text() == f"{digest}  shd_train.h5\n"


def test_two_downloads_into_one_folder_take_turns(tmp_path, server, capsys):
    """A second download into the folder (another job started at the same moment) waits for
    the first, naming it, then finds the file done: it used to append to the first one's
    ``.part`` file and fail with a bare FileNotFoundError."""
    payload = bytes(range(256)) * 4000
    resource = serve(server, "/slow.zip", zipped("slow.bin", payload), "slow.bin")
    Handler.slow.add("/slow.zip")
    errors = []

    def fetch():
        try:
            assert download("shd", tmp_path, resources=[resource], progress=False) == [
                tmp_path / "slow.bin"
            ]
        except BaseException as error:  # reported below, with the thread's error
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)  # the first is fetching when the second starts
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert (tmp_path / "slow.bin").read_bytes() == payload
    assert [path for path, _ in Handler.log] == ["/slow.zip"]  # fetched once
    assert "is downloading into" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.bin", "slow.bin.md5"]


def test_no_network_fails_at_once_and_says_where_to_put_the_files(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port on which nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    resource = Resource(f"http://127.0.0.1:{port}/shd_train.h5.zip", "0" * 32, "shd_train.h5")
    attempts = []
    real_urlopen = urllib.request.urlopen

    def counted(*args, **kwargs):
        attempts.append(args)
        return real_urlopen(*args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", counted)
    with pytest.raises(DataError) as err:
        download("shd", tmp_path / "shd", resources=[resource], retries=3, progress=False)
    assert len(attempts) == 1  # no retry, no back-off: it fails at once
    message = str(err.value)
    assert "cannot reach" in message and "by hand" in message
    assert str(tmp_path / "shd" / "shd_train.h5") in message


def test_http_error_says_where_to_put_the_files(tmp_path, server):
    missing = Resource(server + "/gone.zip", "0" * 32, "gone.h5")
    with pytest.raises(DataError, match=r"(?s)answered HTTP 404.*by hand"):
        download("ssc", tmp_path, resources=[missing], progress=False)


def test_cli_download(tmp_path, shd_archives, monkeypatch, capsys):
    monkeypatch.setitem(RESOURCES, "shd", shd_archives)
    assert delrec_main(["data", "download", "shd", "--to", str(tmp_path), "--quiet"]) == 0
    assert str(tmp_path / "shd_train.h5") in capsys.readouterr().out
    Handler.files.clear()
    (tmp_path / "shd_test.h5").unlink()
    assert delrec_main(["data", "download", "shd", "--to", str(tmp_path), "--quiet"]) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_cli_list_gives_the_sizes_and_settings_a_task_trains_with(capsys):
    assert delrec_main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "psmnist-mini" in out and "built in, no download" in out
    lines = out.splitlines()
    mini = next(i for i, line in enumerate(lines) if line.startswith("psmnist-mini"))
    assert "steps 49 " in lines[mini]  # the preset pools to 7 × 7, as `train --task` runs it
    assert "side=7 (default 28)" in lines[mini + 1]
    assert any("tau=30.0 (default 17.0)" in line for line in lines)  # Mackey-Glass's preset


def test_an_empty_data_variable_means_the_default_folder(monkeypatch, tmp_path):
    """``DELREC_DATA=""`` (an unset shell variable) named the current folder: a download
    wrote ./mnist there."""
    from delrec.data.registry import data_root

    monkeypatch.setenv("DELREC_DATA", " ")
    assert data_root() == Path("data")
    monkeypatch.setenv("DELREC_DATA", str(tmp_path))
    assert data_root() == tmp_path


def test_a_folder_that_cannot_be_made_is_named_before_any_transfer(tmp_path, monkeypatch, capsys):
    """`--to /proc/x` (a file system where nothing can be made) ended in a bare
    "[Errno 2] No such file or directory", exit code 1 (a failure at run time)."""
    real_mkdir = Path.mkdir

    def refused(self, *args, **kwargs):
        if self == tmp_path / "x":
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    assert delrec_main(["data", "download", "shd", "--to", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"cannot put shd in {tmp_path / 'x'}: the folder cannot be made (No such file" in err
    assert "give --to a folder you can write" in err
