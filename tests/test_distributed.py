"""Data-parallel training (torchrun, two CPU processes on gloo over 127.0.0.1) and seeds run
side by side (``--parallel``): the same numbers as one process, one set of files, a clear stop
when a process dies, and a resume that continues the run."""

import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from gradient_recorder import recording
from test_train_run import read_metrics, write_random_shd

from delrec.cli import main
from delrec.config import ConfigError
from delrec.data import make_loader
from delrec.runs import RunDir, load_checkpoint
from delrec.training import TrainConfig, Trainer, parallel_seeds
from delrec.training.distributed import DataParallel, resume_command

# PYTHONFAULTHANDLER: a process aborted by `finished` prints where each of its threads was
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
RUN_TIMEOUT_S = 120
RUN_FILES = {
    "config.json",
    "metrics.csv",
    "test_results.json",
    "checkpoints/best.pt",
    "checkpoints/last.pt",
    "figures/learning_curves.png",
    "figures/delays.png",
    "figures/raster.png",
    "figures/training.png",
}


@pytest.fixture(autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, gradients: Path | None = None) -> list[str]:
    """Two CPU processes on this machine, rendezvous on 127.0.0.1, running ``delrec train``
    (through tests/gradient_recorder.py, saving every step's gradients, with ``gradients``)."""
    program = ["-m", "delrec"]
    if gradients is not None:
        program = [str(Path(__file__).with_name("gradient_recorder.py")), str(gradients)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *program,
        "train",
        "--device",
        "cpu",
        "--dist-timeout",
        "30",
        *args,
    ]


def finished(processes: list[subprocess.Popen], launcher: bool = False) -> list[tuple[str, str]]:
    """``(stdout, stderr)`` of each process once all have ended. One still running after
    ``RUN_TIMEOUT_S`` fails the test with every process's stderr, after a SIGABRT to it (and, for
    a ``launcher``, to its workers) has made Python print the stack of each thread:
    a hang names where it hung."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    outputs: dict[int, tuple[str, str]] = {}
    try:
        for index, process in enumerate(processes):
            outputs[index] = process.communicate(timeout=max(deadline - time.monotonic(), 1))
        return [outputs[index] for index in range(len(processes))]
    except subprocess.TimeoutExpired:
        pass
    running = [process.pid for process in processes if process.poll() is None]
    workers = [pid for parent in running for pid in children_of(parent)] if launcher else []
    for pid in [*workers, *running]:
        try:
            os.kill(pid, signal.SIGABRT)
        except ProcessLookupError:
            pass
    report = []
    for index, process in enumerate(processes):
        if index not in outputs:
            try:
                outputs[index] = process.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                outputs[index] = process.communicate()
        err = outputs[index][1][-6000:]
        report.append(f"--- process {index} (exit {process.returncode}):\n{err}")
    pytest.fail(f"still running after {RUN_TIMEOUT_S} s; at the abort:\n" + "\n".join(report))


@contextmanager
def launched(command: list[str]):
    """``command`` in its own session; it and its workers (torchrun starts each in a session of
    its own) are killed on the way out."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        for pid in [*children_of(process.pid), process.pid]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.communicate()


def run_torchrun(*args: str, gradients: Path | None = None) -> tuple[dict, str]:
    with launched(torchrun(*args, gradients=gradients)) as process:
        [(out, err)] = finished([process], launcher=True)
    assert process.returncode == 0, err[-3000:]
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # rank 0 alone prints the summary
    return json.loads(lines[0]), err


def files_of(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def single_process(run_dir: Path, tmp_path: Path) -> Trainer:
    """The run's configuration trained by one process."""
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text())["config"])
    trainer = Trainer(config, tmp_path / "single", progress=False, log=lambda message: None)
    trainer.fit()
    return trainer


def assert_same_network(run_dir: Path, trainer: Trainer) -> None:
    trained = load_checkpoint(run_dir, "last")["model"]
    reference = trainer.network.state_dict()
    assert trained.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_two_processes_train_like_one_on_the_whole_batch(tmp_path):
    # SHD: BatchNorm over T·B frames, variable lengths, ×3 augmentation, dropout 0.4 and
    # recurrent dropout 0.2, the "lif" readout, two AdamW optimizers, gradients clipped.
    # Batches of 13 split 7 + 6 (a last one of 5: 3 + 2). No bias in front of BatchNorm: its
    # true gradient is 0, and Adam turns the rounding noise of a zero gradient into steps of
    # size lr.
    root = tmp_path / "shd"
    root.mkdir()
    write_random_shd(root / "shd_train.h5", 40, seed=1)
    write_random_shd(root / "shd_test.h5", 20, seed=2)
    run_dir = tmp_path / "run"
    gradients = tmp_path / "gradients.pt"
    summary, _ = run_torchrun(
        "--task",
        "shd",
        "--data-root",
        str(root),
        "--epochs",
        "2",
        "--run-dir",
        str(run_dir),
        "--set",
        "network.hidden_sizes=[8,8]",
        "network.bias=false",
        "batch_size=13",
        "optim.grad_clip=0.01",
        "threads=1",
        "--no-progress",
        gradients=gradients,
    )
    assert summary["status"] == "complete" and summary["epochs_done"] == 2
    assert files_of(run_dir) == RUN_FILES

    with recording() as steps:
        trainer = single_process(run_dir, tmp_path)
    assert_same_network(run_dir, trainer)
    # The gradients of every step before clipping, not only the parameters after Adam, which
    # are blind to a uniform scale. 2 epochs of 8 batches; they agree to 3e-4 of their largest
    # entry (float32 sums in another order, BatchNorm over shards), a scale error of 2e-3 fails.
    distributed = torch.load(gradients)
    assert (len(distributed), len(steps)) == (16, 16)
    for step, (ours, single) in enumerate(zip(distributed, steps)):
        assert len(ours) == len(single) and all(g is not None and g.any() for g in single), step
        for index, (grad, expected) in enumerate(zip(ours, single)):
            error = float((grad - expected).abs().max() / expected.abs().max())
            assert error < 2e-3, f"step {step}, parameter {index}: {error:.2g} of its largest entry"
    for row, expected in zip(read_metrics(run_dir), trainer.state.history, strict=True):
        for column in (
            "train_loss",
            "train_accuracy",
            "valid_loss",
            "valid_accuracy",
            "firing_rate",
            "sigma",
            "delay_mean_rec1",
        ):
            assert float(row[column]) == pytest.approx(expected[column], rel=1e-6), column


def start_ranks(*args: str, per_rank: tuple[list[str], list[str]] = ([], [])):
    """The two processes of a run started by hand with torchrun's variables (no launcher to
    stop the others when one dies); ``per_rank``: arguments of rank 0 and of rank 1 alone."""
    port = str(free_port())
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "delrec",
                "train",
                "--device",
                "cpu",
                "--dist-timeout",
                "30",
                *args,
                *per_rank[rank],
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={
                **ENV,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for rank in range(2)
    ]


@contextmanager
def ranks_started(*args: str, per_rank: tuple[list[str], list[str]] = ([], [])):
    processes = start_ranks(*args, per_rank=per_rank)
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def test_processes_started_with_different_settings_stop_before_training(tmp_path):
    """Ranks started with another seed trained as one network on two recipes without a word;
    with other epoch counts or --max-epochs-this-run one waited out --dist-timeout for the
    other. Every rank now stops at once (exit code 2), naming what differs."""
    run_dir = tmp_path / "run"
    settings = ["--task", "digits-8x8", "--epochs", "2", "--run-dir", str(run_dir), *TINY_SETS]
    per_rank = (["--seed", "0"], ["--seed", "1", "--max-epochs-this-run", "1"])
    with ranks_started(*settings, per_rank=per_rank) as processes:
        outputs = finished(processes)
    for rank, (process, (_, err)) in enumerate(zip(processes, outputs)):
        assert process.returncode == 2, err[-3000:]
        assert f"[rank {rank}] torchrun's processes were started with different settings" in err
        assert "seed: 0 in rank 0, 1 in rank 1" in err
        assert "--max-epochs-this-run None in rank 0, 1 in rank 1" in err
    assert not run_dir.exists()


def test_ranks_may_differ_in_where_they_run_and_cache_data():
    """A per-node cache folder (`--set data.cache_dir=$TMPDIR/cache`) stopped every rank."""
    from delrec.config import resolve
    from delrec.training.jobs import _check_same_command, launch_settings

    def ranks(mine, theirs):  # rank 1 started with `theirs`
        return SimpleNamespace(gather=lambda value: [value, launch_settings(theirs, None)])

    base = resolve(task="shd")
    here = resolve(task="shd", overrides=["data.cache_dir=/local/a", "threads=2"])
    _check_same_command(ranks(base, here), base, None)
    other = resolve(task="shd", flags={"seed": 3})
    with pytest.raises(ConfigError, match="seed: 0 in rank 0, 3 in rank 1"):
        _check_same_command(ranks(base, other), base, None)


TINY_SETS = ["--set", "max_train_samples=64", "network.hidden_sizes=[8]", "--no-progress"]


def test_a_killed_process_stops_the_run_and_resume_continues_it(tmp_path):
    run_dir = tmp_path / "run"
    settings = [
        "--task",
        "digits-8x8",
        "--set",
        "max_train_samples=200",
        "network.hidden_sizes=[8]",
        "batch_size=32",
        "--no-progress",
    ]
    with ranks_started("--epochs", "4", "--run-dir", str(run_dir), *settings) as (main_rank, other):
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (run_dir / "checkpoints" / "last.pt").exists():
            assert main_rank.poll() is None and time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.02)
        os.kill(other.pid, signal.SIGKILL)
        [(_, err)] = finished([main_rank])  # stops by itself, no hang
    assert main_rank.returncode == 1, err[-3000:]
    assert "delrec train: error: [rank 0] lost contact with the other processes" in err
    assert f"torchrun --nproc-per-node 2 -m delrec train --resume {run_dir}" in err

    epoch = load_checkpoint(run_dir, "last")["epoch"]  # intact
    assert 1 <= epoch < 4
    assert len(read_metrics(run_dir)) == epoch
    assert not any(name.endswith(".tmp") for name in files_of(run_dir))

    with ranks_started("--resume", str(run_dir), "--no-progress") as processes:
        outputs = finished(processes)
    assert [process.returncode for process in processes] == [0, 0], "\n".join(
        f"rank {rank}: {err[-2000:]}" for rank, (_, err) in enumerate(outputs)
    )
    assert outputs[1][0] == ""  # rank 0 alone reports
    summary = json.loads(outputs[0][0])
    assert summary["status"] == "complete" and summary["epochs_done"] == 4
    assert len(read_metrics(run_dir)) == 4
    assert_same_network(run_dir, single_process(run_dir, tmp_path))


TINY_DIGITS = [
    "--task",
    "digits-8x8",
    "--epochs",
    "2",
    "--set",
    "max_train_samples=64",
    "network.hidden_sizes=[8]",
    "batch_size=32",
    "--no-progress",
]


def test_parallel_seeds_match_sequential_and_a_failing_seed_is_reported(tmp_path, capsys):
    assert main(["train", "--seeds", "0-1", "--run-dir", str(tmp_path / "seq"), *TINY_DIGITS]) == 0
    sequential = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    parallel_dir = tmp_path / "par"
    assert (
        main(
            [
                "train",
                "--seeds",
                "0-1",
                "--parallel",
                "2",
                "--run-dir",
                str(parallel_dir),
                *TINY_DIGITS,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    parallel = json.loads(captured.out.strip().splitlines()[-1])
    assert parallel["test"] == sequential["test"]
    assert "[seed 1] epoch 2/2" in captured.err
    assert "does nothing for" not in captured.err  # a seed's config file: not settings given
    assert json.loads((parallel_dir / "summary.json").read_text())["test"] == sequential["test"]

    (parallel_dir / "seed-1" / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(parallel_dir), "--parallel", "2", "--no-progress"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["status"] == "failed" and list(report["failed"]) == ["1"]
    assert "corrupt" in report["failed"]["1"]
    assert "seed 1 failed (exit code 2" in captured.err
    assert f"train that seed again: move {parallel_dir / 'seed-1'} away" in captured.err
    assert "1 of 2 seeds ended cleanly; once what the errors above name is dealt" in captured.err
    assert [run["seed"] for run in report["runs"]] == [0]


def test_shards_cut_the_batches_of_the_single_process_loader():
    items, batch, world = 17, 8, 3  # batches of 8, 8 and 1: ranks 1 and 2 get a stand-in
    data = [(torch.zeros(1, 1), i) for i in range(items)]
    single = make_loader(data, batch, shuffle=True, seed=5)
    ranks = [
        DataParallel(rank, world, torch.device("cpu"), "gloo").shard_loader(
            make_loader(data, batch, shuffle=True, seed=5)
        )
        for rank in range(world)
    ]
    for _ in range(2):  # two epochs: the shuffling generator advances as in one process
        wholes = [b.targets.tolist() for b in single]
        shards = [[b.targets.tolist() for b in loader] for loader in ranks]
        assert all(len(rank) == len(wholes) == 3 for rank in shards)
        for step, whole in enumerate(wholes):
            parts = [loader.batch_sampler.shard(step) for loader in ranks]
            assert sum(part.share for part in parts) == pytest.approx(1.0)
            assert [
                i for part, rank in zip(parts, shards) if part.share for i in rank[step]
            ] == whole
            assert all(
                rank[step] == whole[-1:] for part, rank in zip(parts, shards) if not part.share
            )
        assert all(
            torch.equal(loader.generator.get_state(), single.generator.get_state())
            for loader in ranks
        )


def gpus_present(monkeypatch, count: int) -> None:
    """``count`` CUDA GPUs as torch sees them (none visible through CUDA_VISIBLE_DEVICES)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


class FakeSeedChild:
    """In place of ``subprocess.Popen`` for a seed's ``delrec train``: records the seed and the
    GPUs it would see, and ends at once with a summary line."""

    launched: list[tuple[int, str | None]] = []

    def __init__(self, command, env, **options):
        seed = int(command[command.index("--seed") + 1])
        self.launched.append((seed, env.get("CUDA_VISIBLE_DEVICES")))
        self.stdout = io.StringIO(json.dumps({"status": "complete", "seed": seed}) + "\n")
        self.stderr = io.StringIO("")

    def poll(self):
        return 0

    def wait(self, timeout=None):
        return 0


def launched_gpus(monkeypatch, tmp_path, config, seeds, workers) -> list[tuple[int, str | None]]:
    """The (seed, CUDA_VISIBLE_DEVICES) of each ``delrec train`` that ``--parallel`` starts."""
    fake = SimpleNamespace(Popen=FakeSeedChild, PIPE=subprocess.PIPE)
    monkeypatch.setattr(parallel_seeds, "subprocess", fake)
    FakeSeedChild.launched = []
    summaries, failures = parallel_seeds.run_seed_processes(
        config, seeds, RunDir(tmp_path / f"seeds-{workers}"), workers, None
    )
    assert [s["seed"] for s in summaries] == seeds and failures == {}
    return FakeSeedChild.launched


def test_parallel_seeds_get_a_gpu_each_from_the_visible_ones(tmp_path, monkeypatch):
    config = TrainConfig()  # device auto
    cuda, cpu = (dataclasses.replace(config, device=d) for d in ("cuda", "cpu"))
    gpus_present(monkeypatch, 0)
    assert parallel_seeds.gpu_ids(config) == [] and parallel_seeds.gpu_ids(cuda) == []
    assert launched_gpus(monkeypatch, tmp_path, config, [0, 1], 2) == [(0, None), (1, None)]
    gpus_present(monkeypatch, 3)
    assert parallel_seeds.gpu_ids(config) == ["0", "1", "2"] == parallel_seeds.gpu_ids(cuda)
    assert parallel_seeds.gpu_ids(cpu) == []  # --device cpu: the seeds share the CPU
    with pytest.raises(ConfigError, match="use --device auto or cuda, not 'cuda:1'"):
        parallel_seeds.gpu_ids(dataclasses.replace(config, device="cuda:1"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5,,7")
    assert parallel_seeds.gpu_ids(config) == ["2", "5", "7"]
    # slot i of K gets GPU i mod (number of GPUs): the seeds running together never share one
    seeds = [0, 1, 2, 3, 4]
    assert launched_gpus(monkeypatch, tmp_path, config, seeds, 3) == [
        (0, "2"), (1, "5"), (2, "7"), (3, "2"), (4, "5")
    ]  # fmt: skip
    assert launched_gpus(monkeypatch, tmp_path, config, seeds, 2) == [
        (0, "2"), (1, "5"), (2, "2"), (3, "5"), (4, "2")
    ]  # fmt: skip


def test_launch_mistakes_are_refused(tmp_path, capsys, monkeypatch):
    assert main(["train", "--parallel", "2", "--run-dir", str(tmp_path / "a")]) == 2
    assert "give --seeds too" in capsys.readouterr().err
    assert main(["train", "--dist-backend", "gloo", "--run-dir", str(tmp_path / "a")]) == 2
    assert "--dist-backend gloo applies under torchrun only" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--seeds", "0-1", "--run-dir", str(tmp_path / "b")]) == 2
    assert "[rank 1] under torchrun" in capsys.readouterr().err
    assert main(["train", "--seeds", "0-1", "--parallel", "2"]) == 2
    assert "without torchrun" in capsys.readouterr().err
    assert main(["train", "--device", "cpu", "--dist-backend", "nccl"]) == 2
    assert "use --dist-backend gloo" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_code:  # it said "not available in this torch build"
        main(["train", "--dist-backend", "GLOO"])
    assert exit_code.value.code == 2
    assert "--dist-backend: invalid choice: 'GLOO'" in capsys.readouterr().err
    assert main(["train", "--print-config"]) == 0  # rank 1 of 2: rank 0 alone prints it
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_truncated_bptt_data_parallel_is_a_setting_refused(tmp_path):
    """Exit code 2 (bad usage), like the other launch mistakes: it was a TrainingError, a
    failure at run time (exit code 1)."""
    config = TrainConfig(task="digits-8x8", network={"hidden_sizes": [8]}, tbptt=16)
    dist = SimpleNamespace(is_main=True, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="tbptt .* does not run data-parallel yet"):
        Trainer(config, tmp_path / "run", dist=dist)
    assert not (tmp_path / "run").exists()


def test_a_run_stopped_early_under_torchrun_names_torchrun_to_continue(monkeypatch, tmp_path):
    """`--max-epochs-this-run` under torchrun said `delrec train --resume R`, which continues
    in one process; a lost process already named the torchrun command."""
    run = tmp_path / "run"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command(run, 2) == f"torchrun --nproc-per-node 2 -m delrec train --resume {run}"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command(run, 8) == (
        f"torchrun --nnodes 2 --nproc-per-node 4 -m delrec train --resume {run} "
        "(on every node, as before)"
    )


def test_parallel_seeds_stopped_early_name_the_parent_run_to_continue(tmp_path, capsys):
    """Each seed said `continue with delrec train --resume R/seed-0`, which finishes that seed
    but never writes the summary; the parent said nothing."""
    run_dir = tmp_path / "par"
    stopped = ["--seeds", "0-1", "--parallel", "2", "--max-epochs-this-run", "1"]
    assert main(["train", *stopped, "--run-dir", str(run_dir), *TINY_DIGITS]) == 0
    err = capsys.readouterr().err
    assert "[seed 0] stopped after epoch 1/2" in err and "[seed 1] stopped after epoch 1/2" in err
    assert "seed-0`" not in err and "seed-1`" not in err, err
    assert (
        "delrec train: stopped with 0 of 2 seeds complete; continue with "
        f"`delrec train --resume {run_dir} --parallel 2`"
    ) in err


def test_absurd_launch_variables_and_timeouts_are_refused_before_any_wait(
    tmp_path, capsys, monkeypatch
):
    """Each refused at once with the variable and its range (before: a traceback, a wait for
    the timeout that then blamed the port, or a timeout mistaken for a missing MASTER_ADDR)."""
    from delrec.training.distributed import process_group

    launch = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"}
    run_dir = tmp_path / "run"
    for env, timeout, problem in [
        ({"LOCAL_RANK": "x"}, "5", "LOCAL_RANK='x' is not a rank of the WORLD_SIZE=2 processes"),
        ({"RANK": "5"}, "5", "RANK='5' is not a rank of the WORLD_SIZE=2 processes (0…1)"),
        ({"WORLD_SIZE": str(2**40), "RANK": "0"}, "5", "is not a process count (1…"),
        ({"MASTER_PORT": "abc"}, "5", "MASTER_PORT='abc' is not a port number (1…65535)"),
        ({"MASTER_PORT": "99999"}, "5", "MASTER_PORT='99999' is not a port number"),
        ({}, "nan", "--dist-timeout must be a number of seconds > 0"),
        ({}, "inf", "--dist-timeout must be a number of seconds > 0"),
        ({}, "1e300", "<= 2592000 (30 days), got 1e+300"),
    ]:
        with monkeypatch.context() as m:
            for name, value in {**launch, "MASTER_PORT": str(free_port()), **env}.items():
                m.setenv(name, value)
            argv = ["train", "--device", "cpu", "--run-dir", str(run_dir), "--dist-timeout"]
            assert main([*argv, timeout]) == 2, env
        err = capsys.readouterr().err
        assert problem in err and len(err.splitlines()) == 1, err
    assert not run_dir.exists()
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process refuses them too
    with pytest.raises(ConfigError, match="--dist-timeout must be"):
        with process_group("cpu", timeout_s=float("nan")):
            pass
    for other in (["--seeds", "0-1"], ["--seeds", "0-1", "--parallel", "2"], ["--print-config"]):
        assert main(["train", *other, "--run-dir", str(run_dir), "--dist-timeout", "inf"]) == 2
        assert "--dist-timeout must be a number of seconds > 0" in capsys.readouterr().err
    assert not run_dir.exists()


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (exists and is not a zombie waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children_of(pid: int) -> list[int]:
    """The process ids whose parent is ``pid`` (from Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux's /proc")
def test_a_seed_ends_when_its_parallel_parent_is_killed(tmp_path):
    """A SIGKILLed ``--parallel`` parent cannot stop its seeds: a seed's ``delrec train`` watches
    the parent named in DELREC_PARENT_PID and ends as on SIGTERM once it is gone (here its
    output goes to a file, so no broken pipe ends it instead)."""
    run, log = tmp_path / "seed-0", tmp_path / "seed.log"
    command = [sys.executable, "-m", "delrec", "train", "--run-dir", str(run), *TINY_DIGITS]
    command[command.index("--epochs") + 1] = "1000"
    parent_script = (
        "import os, subprocess, sys, time\n"
        "with open(sys.argv[1], 'w', encoding='utf-8') as log:\n"
        f"    env = {{**os.environ, {parallel_seeds.PARENT_VARIABLE!r}: str(os.getpid())}}\n"
        "    subprocess.Popen(sys.argv[2:], stdout=log, stderr=log, env=env,\n"
        "                     start_new_session=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_script, str(log), *command])
    seeds = []
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.csv").is_file():
            assert time.monotonic() < deadline, f"the seed never trained: {log.read_text('utf-8')}"
            time.sleep(0.5)
        seeds = children_of(parent.pid)
        assert len(seeds) == 1
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while running(seeds[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = running(seeds[0])
    if alive:
        os.kill(seeds[0], signal.SIGKILL)
    assert not alive, "the seed kept training after its parent was killed"
    assert "terminated (SIGTERM)" in log.read_text(encoding="utf-8")


def test_parallel_seeds_json_exists_before_any_seed_starts(tmp_path, monkeypatch):
    """A ``--parallel`` parent SIGKILLed just after a seed wrote its ``config.json`` left no
    ``seeds.json`` (it was written on the next poll): neither ``--resume`` ("not a run
    directory") nor the same command ("not empty") went on. It is now written before the first
    seed starts, so every seed's run has its parent's record."""
    run = RunDir(tmp_path / "par")
    seen, starts = [], []

    class Child(FakeSeedChild):
        def __init__(self, command, env, **options):
            seen.append((run.path / "seeds.json").is_file())
            if starts[-1]:  # the seed's data loaded: it wrote its config.json
                seed = RunDir(Path(command[command.index("--run-dir") + 1]))
                seed.path.mkdir(parents=True)
                seed.write_config(TrainConfig(device="cpu"), {})
            super().__init__(command, env, **options)

    monkeypatch.setattr(parallel_seeds, "subprocess", SimpleNamespace(Popen=Child, PIPE=0))
    for started in (False, True):
        starts.append(started)
        parallel_seeds.run_seed_processes(TrainConfig(device="cpu"), [0, 1], run, 2, None)
        # no seed started (their data failed to load): gone, so the same command starts again
        assert run.is_multi_seed() == started
    assert seen == [True] * 4 and run.read_seeds()["seeds"] == [0, 1]
