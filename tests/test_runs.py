"""The run directory: its files written with the one policy of delrec.files, one process at a
time per run directory (real processes), stale temporaries cleared under the lock; and one
exit code for one kind of error in every command."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_train_run import keep_thread_count  # noqa: F401  (the digits preset sets 1 thread)

from delrec.checkpoint import CheckpointError, read_checkpoint
from delrec.cli import main
from delrec.commands import UsageError, exit_code
from delrec.config import ConfigError
from delrec.data import DataError, DownloadError
from delrec.runs import LOCK, RunDir, RunError, RunInUse
from delrec.training import TrainingError

WAIT_S = 120
# digits-8x8 on 32 images and 4 neurons: a run that stays busy until it is stopped
LONG_RUN = [
    "--task",
    "digits-8x8",
    "--epochs",
    "1000",
    "--set",
    "max_train_samples=32",
    "network.hidden_sizes=[4]",
    "--no-progress",
]


@pytest.fixture
def umask_027():
    """A umask other than the usual 022, to see that files honour it."""
    previous = os.umask(0o027)
    yield 0o640
    os.umask(previous)


def test_run_files_are_written_with_the_one_policy(tmp_path, umask_027):
    run = RunDir(tmp_path)
    run.write_metrics([{"epoch": 1, "loss": 0.5}])
    run.write_results({"nmse": 0.1})
    run.save_checkpoint("last", {"epoch": 1})
    for name in ("metrics.csv", "test_results.json", "checkpoints/last.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == umask_027, name
    assert run.read_metrics() == [{"epoch": "1", "loss": "0.5"}]
    assert run.read_results() == {"nmse": 0.1}


# --------------------------------------------------------------------------- the lock
def test_the_lock_is_released_and_a_new_directory_it_made_is_removed_if_empty(tmp_path):
    run = RunDir(tmp_path / "fresh")
    with run.lock():
        assert (run.path / LOCK).is_file()
        with pytest.raises(RunInUse, match=f"pid {os.getpid()} on host"):
            with RunDir(run.path).lock():  # another open file: refused as another process
                pass
    assert not run.path.exists()
    with run.lock():
        (run.path / "notes.txt").write_text("kept")
    assert sorted(p.name for p in run.path.iterdir()) == ["notes.txt"]
    for inside in ("notes.txt", "notes.txt/sub"):
        with pytest.raises(RunError, match="notes.txt is a file, not a folder; give a directory"):
            with RunDir(run.path / inside).lock():
                pass


@contextmanager
def delrec_process(*args: str):
    """``python -m delrec ARGS`` in its own session, killed on the way out."""
    process = subprocess.Popen(
        [sys.executable, "-m", "delrec", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def wait_until_holding(process: subprocess.Popen, run_dir: Path) -> None:
    """Until ``process`` has written the run's config.json and holds its lock."""
    deadline = time.monotonic() + WAIT_S
    while True:
        lock = run_dir / LOCK
        holder = lock.read_text() if lock.is_file() else ""
        if (run_dir / "config.json").is_file() and f'"pid": {process.pid},' in holder:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the process did not start training"
        time.sleep(0.05)


def test_one_process_at_a_time_trains_in_a_run_directory(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with delrec_process("train", "--run-dir", str(run_dir), *LONG_RUN) as first:
        wait_until_holding(first, run_dir)
        # a second training into the same directory, and a resume of it, stop at once
        assert main(["train", "--run-dir", str(run_dir), *LONG_RUN]) == 2
        err = capsys.readouterr().err
        assert f"run directory {run_dir} is in use by pid {first.pid} on host" in err
        assert "started" in err
        assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 2
        assert f"in use by pid {first.pid}" in capsys.readouterr().err
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert f'"pid": {first.pid},' in (run_dir / LOCK).read_text()  # the dead process's lock

    # the stale lock is taken over with a notice; interrupted writes of the run are cleared
    stale = run_dir / "checkpoints" / ".last.pt.0a1b2c3d.tmp"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"partial")
    foreign = run_dir / ".model.nir.0a1b2c3d.tmp"  # not a file training writes: kept
    foreign.write_bytes(b"partial")
    resumed = ["train", "--resume", str(run_dir), "--max-epochs-this-run", "1", "--no-progress"]
    assert main(resumed) == 0
    err = capsys.readouterr().err
    assert f"locked by pid {first.pid}" in err and "no longer running" in err
    assert not stale.exists() and foreign.exists()
    assert not (run_dir / LOCK).exists()

    # two resumes at once
    with delrec_process("train", "--resume", str(run_dir), "--no-progress") as second:
        wait_until_holding(second, run_dir)
        assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 2
        assert f"in use by pid {second.pid}" in capsys.readouterr().err


def test_several_seeds_hold_their_directory(tmp_path, capsys):
    run = RunDir(tmp_path / "seeds")
    with run.lock():
        argv = ["train", "--seeds", "0-1", "--run-dir", str(run.path), *LONG_RUN]
        assert main(argv) == 2
        assert f"in use by pid {os.getpid()}" in capsys.readouterr().err
    assert not run.path.exists()


# --------------------------------------------------------------------------- exit codes
def test_a_folder_of_seeds_is_answered_with_one_of_its_runs(tmp_path, capsys):
    for seed in (0, 1):
        (tmp_path / "multi" / f"seed-{seed}" / "checkpoints").mkdir(parents=True)
    for command in (["eval"], ["export"], ["report"]):
        assert main([*command, str(tmp_path / "multi")]) == 2, command
        err = capsys.readouterr().err
        assert f"holds one run per seed: give one of them, e.g. {tmp_path}/multi/seed-0" in err


def test_a_corrupt_checkpoint_is_bad_input_for_every_command(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"not a checkpoint")
    for command in (["eval"], ["export"], ["report"], ["compare"]):
        if command == ["compare"]:
            config = {"task": "mackey-glass", "model": "delrec", "seed": 0}
            (run / "config.json").write_text(json.dumps({"config": config}))
            (run / "test_results.json").write_text(json.dumps({"nmse": 0.5, "best_epoch": 1}))
        assert main([*command, str(run)]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"delrec {command[0]}: error: ") and "corrupt" in err, err
        assert "weights_only" not in err  # torch's advice to unpickle anything is not ours


def test_a_corrupt_checkpoint_error_says_what_the_file_is(tmp_path):
    """Not torch's bare detail (a text file gave "(101)", a key of the pickle reader)."""
    text, cut = tmp_path / "notes.pt", tmp_path / "cut.pt"
    text.write_text("hello\n", encoding="utf-8")
    torch.save({"model": {"w": torch.ones(1000)}}, tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    for path, reason in [
        (text, "(it is not a file torch.save writes: no zip archive, no pickle)"),
        (cut, "(RuntimeError: PytorchStreamReader failed reading zip archive: failed finding "),
    ]:
        with pytest.raises(CheckpointError, match=re.escape(reason)) as caught:
            read_checkpoint(path)
        assert "If you are seeing this error" not in str(caught.value)
    config = tmp_path / "config.json"  # "corrupt or not a delrec checkpoint" before
    config.write_text('  {"config": {}}\n', encoding="utf-8")
    with pytest.raises(CheckpointError, match="config.json is a JSON text file, such as a run's"):
        read_checkpoint(config)


@pytest.mark.parametrize(
    "error,code",
    [
        (UsageError("--batch-size must be >= 1"), 2),
        (ConfigError("optim.lr must be > 0"), 2),
        (DataError("shd_train.h5 is missing"), 2),
        (CheckpointError("best.pt is corrupt"), 2),
        (RunError("not a run directory"), 2),
        (RunInUse("in use by pid 1"), 2),
        (TrainingError("the training loss became nan"), 1),
        (DownloadError("cannot reach the server"), 1),
        (OSError("no space left on device"), 1),
        (MemoryError(), 1),
        (torch.OutOfMemoryError("CUDA out of memory"), 1),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8"), 1),
        (RuntimeError("a bug"), None),
        (KeyError("a bug"), None),
    ],
)
def test_one_exit_code_convention(error, code):
    assert exit_code(error) == code


def test_a_folder_in_place_of_the_lock_file_is_named(tmp_path):
    run = RunDir(tmp_path / "run")
    (run.path / LOCK).mkdir(parents=True)
    with pytest.raises(RunError, match=r"run\.lock is a folder, where delrec keeps the run's lock"):
        with run.lock():
            pass
    assert (run.path / LOCK).is_dir()  # left as it was
