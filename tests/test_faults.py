"""Fault injection: under concurrency, faults and absurd input delrec never corrupts a run
silently and never stops without a message naming the problem and the fix
(docs/reliability.md).

Sections: trainings started together into one directory (the lock itself: test_runs.py);
NaN injected into parameters mid-run and a non-finite loss; corrupt binning caches; empty
batches on every engine path; absurd delays, spreads and input currents; truncated and garbage
files for every reader; downloads that stall, mirrors, and files damaged after extraction;
processes killed at random points (during checkpoint writes too), then resumed, compared bit
for bit with an uninterrupted run; outputs that would overwrite a run's files, and checkpoints
and run files edited to unusable values (the CLI audit).
"""

from __future__ import annotations

import builtins
import errno
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_harness import assert_close_relative, forced_in_layers
from test_data_heidelberg import random_samples
from test_train_run import assert_identical, keep_thread_count, read_metrics, state_of  # noqa: F401

from delrec import cli, files
from delrec.checkpoint import CheckpointError, network_payload, read_checkpoint, save_checkpoint
from delrec.cli import main
from delrec.config import ConfigError, load_config_file, resolve
from delrec.data import RESOURCES, DataError, load_dataset
from delrec.data.fetch import Resource, download
from delrec.data.heidelberg import write_heidelberg
from delrec.data.mnist import read_idx
from delrec.delays import MAX_DELAY
from delrec.engine import PATHS, native
from delrec.engine import feedforward as feedforward_engines
from delrec.engine.ring import DelayedSynapses
from delrec.layers import DelRec, FeedforwardDelay, clamp_delays, set_spread
from delrec.models import NetworkConfig, build_network
from delrec.neurons import LIF, AdLIF
from delrec.runs import LOCK, RunDir, RunError
from delrec.training import Trainer, TrainingError, jobs, loop

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
# digits-8x8 (64 steps) on 64 images, 8 neurons: two batches per epoch, a second an epoch
TINY = [
    "--task",
    "digits-8x8",
    "--epochs",
    "3",
    "--set",
    "max_train_samples=64",
    "network.hidden_sizes=[8]",
    "batch_size=32",
    "--no-progress",
]


def tiny_config(epochs: int = 3):
    return resolve(
        "digits-8x8",
        overrides=[
            f"epochs={epochs}",
            "max_train_samples=64",
            "network.hidden_sizes=[8]",
            "batch_size=32",
        ],
    )


def delrec_process(*args: str, script: str | None = None) -> subprocess.Popen:
    """``python -m delrec ARGS`` (or ``python -c SCRIPT ARGS``), one thread, own session."""
    command = ["-c", script] if script else ["-m", "delrec"]
    return subprocess.Popen(
        [sys.executable, *command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )


# --------------------------------------------------------------------------- concurrency
def test_two_trainings_started_together_leave_one_consistent_run(tmp_path):
    """The issue's reproduction: two seeds into one run directory at the same moment. One
    trains, the other stops with exit 2 and a message; the directory holds one seed's run."""
    run_dir = tmp_path / "run"
    processes = {
        seed: delrec_process("train", *TINY, "--run-dir", str(run_dir), "--seed", str(seed))
        for seed in (0, 1)
    }
    outcomes = {seed: (p.wait(timeout=300), *p.communicate()) for seed, p in processes.items()}
    codes = sorted(code for code, _, _ in outcomes.values())
    assert codes == [0, 2], outcomes
    winner = next(seed for seed, (code, _, _) in outcomes.items() if code == 0)
    loser_err = outcomes[1 - winner][2]
    assert "in use by pid" in loser_err or "already exists and is not empty" in loser_err
    assert json.loads(outcomes[winner][1].splitlines()[-1])["seed"] == winner
    assert json.loads((run_dir / "config.json").read_text())["config"]["seed"] == winner
    for which in ("best", "last"):
        assert (
            read_checkpoint(run_dir / "checkpoints" / f"{which}.pt")["train_config"]["seed"]
            == winner
        )
    assert not (run_dir / LOCK).exists()


# --------------------------------------------------------------------------- divergence
def poison_after_step(trainer: Trainer, parameter: str, step: int, value: float) -> None:
    """Write ``value`` into ``parameter`` right after optimizer step ``step`` (1-based, counted
    over the run; the tiny config has two steps per epoch)."""
    count = {"steps": 0}
    tensor = dict(trainer.network.named_parameters())[parameter]

    def hook(optimizer, args, kwargs):
        count["steps"] += 1
        if count["steps"] == step:
            with torch.no_grad():
                tensor.view(-1)[0] = value

    trainer.optimizers["weights"].register_step_post_hook(hook)


def test_the_trainer_api_refuses_what_it_would_silently_ignore(tmp_path):
    """A TrainConfig written by hand is validated (a regression with the classification
    readout trained another model); the network is fixed (a network assigned afterwards went
    untrained, the optimizers on the old one); evaluate leaves the mode as it found it (a loop
    that validated mid-epoch went on with integer delays, which get no gradient)."""
    from delrec.config import TrainConfig
    from delrec.training.evaluation import evaluate

    by_hand = TrainConfig(task="mackey-glass", network={"hidden_sizes": [8]}, epochs=1)
    with pytest.raises(ConfigError, match="regression \\(mackey-glass\\) needs network.readout"):
        Trainer(by_hand, tmp_path / "run", progress=False)
    trainer = Trainer(tiny_config(1), tmp_path / "run", progress=False)
    with pytest.raises(AttributeError):
        trainer.network = trainer.network
    for mode in (True, False):
        trainer.network.train(mode)
        evaluate(trainer.network, trainer.valid_loader, trainer.objective, trainer.device)
        assert trainer.network.training is mode


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_parameters_stop_the_run_naming_epoch_batch_and_last_checkpoint(tmp_path, value):
    trainer = Trainer(tiny_config(), tmp_path / "run", progress=False)
    last = trainer.run.checkpoint_path("last")
    poison_after_step(trainer, "blocks.0.neurons.weight", step=3, value=value)
    with pytest.raises(TrainingError) as error:
        trainer.fit()
    message = str(error.value)
    assert message.startswith(
        "blocks.0.neurons.weight became NaN or infinite in the optimizer step of epoch 2, "
        "batch 1; lower optim.lr"
    ), message
    assert f"the last good checkpoint is {last} (after epoch 1)" in message
    assert read_checkpoint(last)["epoch"] == 1  # finite: it reads


def test_a_network_too_large_for_memory_is_an_error_naming_its_sizes(tmp_path):
    config = tiny_config()
    config.network["hidden_sizes"] = [10**10]  # 2.6 TB of feedforward weights alone
    with pytest.raises(TrainingError, match=r"do not fit in the memory of cpu \(hidden_sizes "):
        Trainer(config, tmp_path / "run", progress=False)


def test_a_network_that_would_overcommit_memory_is_refused_before_it_is_built(
    tmp_path, monkeypatch
):
    """A size whose weights fit but whose training does not (gradients, Adam's moments) is
    refused before anything is allocated: the kernel would kill the process instead."""
    built = []
    monkeypatch.setattr(loop, "device_memory", lambda device: 10**8)  # 100 MB
    monkeypatch.setattr(loop, "build_network", lambda *a, **k: built.append(1))
    config = tiny_config()
    config.network["hidden_sizes"] = [3000]  # 9 M recurrent weights, 16 bytes each to train
    with pytest.raises(TrainingError, match=r"about 0.145 GB to train, more than cpu has"):
        Trainer(config, tmp_path / "run", progress=False)
    assert not built


def test_a_delay_made_infinite_is_caught_before_the_clamp_hides_it(tmp_path):
    trainer = Trainer(tiny_config(), tmp_path / "run", progress=False)
    count = {"steps": 0}
    delay = trainer.network.blocks[0].neurons.delay

    def hook(optimizer, args, kwargs):
        count["steps"] += 1
        if count["steps"] == 1:
            with torch.no_grad():
                delay[2] = float("inf")

    trainer.optimizers["positions"].register_step_post_hook(hook)
    with pytest.raises(TrainingError, match=r"blocks.0.neurons.delay became NaN or infinite.*"):
        trainer.fit()


def test_a_run_without_its_last_checkpoint_is_not_started_over(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run)]) == 0
    best = (run / "checkpoints" / "best.pt").read_bytes()
    metrics = (run / "metrics.csv").read_text()
    (run / "checkpoints" / "last.pt").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "last.pt is missing, but" in err and "metrics.csv and test_results.json" in err, err
    assert (run / "checkpoints" / "best.pt").read_bytes() == best  # nothing overwritten
    assert (run / "metrics.csv").read_text() == metrics


def test_hand_edited_run_files_are_bad_input_not_tracebacks(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run)]) == 0
    capsys.readouterr()
    last = run / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    payload.pop("optimizers")  # as another version might write it
    torch.save(payload, last)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "last.pt cannot be resumed from (no 'optimizers')" in capsys.readouterr().err
    best = run / "checkpoints" / "best.pt"
    payload = torch.load(best, weights_only=True)
    payload["model"]["blocks.0.neurons.delay"].fill_(-1e6)
    torch.save(payload, best)
    assert main(["eval", str(run)]) == 2
    assert "a delay of -1e+06 steps is out of range" in capsys.readouterr().err
    assert main(["eval", str(run / "checkpoints" / "last.pt")]) == 0  # a file: its own kind
    assert json.loads(capsys.readouterr().out)["checkpoint"] == "last"
    for results in ([], {"accuracy": "high"}, {"accuracy": 0.5, "best_epoch": "x"}):
        (run / "test_results.json").write_text(json.dumps(results))
        assert main(["compare", str(run), "--rounded-only"]) == 2
        assert "does not hold a test metric" in capsys.readouterr().err
    (run / "seeds.json").write_text(json.dumps({"seeds": [], "config": {}}))
    with pytest.raises(RunError, match="does not hold a list of seeds and a configuration"):
        RunDir(run).read_seeds()


def test_an_unknown_option_is_reported_by_its_command_with_its_usage(tmp_path, capsys):
    for argv, prefix in [
        (["train", "--bogus"], "delrec train: error: unrecognized arguments: --bogus"),
        (["data", "download", "shd", "--nope"], "delrec data download: error: unrecognized"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and prefix in err and err.startswith("usage: delrec "), err
    (tmp_path / "configs").mkdir()
    assert main(["train", "--config", str(tmp_path / "configs"), "--print-config"]) == 2
    assert "is a folder; give a .toml or .json file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["analyze", "gradients", "--delays", "1,,2"],
        ["sweep", "rate", "--penalties", "1,,2"],
        ["sweep", "models", "--models", "delrec,"],
    ],
)
def test_a_list_option_with_an_empty_item_is_refused(command, capsys):
    """``1,,2`` ran the points 1 and 2 without a word: a value may have been lost."""
    with pytest.raises(SystemExit) as end:
        main(command)
    assert end.value.code == 2
    assert "which has an empty item: write the values separated by single commas" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "command",
    [
        ["export", "RUN", "-o", ""],
        ["analyze", "spectral", "--csv", ""],
        ["data", "download", "shd", "--mirror", ""],
        ["train", "--run-dir", "", "--print-config"],
        ["compare", "RUN", "--figure", ""],
    ],
)
def test_an_empty_path_is_refused_not_read_as_the_default(command, capsys):
    """An unset shell variable: export wrote the default file, the mirror fell back to the
    official servers, --csv named the current folder."""
    with pytest.raises(SystemExit) as end:
        main(command)
    assert end.value.code == 2
    assert "is empty (an unset shell variable?): give a value" in capsys.readouterr().err


def test_report_and_compare_refuse_options_they_would_ignore(tmp_path, capsys):
    """Each of these ran and ignored the option: a split or a batch count with --no-data, a
    run directory with --list-targets, an unknown device with --rounded-only."""
    run = tmp_path / "nowhere"
    for argv, problem in [
        (["report", str(run), "--no-data", "--split", "train"], "--split chooses the data"),
        (
            ["report", str(run), "--no-data", "--max-batches", "1", "--data-root", str(tmp_path)],
            "--max-batches and --data-root choose the data to measure on, and --no-data measures",
        ),
        (["report", "--list-targets", str(run)], "--list-targets prints the known targets"),
        (["compare", str(run), "--device", "tpu", "--rounded-only"], "device 'tpu' is not a"),
    ]:
        assert main(argv) == 2, argv
        assert problem in capsys.readouterr().err, argv


def test_sigterm_ends_a_training_with_a_message_and_its_lock_released(tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "delrec", "train", *TINY, "--run-dir", str(run)]
    argv[argv.index("--epochs") + 1] = "100000"
    process = subprocess.Popen(argv, env=ENV, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # after the first epoch
        if line.startswith("epoch 1/"):
            break
    process.send_signal(signal.SIGTERM)
    err = process.stderr.read()
    assert process.wait(timeout=60) == 143
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
    assert f"the run continues with `delrec train --resume {run}`" in err, err
    assert not (run / LOCK).exists() and (run / "checkpoints" / "last.pt").is_file()


def test_sigterm_names_the_run_of_several_seeds_and_a_run_not_yet_written(
    tmp_path, monkeypatch, capsys
):
    """After SIGTERM a run of several seeds is continued as a whole: the line names its folder
    (it said "the folder its first line named", which was seed-0's: resuming that left seed 1
    untrained and no summary.json); a run stopped before it wrote anything starts again with the
    same command."""
    real_save, saves = torch.save, []

    def save(payload, handle):
        saves.append(handle)
        if len(saves) == 3:
            raise cli.Terminated
        return real_save(payload, handle)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "seeds"
    assert main(["train", *TINY, "--seeds", "0,1", "--run-dir", str(run)]) == 143
    err = capsys.readouterr().err
    assert f"the run continues with `delrec train --resume {run}`" in err, err
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert (run / "summary.json").is_file()

    def stopped(*args, **kwargs):
        raise cli.Terminated

    monkeypatch.setattr(jobs, "Trainer", stopped)
    assert main(["train", *TINY, "--run-dir", str(tmp_path / "new")]) == 143
    assert "nothing of the run was written yet: run the same command again" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("argv", "then"),
    [
        (["--quiet", "sweep", "rate"], "the same `delrec sweep …` command continues the sweep"),
        (["data", "download", "shd"], "run the command again"),
    ],
)
def test_sigterm_says_how_each_command_goes_on(monkeypatch, capsys, argv, then):
    """The one line said `delrec train --resume RUN_DIR` after any command, a sweep too,
    whose own command line continues it."""

    def terminated(argv):
        raise cli.Terminated

    monkeypatch.setattr(cli, "_run", terminated)
    assert cli.main(argv) == 143
    assert f"terminated (SIGTERM); what was written is whole: {then}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("interruption", "code", "said"),
    [(cli.Terminated, 143, "terminated (SIGTERM)"), (KeyboardInterrupt, 130, "interrupted")],
)
def test_an_interruption_while_a_checkpoint_is_written_ends_as_one(
    tmp_path, monkeypatch, capsys, interruption, code, said
):
    """The signal arrives while ``torch.save`` writes: its archive writer, closed mid-write,
    raises an error of its own in the interruption's place (seen in a CI run). The command
    still ends as interrupted, without a traceback, and the checkpoint written before it stays
    whole."""
    real_save, saves = torch.save, []

    def save(payload, handle):
        saves.append(handle)
        if len(saves) <= 2:
            return real_save(payload, handle)
        try:
            raise interruption
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run)]) == code
    err = capsys.readouterr().err
    assert said in err and "unexpected pos" not in err and "Traceback" not in err, err
    monkeypatch.undo()
    assert len(saves) == 3
    read_checkpoint(run / "checkpoints" / "last.pt")
    assert not (run / LOCK).exists()


def test_ctrl_c_while_the_command_line_loads_torch_is_a_message_not_a_traceback(
    monkeypatch, capsys
):
    script = "import sys, delrec.cli; print(sorted(m for m in sys.modules if m == 'torch'))"
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert loaded.stdout == "[]\n", loaded  # the entry module loads no torch of its own
    real_import = builtins.__import__

    def interrupted_import(name, *args, **kwargs):
        if name == "delrec.commands":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    assert main(["train", "--help"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_distributed_failure_says_how_to_continue(tmp_path, monkeypatch):
    from delrec.training.distributed import failure_message

    error = RuntimeError("Connection closed by peer")
    assert "Run the same command again" in failure_message(error, tmp_path / "none", 2)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two nodes of one process each
    message = failure_message(error, run, 2)
    launch = "torchrun --nnodes 2 --nproc-per-node 1 -m delrec train"
    assert f"on every node, as before: {launch} --resume {run}" in message


def test_train_refuses_flags_that_would_be_ignored_or_absurd(tmp_path, capsys):
    run = ["--run-dir", str(tmp_path / "run")]
    for argv, problem in [
        (["--resume", str(tmp_path / "run"), "--print-config"], "drop --print-config"),
        (["--seeds", "", *TINY, *run], "--seeds expects a list like 0-4"),
        (["--seeds", "0-99999999999", *TINY, *run], "names more than 100000 seeds"),
        (["--seed", "99999999999999999999", *TINY, *run], "seed must be in 0…"),
        # torch keeps a seed's low 32 bits: seed 2**32 trained as seed 0, a "second" seed
        (
            ["--seeds", "0,4294967296", *TINY, *run],
            "would initialise, shuffle and drop out as seed 0",
        ),
    ]:
        assert main(["train", *argv]) == 2
        assert problem in capsys.readouterr().err, argv
    assert not (tmp_path / "run").exists()


def test_divergence_in_the_first_epoch_names_no_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(), tmp_path / "run", progress=False)
    poison_after_step(trainer, "readout.weight", step=1, value=float("nan"))
    with pytest.raises(TrainingError) as error:
        trainer.fit()
    assert "epoch 1, batch 1" in str(error.value)
    assert "no epoch has completed, so this run has no checkpoint" in str(error.value)
    assert not trainer.run.checkpoint_path("last").exists()


@pytest.mark.parametrize("step,where", [(1, "no checkpoint"), (4, "after epoch 1")])
def test_a_non_finite_loss_names_the_last_checkpoint_only_if_there_is_one(tmp_path, step, where):
    trainer = Trainer(tiny_config(), tmp_path / "run", progress=False)
    forward, count = trainer.train_forward, {"calls": 0}

    def poisoned(frames):
        output, spikes = forward(frames)
        count["calls"] += 1
        return (output * float("inf") if count["calls"] == step else output), spikes

    trainer.train_forward = poisoned
    with pytest.raises(TrainingError, match=r"the training loss became (nan|inf) in epoch") as e:
        trainer.fit()
    assert where in str(e.value)
    assert f"batch {2 - step % 2}" in str(e.value)
    assert trainer.run.checkpoint_path("last").exists() == (step > 2)


def test_a_diverging_run_from_the_command_line_stops_with_exit_1(tmp_path, capsys):
    """The issue's reproduction (lr = 1e12): the weights become NaN with a finite loss; the run
    stops at once with the epoch, batch and advice, and never reaches evaluation."""
    run_dir = tmp_path / "run"
    argv = ["train", *TINY, "--run-dir", str(run_dir), "--set", "optim.lr=1e12"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "became NaN or infinite in the optimizer step of epoch" in err, err
    assert "lower optim.lr" in err and "Traceback" not in err
    assert not (run_dir / LOCK).exists()


def test_a_checkpoint_with_nan_parameters_is_refused_by_every_command(tmp_path, capsys):
    network = build_network(NetworkConfig(1, (4,), 10, neuron={"reset": "hard"}), seed=0)
    with torch.no_grad():
        network.blocks[0].neurons.delay[1] = float("nan")
    path = tmp_path / "diverged.pt"
    save_checkpoint(network_payload(network), path)
    with pytest.raises(CheckpointError, match=r"holds NaN or infinite values in blocks.0.neurons"):
        read_checkpoint(path)
    for command in (["export"], ["report", "--no-data"], ["eval"]):
        assert main([*command, str(path)]) == 2, command
        assert "holds NaN or infinite values" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit,problem",
    [
        (lambda p: p["network_config"].update(bogus=1), "unexpected keyword argument 'bogus'"),
        (lambda p: p.pop("network_config"), "no 'network_config'"),
        (lambda p: p["network_config"].update(hidden_sizes=[6]), "size mismatch"),
        (lambda p: p["network_config"].update(delay_type="weird"), "delay_type must be one of"),
    ],
)
def test_a_checkpoint_whose_network_cannot_be_rebuilt_is_bad_input(tmp_path, capsys, edit, problem):
    payload = network_payload(build_network(NetworkConfig(1, (4,), 10), seed=0))
    edit(payload)
    path = tmp_path / "edited.pt"
    save_checkpoint(payload, path)
    for command in (["export"], ["report", "--no-data"]):
        assert main([*command, str(path)]) == 2, command
        err = capsys.readouterr().err
        assert f"the network in {path} cannot be rebuilt" in err and problem in err, err
        assert "Traceback" not in err


# --------------------------------------------------------------------------- caches
def _shd_folder(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    write_heidelberg(folder / "shd_test.h5", random_samples(12, seed=3), list(range(12)))
    return folder


def _damage_cache(kind: str, cache: Path) -> None:
    data = cache.read_bytes()
    if kind == "truncated":
        cache.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        cache.write_bytes(b"")
    elif kind == "garbage":
        cache.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif kind == "bit-flip":
        middle = len(data) // 2
        cache.write_bytes(data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1 :])
    else:  # arrays missing, or arrays that do not fit together
        with np.load(cache) as z:
            arrays = {k: z[k] for k in z.files}
        if kind == "missing-arrays":
            del arrays["offsets"]
        else:
            arrays["offsets"] = arrays["offsets"][:-1]
        with open(cache, "wb") as handle:
            np.savez(handle, **arrays)


@pytest.mark.parametrize(
    "kind", ["truncated", "empty", "garbage", "bit-flip", "missing-arrays", "inconsistent"]
)
def test_a_damaged_binning_cache_is_rebuilt_with_a_notice(tmp_path, kind):
    folder = _shd_folder(tmp_path)
    fresh = load_dataset("shd", "test", root=folder)
    (cache,) = (folder / "cache").iterdir()
    _damage_cache(kind, cache)
    with pytest.warns(UserWarning, match=r"binning cache .* is damaged .*; rebuilding it"):
        rebuilt = load_dataset("shd", "test", root=folder)
    for i in range(len(fresh)):
        assert torch.equal(rebuilt[i][0], fresh[i][0]) and rebuilt[i][1] == fresh[i][1]
    with np.load(cache) as z:  # rewritten whole
        assert "offsets" in z.files and len(z["offsets"]) == len(fresh) + 1


def test_a_damaged_cache_does_not_stop_training(tmp_path, capsys):
    folder = _shd_folder(tmp_path / "shd")
    write_heidelberg(folder / "shd_train.h5", random_samples(40, seed=4), np.arange(40) % 20)
    load_dataset("shd", "train", root=folder)
    for cache in (folder / "cache").iterdir():
        cache.write_bytes(cache.read_bytes()[:100])
    argv = ["train", "--task", "shd", "--data-root", str(folder), "--epochs", "1"]
    argv += ["--run-dir", str(tmp_path / "run"), "--no-progress"]
    argv += ["--set", "network.hidden_sizes=[4,4]", "batch_size=16", "augment=false"]
    with pytest.warns(UserWarning, match="is damaged"):
        assert main(argv) == 0


def test_temporaries_left_in_a_shared_cache_are_cleared_once_stale(tmp_path):
    folder = _shd_folder(tmp_path)
    (folder / "cache").mkdir()
    stale = folder / "cache" / ".shd_test.dt10000us.Tvar.g5.v1.npz.0a1b2c3d.tmp"
    young = folder / "cache" / ".shd_test.dt10000us.Tvar.g5.v1.npz.89abcdef.tmp"
    for path in (stale, young):
        path.write_bytes(b"partial")
    hours_ago = time.time() - 2 * files.STALE_AFTER_S
    os.utime(stale, (hours_ago, hours_ago))
    load_dataset("shd", "test", root=folder)
    assert not stale.exists() and young.exists()  # the young one may be another writer's


def test_write_atomic_clears_stale_temporaries_of_its_target(tmp_path):
    stale, young = tmp_path / ".model.nir.0a1b2c3d.tmp", tmp_path / ".model.nir.89abcdef.tmp"
    other = tmp_path / ".report.json.01234567.tmp"
    for path in (stale, young, other):
        path.write_bytes(b"partial")
        hours_ago = time.time() - 2 * files.STALE_AFTER_S
        if path != young:
            os.utime(path, (hours_ago, hours_ago))
    files.write_text(tmp_path / "model.nir", "new")
    assert not stale.exists() and young.exists() and other.exists()


# --------------------------------------------------------------------------- empty batches
ENGINE_CASES = [(name, kind) for name, path in PATHS.items() for kind in path.delay_types]
DEVICES = ["cpu", "cuda"]
FEEDFORWARD_ENGINES = list(feedforward_engines.ENGINES)


@pytest.mark.parametrize("name,delay_type", ENGINE_CASES)
def test_an_empty_batch_never_reaches_a_path(name, delay_type):
    """Every path, called directly (whether or not it runs here: B = 0 is answered before its
    function), returns empty spikes connected to every input: zero gradients of their shapes."""
    path = PATHS[name]
    shape = (16,) if delay_type != "synaptic" else (16, 16)
    current = torch.randn(20, 0, 16, requires_grad=path.grad)
    weight = torch.randn(16, 16, requires_grad=path.grad)
    delay = torch.rand(shape, requires_grad=path.grad and not path.integer_only)
    width = torch.full((16,), 2.0, requires_grad=path.grad)
    spikes = path.run(current, weight, delay, width, LIF())
    assert spikes.shape == (20, 0, 16) and spikes.dtype == current.dtype
    if path.grad:
        spikes.sum().backward()
        for tensor in (current, weight, delay, width):
            assert tensor.grad.shape == tensor.shape and not tensor.grad.any()


@pytest.mark.skipif(native.load("axonal") is None, reason=native.unavailable("axonal"))
def test_the_compiled_path_functions_called_directly_take_an_empty_batch():
    """``cpp_recurrence`` of either module, outside the registry: its kernels divide by B, and a
    batch of 0 used to kill the process (SIGFPE). Run in a child process so a crash is a
    failure, not the end of the suite."""
    script = """
import torch
from delrec.engine import axonal, synaptic
from delrec.neurons import LIF
for module, shape in ((axonal, (8,)), (synaptic, (8, 8))):
    current = torch.randn(5, 0, 8, requires_grad=True)
    delay = (torch.rand(shape) * 3).requires_grad_()
    spikes = module.cpp_recurrence(current, torch.randn(8, 8), delay, 1.0, LIF())
    spikes.sum().backward()
    assert spikes.shape == (5, 0, 8) and not delay.grad.any()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0 and done.stdout == "ok\n", (done.returncode, done.stderr)


@pytest.mark.skipif(native.load("axonal") is None, reason=native.unavailable("axonal"))
def test_the_compiled_path_functions_refuse_a_mask_of_another_shape():
    """Called directly (the layer checks its mask first), the kernels would read past it."""
    from delrec.engine import axonal, synaptic

    for module, shape in ((axonal, (8,)), (synaptic, (8, 8))):
        args = (torch.randn(5, 3, 8), torch.randn(8, 8), torch.rand(shape) * 3, 1.0, LIF())
        with pytest.raises(RuntimeError, match="the recurrent dropout mask must be \\(B, N\\)"):
            module.cpp_recurrence(*args, torch.ones(2, 8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,delay_type", ENGINE_CASES)
def test_an_empty_batch_runs_through_the_layer_on_every_path(name, delay_type, device):
    path = PATHS[name]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available here")
    layer = DelRec(16, delay_type=delay_type, engine=name, sigma=2.0, learn_spread=path.grad)
    layer.to(device).train(path.grad)
    current = torch.randn(20, 0, 16, device=device, requires_grad=path.grad)
    with torch.set_grad_enabled(path.grad), forced_in_layers(path, device):
        spikes = layer(current)
    assert spikes.shape == (20, 0, 16) and spikes.device == current.device
    if path.grad:
        spikes.sum().backward()
        assert current.grad.shape == current.shape
        for parameter in (layer.weight, layer.delay, layer.spread_logits):
            assert parameter.grad.shape == parameter.shape and not parameter.grad.any()


@pytest.mark.parametrize("engine", FEEDFORWARD_ENGINES)
def test_an_empty_batch_runs_through_feedforward_delays(engine):
    path = feedforward_engines.PATHS.get(engine)
    if path is not None and not path.runs_on(torch.device("cpu")):
        pytest.skip(native.unavailable("feedforward"))  # the one path that may not run
    layer = FeedforwardDelay(4, 8, kernel_size=5, engine=engine)
    x = torch.rand(10, 0, 4, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.shape == (10, 0, 8) and x.grad.shape == x.shape
    for parameter in (layer.weight, layer.position, layer.bias):
        assert parameter.grad.shape == parameter.shape and not parameter.grad.any()
    with pytest.raises(ValueError, match=r"input sequence is empty \(T = 0\)"):
        layer(torch.rand(0, 3, 4))


@pytest.mark.parametrize("model", ["delrec", "ff+rec"])
@pytest.mark.parametrize("block", ["bn", "dropout"])
def test_an_empty_batch_runs_through_a_network(block, model):
    config = NetworkConfig(3, (8,), 4, model=model, block=block, recurrent_dropout=0.2)
    network = build_network(config, seed=0)
    out = network(torch.rand(10, 0, 3))
    out.sum().backward()
    assert out.shape == (10, 0, 4)
    with torch.no_grad():
        assert network.eval()(torch.rand(10, 0, 3)).shape == (10, 0, 4)


# --------------------------------------------------------------------------- absurd input
@pytest.mark.parametrize(
    "init",
    [1e8, float("inf"), float("nan"), "uniform:0:inf", "uniform:0:1e9", "half_normal:1e9"],
)
def test_absurd_initial_delays_are_refused_by_the_layer(init):
    with pytest.raises(ValueError, match="65535"):
        DelRec(16, delay_init=init)


def test_an_initialiser_drawing_absurd_delays_is_refused_naming_the_value():
    def wild(shape, generator=None):
        return torch.full(shape, 1e7, dtype=torch.float64)

    with pytest.raises(ValueError, match=r"a delay of 1e\+07 steps is out of range"):
        DelRec(4, delay_init=wild)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 1e9, -1e9])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_absurd_delays_set_after_construction_are_refused_at_forward(value, mode):
    layer = DelRec(16, delay_type="synaptic").train(mode == "train")
    with torch.no_grad():
        layer.delay[3, 5] = value
    with pytest.raises(
        ValueError, match=re.escape(f"DelRec(16) delays: a delay of {value:g} steps")
    ):
        layer(torch.rand(20, 2, 16))


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf"), 1e9])
def test_absurd_spreads_are_refused_by_the_constructor_set_spread_and_forward(sigma):
    with pytest.raises(ValueError, match="not a usable spread"):
        DelRec(16, sigma=sigma)
    network = build_network(NetworkConfig(1, (4,), 10), seed=0)
    with pytest.raises(ValueError, match="not a usable spread"):
        set_spread(network, sigma)
    layer = DelRec(16)
    layer.sigma.fill_(sigma)
    with pytest.raises(ValueError, match=r"DelRec\(16\).sigma = .* not a usable spread"):
        layer(torch.rand(5, 1, 16))


@pytest.mark.parametrize(
    "setting",
    [
        "network.delay_init=uniform:0:inf",
        "network.delay_init=1e9",
        "network.delay_init=half_normal:inf",
        "network.delay_init=NaN",
        "spread.sigma0=1e9",
        "spread.sigma0=-1",
        "network.ff_delay_window=100000",
    ],
)
def test_absurd_delay_settings_are_refused_before_any_data_loads(setting, capsys):
    assert main(["train", "--model", "ff+rec", "--set", setting, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("delrec train: error: ") and f"{MAX_DELAY:g}" in err, err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_non_finite_input_current_is_refused_naming_where(value, mode, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available here")
    layer = DelRec(16).to(device).train(mode == "train")
    current = torch.rand(20, 2, 16, device=device)
    current[4, 1, 7] = value
    with pytest.raises(ValueError, match=f"not finite: {value} at step 4, batch item 1, neuron 7"):
        layer(current)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "where", ["the weights", "the spread logits", "state's neuron", "state's spike", "mask"]
)
def test_non_finite_weights_spreads_states_and_masks_are_refused_naming_which(where, value):
    # each would silence the layer (no spikes) and make every gradient NaN, without a word
    layer = DelRec(8, learn_spread=True, sigma=2.0, recurrent_dropout=0.5)
    current = torch.rand(10, 2, 8)
    _, state = layer(current, return_state=True)
    neuron, spikes, mask, _ = state
    with torch.no_grad():
        if where == "the weights":
            layer.weight[3, 1] = value
        elif where == "the spread logits":
            layer.spread_logits[2] = value
        elif where == "state's neuron":
            neuron = (neuron[0].clone().fill_(value),)
        elif where == "state's spike":
            spikes = spikes.clone().fill_(value)
        else:
            mask = mask.clone().fill_(value)
    with pytest.raises(ValueError, match=f"{where}.* of DelRec\\(8\\) hold NaN or Inf"):
        layer(current, type(state)(neuron, spikes, mask))


@pytest.mark.parametrize("engine", FEEDFORWARD_ENGINES)
def test_non_finite_feedforward_positions_are_refused_on_every_engine(engine):
    layer = FeedforwardDelay(8, 8, kernel_size=4, engine=engine)
    with torch.no_grad():
        layer.position[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"positions \(delays\) of FeedforwardDelay\(8, 8\)"):
        layer(torch.rand(10, 2, 8))


def test_states_and_masks_of_another_kind_get_clear_errors():
    layer = DelRec(8, recurrent_dropout=0.5)
    current = torch.rand(10, 2, 8)
    _, (neuron, spikes, mask, _) = layer(current, return_state=True)
    State = type(layer(current, return_state=True)[1])
    with pytest.raises(TypeError, match="spikes holds torch.float64, the input is torch.float32"):
        layer(current, State(tuple(v.double() for v in neuron), spikes.double(), mask))
    with pytest.raises(ValueError, match=r"of the LIF neuron is a tuple of 1 tensor\(s\), got 0"):
        layer(current, State((), spikes, mask))
    with pytest.raises(ValueError, match=r"of the AdLIF neuron is a tuple of 2 tensor\(s\), got 1"):
        DelRec(8, AdLIF())(current, State(neuron, spikes, mask))
    with pytest.raises(TypeError, match="floats .* or booleans, got torch.int64"):
        layer(current, dropout_mask=torch.ones(2, 8, dtype=torch.int64))
    # a boolean or float64 mask runs as its float32 values would, on the fast path too
    keep = torch.rand(2, 8) < 0.5
    want = layer(current, dropout_mask=keep.float())
    assert torch.equal(layer(current, dropout_mask=keep), want)
    assert torch.equal(layer(current, dropout_mask=keep.double()), want)


def test_a_readout_state_for_a_readout_without_one_is_refused():
    net = build_network(NetworkConfig(3, (4,), 2, readout="sum"), seed=0).eval()
    _, state = net(torch.rand(5, 2, 3), return_state=True)
    assert state.readout is None
    with pytest.raises(ValueError, match="'sum' readout keeps no state between chunks"):
        net(torch.rand(5, 2, 3), state._replace(readout=(torch.zeros(2, 2),)))


def test_a_state_with_an_absurd_step_count_is_refused():
    """``steps`` decides whether a state's history can still serve the delays: a negative or
    fractional count skipped that check."""
    layer = DelRec(8)
    current = torch.rand(10, 2, 8)
    _, state = layer(current, return_state=True)
    for steps in (-5, 3.5, "10"):
        with pytest.raises(
            ValueError, match=f"state.steps must be the whole number .* got {steps!r}"
        ):
            layer(current, state._replace(steps=steps))
    assert layer(current, state._replace(steps=None)).shape == current.shape


def test_absurd_neuron_parameters_and_neuron_classes_are_refused():
    for make, match in [
        (lambda: LIF(v_threshold=float("nan")), "LIF v_threshold must be a finite number"),
        (lambda: LIF(v_reset=float("inf")), "LIF v_reset must be a finite number"),
        (lambda: AdLIF(tau_u=-2.0), "AdLIF tau_u must be a positive number"),
        (lambda: AdLIF(tau_w=0.0), "AdLIF tau_w must be a positive number"),
        (lambda: AdLIF(tau_u=float("nan")), "AdLIF tau_u must be a positive number"),
        (lambda: AdLIF(b=float("nan")), "AdLIF b must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(TypeError, match="must be an instance, got the class LIF"):
        DelRec(8, LIF)


def test_absurd_sizes_and_initialisers_are_refused_at_construction():
    for make, match in [
        (lambda: DelRec(0), "DelRec size .* >= 1, got 0"),
        (lambda: DelRec(2.5), "DelRec size .* >= 1, got 2.5"),
        (lambda: FeedforwardDelay(0, 4), "in_features must be a whole number >= 1, got 0"),
        (lambda: FeedforwardDelay(3, 4, kernel_size=2.5), "kernel_size .* got 2.5"),
        (lambda: NetworkConfig(0, (4,), 2), "input_size must be a whole number >= 1, got 0"),
        (lambda: NetworkConfig(1, (4, -1), 2), "hidden_sizes must be a whole number >= 1"),
        (lambda: DelRec(4, delay_init="uniform:a:b"), "arguments must be numbers of steps"),
        (
            lambda: DelRec(8, delay_init=lambda shape, g: torch.zeros(3)),
            r"gave \(3,\); axonal delays of DelRec\(8\) need a tensor of shape \(8,\)",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            make()


def test_settings_of_the_wrong_kind_are_refused_not_read_as_truthy_or_cut_off():
    """A string where a flag belongs was taken as True (``bias="no"`` built biases), a
    non-integer layer index matched no layer (``recurrent_layers=(0.5,)`` built the snn model),
    and a string probability failed inside a comparison."""
    for make, error, match in [
        (
            lambda: NetworkConfig(6, (8, 8), 3, recurrent_layers=(0.5,)),
            ValueError,
            r"recurrent_layers \[0.5\]: each must be the index of a hidden layer",
        ),
        (
            lambda: NetworkConfig(6, (8, 8), 3, recurrent_layers=(True,)),
            ValueError,
            r"recurrent_layers \[True\]",
        ),
        (
            lambda: NetworkConfig(6, (8, 8), 3, recurrent_layers=0),
            TypeError,
            "recurrent_layers must be a list of whole numbers, got 0",
        ),
        (
            lambda: NetworkConfig(6, (8,), 3, bias="no"),
            TypeError,
            "bias must be True or False, got 'no'",
        ),
        (
            lambda: NetworkConfig(6, (8,), 3, ff_delay_window="26"),
            ValueError,
            "ff_delay_window must be between 1 and .* got '26'",
        ),
        (
            lambda: build_network(NetworkConfig(6, (8,), 3, neuron={"surrogate": 5})),
            TypeError,
            r"neuron surrogate must be one of \['atan', 'triangle'\], got 5",
        ),
        (lambda: build_network({}), TypeError, "build_network takes a NetworkConfig, got dict"),
        (
            lambda: build_network(NetworkConfig(6, (8,), 3), seed="a"),
            TypeError,
            "seed must be a whole number or None, got 'a'",
        ),
        (
            lambda: DelRec(4, learn_delays="no"),
            TypeError,
            "DelRec learn_delays must be True or False, got 'no'",
        ),
        (
            lambda: DelRec(4, recurrent_dropout="0.3"),
            TypeError,
            "recurrent_dropout must be a number in \\[0, 1\\), got '0.3'",
        ),
        (lambda: DelRec(4)([[1.0] * 4]), TypeError, "DelRec takes a tensor, got list"),
        (
            lambda: FeedforwardDelay(4, 3)([[1.0] * 4]),
            TypeError,
            "FeedforwardDelay takes a tensor, got list",
        ),
    ]:
        with pytest.raises(error, match=match):
            make()


def test_settings_changed_after_construction_are_checked_where_they_are_used():
    """A NetworkConfig is a plain dataclass and a DelRec's dropout a plain attribute: values
    set after construction went unchecked (a KeyError, torch's own errors, a dropout of 1 drew
    a NaN mask that was blamed on a diverged run)."""
    for field, value, match in [
        ("model", "bogus", "unknown model 'bogus'"),
        ("hidden_sizes", (8, -2), "each of hidden_sizes must be a whole number >= 1, got -2"),
        ("readout_tau", 0.1, "readout_tau must be a number of time steps >= 1, got 0.1"),
        ("recurrent_layers", (7,), r"recurrent_layers \[7\]"),
    ]:
        config = NetworkConfig(6, (8, 8), 3)
        setattr(config, field, value)
        with pytest.raises(ValueError, match=match):
            build_network(config)
    layer = DelRec(4)
    for value in (1.0, -0.5):
        with pytest.raises(
            ValueError, match=f"recurrent_dropout must be in \\[0, 1\\), got {value}"
        ):
            layer.recurrent_dropout = value
    layer.recurrent_dropout = 0.25
    assert layer.recurrent_dropout == 0.25 and "recurrent_dropout=0.25" in repr(layer)


@pytest.mark.parametrize("engine", FEEDFORWARD_ENGINES)
def test_non_finite_feedforward_weights_and_biases_are_refused_on_every_engine(engine):
    for name, value in [("weight", float("nan")), ("bias", float("inf"))]:
        layer = FeedforwardDelay(8, 8, kernel_size=4, engine=engine)
        with torch.no_grad():
            getattr(layer, name).view(-1)[5] = value
        with pytest.raises(ValueError, match=f"NaN or Inf in the {name}.? of FeedforwardDelay"):
            layer(torch.rand(10, 2, 8))
    layer = FeedforwardDelay(8, 8, kernel_size=4, engine=engine).double()
    with torch.no_grad():
        layer.weight.fill_(1e308)  # finite, though their sum overflows: accepted
    assert layer(torch.rand(10, 2, 8, dtype=torch.float64)).shape == (10, 2, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_run_on_a_path_that_takes_them(dtype):
    # the compiled paths take float32 and float64; a half-precision layer gets a PyTorch path
    layer = DelRec(8, recurrent_dropout=0.2).to(dtype)
    current = torch.rand(10, 2, 8, dtype=dtype) * 2
    layer(current).float().sum().backward()
    assert layer.weight.grad.dtype == dtype and bool(layer.weight.grad.isfinite().all())
    with torch.no_grad():
        assert layer.eval()(current).dtype == dtype
    with pytest.raises(TypeError, match="FeedforwardDelay runs float32 and float64 inputs"):
        FeedforwardDelay(8, 8, kernel_size=4).to(dtype)(current)
    assert FeedforwardDelay(8, 8, kernel_size=4)(current[:, 0].float()).shape == (10, 8)
    if PATHS["cpp-axonal"].available("cpu"):  # a compiled path, forced: says what it takes
        with pytest.raises(TypeError, match=f"'cpp-axonal' takes .*float64.*, not {dtype}"):
            DelRec(8, engine="cpp-axonal").to(dtype)(current)


@pytest.mark.parametrize("name,delay_type", ENGINE_CASES)
def test_every_path_returns_contiguous_spikes(name, delay_type):
    path = PATHS[name]
    if not path.available("cpu"):
        needs = "a CUDA GPU with triton" if name.startswith("triton") else "a C++ compiler"
        pytest.skip(f"{name} does not run here: it needs {needs}")
    layer = DelRec(8, delay_type=delay_type, engine=name).train(not path.integer_only)
    with torch.set_grad_enabled(path.grad):
        assert layer(torch.rand(10, 2, 8) * 2).is_contiguous()


def test_eval_refuses_delays_beyond_max_delay_until_they_are_clamped():
    # weights loaded from a layer without the limit: a chip could not run them
    layer = DelRec(8, max_delay=2, delay_init="uniform:0:2")
    with torch.no_grad():
        layer.delay.copy_(torch.linspace(0, 4, 8))
    current = torch.rand(10, 2, 8)
    layer(current)  # training: between an optimizer step and the clamp, allowed
    with pytest.raises(ValueError, match="reach 4 steps, beyond its max_delay = 2: clamp them"):
        layer.eval()(current)
    clamp_delays(layer)
    assert layer(current).shape == (10, 2, 8)


@pytest.mark.parametrize("model", ["snn", "delrec"])
def test_a_network_refuses_bad_input_before_any_layer_runs(model):
    # a NaN used to reach BatchNorm's running statistics first (spoiling every later
    # evaluation), and silenced the networks without a DelRec layer without a word
    net = build_network(NetworkConfig(3, (4,), 2, model=model, block="bn"), seed=0).train()
    bad = torch.randn(5, 2, 3)
    bad[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="input is not finite: nan at step 2, batch item 1"):
        net(bad)
    assert torch.equal(net.blocks[0].norm.running_mean, torch.zeros(4))
    with pytest.raises(ValueError, match=r"empty \(T = 0\)"):
        net(torch.rand(0, 2, 3))
    with pytest.raises(TypeError, match="input dtype torch.float64 does not match"):
        net(torch.rand(5, 2, 3, dtype=torch.float64))
    assert net(torch.full((5, 2, 3), 2e37)).shape == (5, 2, 2)  # its sum overflows: accepted
    _, state = net.eval()(torch.rand(5, 2, 3), return_state=True)  # a state of batch 2
    with pytest.raises(ValueError, match="a state belongs to the batch it was computed for"):
        net(torch.rand(5, 3, 3), state)


def test_a_huge_finite_current_whose_sum_overflows_is_accepted():
    layer = DelRec(16).eval()
    with torch.no_grad():
        assert layer(torch.full((20, 2, 16), 3e38)).shape == (20, 2, 16)


@pytest.mark.parametrize("delay_type", ["axonal", "synaptic"])
def test_integer_delay_eval_of_long_delays_is_exact_and_needs_a_buffer_of_the_sequence(
    delay_type,
):
    """Delays up to 60,000 steps on a 20-step input: the ring holds at most T + 1 frames (not
    60,001) and gives the reference's spikes; a few short delays keep the recurrence busy."""
    g = torch.Generator().manual_seed(5)
    layer = DelRec(16, delay_type=delay_type, delay_init="uniform:0:60000", generator=g).eval()
    with torch.no_grad():
        short = layer.delay.view(-1)[::5]
        short.copy_(torch.randint(0, 6, short.shape, generator=g).float())
    reference = DelRec(16, delay_type=delay_type, engine="reference").eval()
    reference.load_state_dict(layer.state_dict())
    current = torch.rand(20, 3, 16, generator=g) * 2
    with torch.no_grad():
        spikes = layer(current)
        assert torch.equal(spikes, reference(current)) and spikes.sum() > 0
    lags = 1 + layer.delay.detach().long().expand(16, 16)
    assert DelayedSynapses(layer.weight.detach(), lags, horizon=20).max_lag <= 20  # the window:
    # at most max_lag past frames and the T steps of the chunk, not 60,001
    with torch.no_grad():
        _, state = layer(current, return_state=True)
    assert state.spikes.shape[0] <= 20  # a state keeps no more steps than the sequence had


def test_absurd_lags_are_refused_by_the_ring_buffer():
    with pytest.raises(ValueError, match="exceeds MAX_DELAY"):
        DelayedSynapses(torch.ones(2, 2), torch.full((2, 2), 10**9))


@pytest.mark.filterwarnings("ignore::delrec.delays.DelayLimitWarning")  # said, and meant here
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("delay", [-0.4, -1.5, -3.0, -7.3])
@pytest.mark.parametrize("name,delay_type", [c for c in ENGINE_CASES if c[0] != "reference"])
def test_negative_delays_set_after_construction_agree_on_every_path(
    name, delay_type, delay, device
):
    """Between an optimizer step and the clamp a delay may be negative: every path reads it as
    the reference does (the kernel loses its mass below lag 1), none raises. A gradient path
    in training and the integer-delay eval (delays rounded to 0), an inference path in eval."""
    path = PATHS[name]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available here")
    g = torch.Generator().manual_seed(7)
    fast, reference = layers = [
        DelRec(6, delay_type=delay_type, engine=engine, sigma=1.0, generator=g).double().to(device)
        for engine in (name, "reference")
    ]
    reference.load_state_dict(fast.state_dict())
    current = (torch.rand(20, 2, 6, generator=g, dtype=torch.float64) * 1.6).to(device)
    results = []
    with forced_in_layers(path, device):
        for layer in layers:
            with torch.no_grad():
                layer.delay.fill_(delay)
                if layer.delay.numel() > 1:  # one ordinary delay (not the shared one)
                    layer.delay.view(-1)[0] = 2.0
            if path.grad:
                x = current.clone().requires_grad_()
                spikes = layer(x)
                spikes.sum().backward()
                results.append((spikes, x.grad, layer.weight.grad, layer.delay.grad))
        with torch.no_grad():  # integer-delay eval rounds a negative delay to 0
            expected = reference.eval()(current)
            assert torch.equal(fast.eval()(current), expected) and expected.any()
    if not path.grad:  # an integer-delay inference path: the eval comparison above
        return
    assert torch.equal(results[0][0], results[1][0]) and results[1][0].any()
    for actual, expected in zip(results[0][1:], results[1][1:]):
        assert_close_relative(actual, expected)


def test_import_nir_refuses_absurd_delays_and_non_nir_files(tmp_path):
    nir = pytest.importorskip("nir", reason="NIR import needs the optional `nir` package")
    from delrec.deploy import NIRImportError, export_nir, import_nir

    network = build_network(
        NetworkConfig(2, (4,), 3, delay_init="uniform:0:5", neuron={"reset": "hard"}), seed=0
    ).eval()
    graph = export_nir(network, tmp_path / "model.nir")
    delay_node = next(n for n in graph.nodes.values() if isinstance(n, nir.Delay))
    for value in (1e12, float("inf"), float("nan")):
        delay_node.delay = np.full_like(delay_node.delay, value)
        nir.write(tmp_path / "absurd.nir", graph)
        with pytest.raises(NIRImportError, match=re.escape(f"holds a delay of {value:g} steps")):
            import_nir(tmp_path / "absurd.nir")
    graph.metadata["dt"] = -1.0
    with pytest.raises(NIRImportError, match="not a positive number of seconds"):
        import_nir(graph)
    with pytest.raises(FileNotFoundError, match="no NIR file"):
        import_nir(tmp_path / "missing.nir")


# --------------------------------------------------------------------------- damaged files
def _network():
    return build_network(
        NetworkConfig(1, (4,), 3, delay_init="uniform:0:5", neuron={"reset": "hard"}), seed=0
    ).eval()


def _nir_reader():
    pytest.importorskip("nir", reason="NIR import needs the optional `nir` package")
    from delrec.deploy import NIRImportError, export_nir, import_nir

    return (lambda p: export_nir(_network(), p)), import_nir, NIRImportError


def _toml(path: Path) -> None:
    path.write_text(
        'epochs = 3\nbatch_size = 16\n\n[optim]\nlr = 0.001\nscheduler = "cosine"\n',
        encoding="utf-8",
    )


def _idx(path: Path) -> None:
    images = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    header = bytes([0, 0, 8, 3]) + np.array(images.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + images.tobytes())


# reader -> (write a valid file, read it, the error a damaged one gives, file name)
READERS = {
    "checkpoint": (
        lambda p: save_checkpoint(network_payload(_network()), p),
        read_checkpoint,
        CheckpointError,
        "best.pt",
    ),
    "nir": (None, None, None, "model.nir"),  # needs the optional package: see _nir_reader
    "hdf5": (
        lambda p: write_heidelberg(p, random_samples(30, seed=1), np.arange(30) % 20),
        lambda p: load_dataset("shd", "test", root=p.parent),
        DataError,
        "shd_test.h5",
    ),
    "idx": (_idx, read_idx, DataError, "t10k-images-idx3-ubyte.gz"),
    "config-toml": (_toml, load_config_file, ConfigError, "settings.toml"),
    "config-json": (
        lambda p: p.write_text(json.dumps(tiny_config().to_dict(), indent=2)),
        load_config_file,
        ConfigError,
        "settings.json",
    ),
}
DAMAGE = {
    "empty": lambda data: b"",
    "first-half": lambda data: data[: len(data) // 2],
    "first-quarter": lambda data: data[: len(data) // 4],
    "garbage": lambda data: np.random.default_rng(1).bytes(len(data)),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("reader", list(READERS))
def test_every_reader_turns_a_damaged_file_into_its_error(tmp_path, reader, damage):
    write, read, error, name = READERS[reader]
    if reader == "nir":
        write, read, error = _nir_reader()
    path = tmp_path / name
    write(path)
    read(path)  # the valid file reads
    if (reader, damage) == ("config-toml", "empty"):  # valid TOML: no settings at all
        path.write_bytes(b"")
        assert read(path) == {}
        return
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    (tmp_path / "cache").mkdir(exist_ok=True)
    for cache in (tmp_path / "cache").iterdir():
        cache.unlink()  # the HDF5 reader must read the damaged file itself
    with pytest.raises(error) as raised:
        read(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("name", ["config.json", "seeds.json"])
def test_damaged_run_files_are_bad_input_for_resume(tmp_path, capsys, name):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).write_text('{"config": {"task": "digits-8x8", "epo')
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 2
    assert f"{run_dir / name} cannot be read" in capsys.readouterr().err


def test_a_damaged_config_file_is_bad_input_for_train(tmp_path, capsys):
    path = tmp_path / "settings.toml"
    path.write_bytes(b"epochs = 3\n[opt\xff\xfe")
    assert main(["train", "--config", str(path), "--print-config"]) == 2
    assert f"config file {path} cannot be parsed" in capsys.readouterr().err


def test_config_files_nested_too_deeply_or_with_a_key_twice_are_bad_input(tmp_path, capsys):
    """Deep nesting ended in a RecursionError traceback (exit 1), in a config file, a --set
    value and a run's own files alike; a JSON key given twice kept its last value silently."""
    deep = {
        "deep.json": '{"epochs": ' + "[" * 5000 + "]" * 5000 + "}",
        "deep.toml": "a = " + "[" * 5000,
    }
    for name, text in deep.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert main(["train", "--config", str(tmp_path / name), "--print-config"]) == 2
        assert (
            "cannot be parsed: its lists or tables are nested too deeply" in capsys.readouterr().err
        )
    assert main(["train", "--print-config", "--set", "network.hidden_sizes=" + "[" * 5000]) == 2
    assert "--set network.hidden_sizes: the value is nested too deeply" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "test_results.json"):
        (run / name).write_text("[" * 5000, encoding="utf-8")
    assert main(["compare", str(run), "--rounded-only"]) == 2
    assert "cannot be read (maximum recursion depth" in capsys.readouterr().err
    twice = tmp_path / "twice.json"
    twice.write_text('{"epochs": 1, "epochs": 2}', encoding="utf-8")
    assert main(["train", "--config", str(twice), "--print-config"]) == 2
    assert "the key 'epochs' is given twice in one object" in capsys.readouterr().err


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path, capsys):
    """Editors on Windows may start a UTF-8 file with a byte-order mark; TOML called it an
    invalid statement at line 1, column 1."""
    for name, text in [("bom.toml", "epochs = 7\n"), ("bom.json", '{"epochs": 7}')]:
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert main(["train", "--config", str(tmp_path / name), "--print-config"]) == 0
        assert json.loads(capsys.readouterr().out)["epochs"] == 7


# --------------------------------------------------------------------------- downloads
class Server(BaseHTTPRequestHandler):
    """Serves ``files``; a path in ``stall`` sends ``stall_bytes`` of its body and then waits
    (the connection open, nothing sent) until ``release`` is set."""

    files: dict[str, bytes] = {}
    stall: set[str] = set()
    stall_bytes = 100_000
    release = threading.Event()

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in self.stall:
            self.stall.discard(self.path)
            self.wfile.write(body[start : start + self.stall_bytes])
            self.wfile.flush()
            self.release.wait(30)
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Server.files, Server.stall, Server.release = {}, set(), threading.Event()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    Server.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _zipped_shd(name: str, seed: int) -> tuple[bytes, bytes]:
    """The bytes of a small SHD-layout file and of a .zip holding it."""
    path = Path(f"/tmp/delrec-faults-{os.getpid()}-{name}")
    write_heidelberg(path, random_samples(5, seed=seed), [1, 2, 3, 4, 5])
    payload = path.read_bytes()
    path.unlink()
    archive = Path(f"{path}.zip")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(name, payload)
    data = archive.read_bytes()
    archive.unlink()
    return payload, data


def _unreachable() -> str:
    """A URL of a port on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/official"


UNREACHABLE = _unreachable()


def test_a_stalled_transfer_keeps_every_byte_it_received(tmp_path, server):
    archive = gzip.compress(np.random.default_rng(2).bytes(300_000), compresslevel=0)
    Server.files["/big.gz"] = archive
    Server.stall.add("/big.gz")
    resource = Resource(server + "/big.gz", hashlib.md5(archive).hexdigest(), "big")
    with pytest.raises(DataError, match="broke off"):
        download("mnist", tmp_path, resources=[resource], retries=0, timeout=1.0, progress=False)
    part = tmp_path / "big.gz.part"
    assert part.read_bytes() == archive[: Server.stall_bytes]  # more than one 64 KiB block
    Server.release.set()
    download("mnist", tmp_path, resources=[resource], retries=0, progress=False)
    assert (tmp_path / "big").read_bytes() == gzip.decompress(archive)


def test_a_mirror_replaces_the_official_servers(tmp_path, server, monkeypatch, capsys):
    payload, archive = _zipped_shd("shd_test.h5", seed=1)
    resource = Resource(f"{UNREACHABLE}/shd_test.h5.zip", hashlib.md5(archive).hexdigest(), "x.h5")
    Server.files["/mirror/shd_test.h5.zip"] = archive
    download(
        "shd", tmp_path / "a", resources=[resource], mirror=server + "/mirror/", progress=False
    )
    assert (tmp_path / "a" / "x.h5").read_bytes() == payload
    monkeypatch.setenv("DELREC_MIRROR", server + "/mirror")
    download("shd", tmp_path / "b", resources=[resource], progress=False)
    assert (tmp_path / "b" / "x.h5").read_bytes() == payload
    folder = tmp_path / "mirror-folder"  # a folder works as a mirror too
    folder.mkdir()
    (folder / "shd_test.h5.zip").write_bytes(archive)
    download("shd", tmp_path / "c", resources=[resource], mirror=str(folder), progress=False)
    assert (tmp_path / "c" / "x.h5").read_bytes() == payload
    # the command line option, over the variable
    monkeypatch.setitem(RESOURCES, "shd", [resource])
    monkeypatch.setenv("DELREC_MIRROR", UNREACHABLE)
    argv = ["data", "download", "shd", "--to", str(tmp_path / "d"), "--quiet"]
    assert main([*argv, "--mirror", f"{server}/mirror"]) == 0
    assert (tmp_path / "d" / "x.h5").read_bytes() == payload
    assert main(["data", "download", "shd", "--to", str(tmp_path / "e"), "--quiet"]) == 1
    assert f"cannot reach {UNREACHABLE}/shd_test.h5.zip" in capsys.readouterr().err
    fresh = ["data", "download", "shd", "--to", str(tmp_path / "f"), "--quiet"]
    assert main([*fresh, "--mirror", f"{UNREACHABLE}/elsewhere"]) == 1
    assert "is the mirror right" in capsys.readouterr().err  # not "no network?"
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for bad, problem in [
        ("https://", "is not a URL delrec can fetch from"),
        ("ftp://host/x", "is not a URL delrec can fetch from"),
        (str(tmp_path / "missing"), "does not exist: give the folder of the archives"),
        (str(afile), "is a file, not a folder: give the folder of the archives"),
        (str(empty), f"the mirror folder {empty} holds no shd_test.h5.zip: put the official"),
        (empty.as_uri(), f"the mirror folder {empty} holds no shd_test.h5.zip"),
    ]:
        assert main([*fresh, "--mirror", bad]) == 2  # bad input, not a network failure
        err = capsys.readouterr().err
        assert problem in err and "Errno" not in err, err


def test_a_local_archive_failing_its_checksum_is_reported_as_such(tmp_path, monkeypatch, capsys):
    _, archive = _zipped_shd("shd_test.h5", seed=1)
    resource = Resource(f"{UNREACHABLE}/shd_test.h5.zip", "0" * 32, "shd_test.h5")
    (tmp_path / "shd_test.h5.zip").write_bytes(archive)
    monkeypatch.setitem(RESOURCES, "shd", [resource])
    assert main(["data", "download", "shd", "--to", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'shd_test.h5.zip'} fails its checksum: MD5 " in err
    assert "expected 00000000000000000000000000000000" in err and "cannot reach" not in err
    assert (tmp_path / "shd_test.h5.zip").exists()  # the user's file is not deleted


def test_a_damaged_archive_in_a_mirror_folder_is_bad_input(tmp_path, monkeypatch, capsys):
    """It was a failed transfer (exit 1) whose advice, to run the command again, could never
    help: the mirror's copy gives the same bytes every time."""
    _, archive = _zipped_shd("shd_test.h5", seed=1)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "shd_test.h5.zip").write_bytes(archive)
    monkeypatch.setitem(
        RESOURCES, "shd", [Resource(f"{UNREACHABLE}/shd_test.h5.zip", "0" * 32, "shd_test.h5")]
    )
    command = ["data", "download", "shd", "--to", str(tmp_path / "d"), "--mirror", str(mirror)]
    assert main([*command, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the archive in the mirror folder is damaged or another version; replace it" in err
    assert (mirror / "shd_test.h5.zip").read_bytes() == archive  # the mirror is not touched


def test_files_damaged_after_extraction_are_noticed(tmp_path, server, capsys):
    payload, archive = _zipped_shd("shd_test.h5", seed=1)
    Server.files["/shd_test.h5.zip"] = archive
    resource = Resource(server + "/shd_test.h5.zip", hashlib.md5(archive).hexdigest(), "x.h5")
    target = tmp_path / "x.h5"
    download("shd", tmp_path, resources=[resource], progress=False)
    target.write_bytes(b"garbage" * 100)  # damaged since: fetched again, with a note
    assert download("shd", tmp_path, resources=[resource], progress=False) == [target]
    assert target.read_bytes() == payload
    assert "is damaged: fetching it again" in capsys.readouterr().err
    # put there by hand (no record): its format is checked
    (tmp_path / "x.h5.md5").unlink()
    download("shd", tmp_path, resources=[resource], progress=False)  # a real HDF5 file: fine
    target.write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match=r"x.h5 is already there but it is not an HDF5 file"):
        download("shd", tmp_path, resources=[resource], progress=False)
    target.write_bytes(payload[: len(payload) * 9 // 10])  # truncated: the signature is there
    with pytest.raises(DataError, match=r"x.h5 is already there but it cannot be read to its end"):
        download("shd", tmp_path, resources=[resource], progress=False)
    idx = tmp_path / "t10k-labels-idx1-ubyte"
    idx.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))  # declares 9 labels, holds 2
    with pytest.raises(DataError, match="is already there but it is not a whole idx file"):
        download("mnist", tmp_path, resources=[Resource("x/t10k.gz", "0" * 32, idx.name)])


# --------------------------------------------------------------------------- killed processes
# runs `delrec ARGS…` with a fault: SIGKILL while writing the TARGET-th file named NAME (its
# temporary half written), at optimizer step STEP, or SECONDS after the first optimizer step
KILLER = """
import os, signal, sys, threading
from torch.optim.optimizer import register_optimizer_step_post_hook
from delrec import cli, files
kind, value, args = sys.argv[1], sys.argv[2], sys.argv[3:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if kind.startswith("write:"):
    name, count, flush = kind[6:], [int(value)], files._flush_to_disk
    def crash_while_writing(path):
        if files.temporary_target(path) == name:
            count[0] -= 1
            if count[0] == 0:
                os.truncate(path, os.path.getsize(path) // 2)
                die()
        flush(path)
    files._flush_to_disk = crash_while_writing
else:
    steps = [0]
    def after_step(optimizer, a, k):
        steps[0] += 1
        if kind == "step" and steps[0] == int(value):
            die()
        if kind == "time" and steps[0] == 1:
            threading.Timer(float(value), die).start()
    register_optimizer_step_post_hook(after_step)
from delrec.cli import main
sys.exit(main(args))
"""

_fault_rng = random.Random(17)
FAULTS = [
    ("write:config.json", "1"),
    ("write:best.pt", "1"),
    ("write:last.pt", "2"),
    ("write:test_results.json", "1"),
    ("step", str(_fault_rng.randint(1, 12))),  # 3 epochs × 2 batches × 2 optimizers
    ("time", f"{_fault_rng.uniform(0.0, 1.5):.2f}"),
]


def trained_run(tmp_path_factory, name: str, arguments: list[str]):
    """The run directory of ``delrec train ARGUMENTS`` in a fresh folder ``name`` (the
    command's thread setting undone)."""
    run_dir = tmp_path_factory.mktemp(name) / "run"
    threads = torch.get_num_threads()
    assert main(["train", *arguments, "--run-dir", str(run_dir)]) == 0
    torch.set_num_threads(threads)
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return trained_run(tmp_path_factory, "whole", TINY)


@pytest.mark.parametrize("kind,value", FAULTS, ids=[f"{k}={v}" for k, v in FAULTS])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, kind, value):
    run_dir = tmp_path / "run"
    killed = delrec_process(kind, value, "train", *TINY, "--run-dir", str(run_dir), script=KILLER)
    _, err = killed.communicate(timeout=300)
    if killed.returncode == 0:  # the timer fired after the run had ended
        assert kind == "time", err
    else:
        assert killed.returncode == -signal.SIGKILL, err
    if (run_dir / "config.json").is_file():
        assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    else:  # killed before the run existed: the same command again starts it
        assert main(["train", *TINY, "--run-dir", str(run_dir)]) == 0

    assert_identical(state_of(uninterrupted), state_of(run_dir))
    for which in ("best",):
        assert_identical(
            read_checkpoint(uninterrupted / "checkpoints" / f"{which}.pt")["model"],
            read_checkpoint(run_dir / "checkpoints" / f"{which}.pt")["model"],
        )

    def without_time(run):
        return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in read_metrics(run)]

    assert without_time(run_dir) == without_time(uninterrupted)
    assert (run_dir / "test_results.json").read_text() == (
        uninterrupted / "test_results.json"
    ).read_text()
    assert not list(run_dir.rglob(".*.tmp")) and not (run_dir / LOCK).exists()


def test_a_process_group_that_cannot_form_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert main(["train", *TINY, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "launch with torchrun, or set MASTER_ADDR and MASTER_PORT" in err, err
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # rank 1 never comes
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    argv = ["train", *TINY, "--run-dir", str(tmp_path / "run"), "--dist-timeout", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "the 2 processes did not all join within 2 s" in err and "Traceback" not in err, err
    assert "with a --dist-timeout above 2 s if the processes start further apart" in err
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- CLI audit
# outputs that would overwrite a run's files; checkpoints and run files edited by hand
MG_TINY = [
    "--epochs",
    "1",
    "--set",
    "data.samples=800",
    "data.window=40",
    "network.hidden_sizes=[8]",
    "network.max_delay=50",
    "max_train_samples=64",
    "--no-progress",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished Mackey-Glass DelRec run (one epoch), to be copied and damaged."""
    return trained_run(tmp_path_factory, "finished", MG_TINY)


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def _contents(run: Path) -> dict:
    return {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}


def test_export_refuses_an_output_that_is_the_checkpoint_or_a_run_file(run_copy, capsys):
    best = run_copy / "checkpoints" / "best.pt"
    link = run_copy.parent / "link.nir"
    link.symlink_to(run_copy / "metrics.csv")
    before = _contents(run_copy)
    for source, output in [
        (run_copy, best),
        (run_copy, run_copy / "config.json"),
        (run_copy, run_copy / "figures" / ".." / "test_results.json"),
        (run_copy, link),  # through a symlink
        (best, best),
        (best, run_copy / "metrics.csv"),  # a checkpoint file: the files of its run too
    ]:
        assert main(["export", str(source), "-o", str(output)]) == 2, output
        err = capsys.readouterr().err
        assert f"-o {output} would overwrite {output.resolve()}, a file of the run" in err, err
        default = run_copy / ("model.nir" if source.is_dir() else "best.nir")
        assert f"write the NIR file elsewhere, e.g. -o {default}" in err, err
    assert _contents(run_copy) == before
    pytest.importorskip("nir", reason="NIR export needs the optional `nir` package")
    for _ in range(2):  # an earlier export is replaced, not refused
        assert main(["export", str(run_copy)]) == 0
    assert (run_copy / "model.nir").is_file()
    assert main(["export", str(best)]) == 0  # beside the run's files, not among its checkpoints
    assert (run_copy / "best.nir").is_file()


def test_compare_refuses_outputs_that_overwrite_a_run_file_or_each_other(run_copy, capsys):
    before = _contents(run_copy)
    table = run_copy.parent / "table.md"
    for options, message in [
        (["--markdown", str(run_copy / "metrics.csv")], "--markdown"),
        (["--csv", str(run_copy / "checkpoints" / "best.pt")], "--csv"),
        (["--markdown", str(table), "--csv", str(table)], "--markdown and --csv both name"),
        (["--csv", str(table), "--figure", str(table)], "--csv and --figure both name"),
        (
            ["--markdown", str(table), "--csv", str(table / "t.csv")],
            "would also be the folder of --csv",
        ),
    ]:
        assert main(["compare", str(run_copy), "--rounded-only", *options]) == 2, options
        err = capsys.readouterr().err
        assert message in err and ("would overwrite" in err or "its own path" in err), err
    assert _contents(run_copy) == before and not table.exists()


def test_compare_refuses_runs_it_would_misread(uninterrupted, run_copy, tmp_path, capsys):
    """Runs of two tasks (a table ranks one task's models); a metrics.csv without the best
    epoch's row (the row's firing rate came from the other seeds, or was left out); a missing
    best.pt named as such; an unfinished seed sent to its folder's resume, which also writes the
    summary, or named as still training while its lock's holder lives."""
    assert main(["compare", str(uninterrupted), str(run_copy), "--rounded-only"]) == 2
    err = capsys.readouterr().err
    assert f"the runs are of several tasks: digits-8x8 ({uninterrupted}), mackey-glass" in err

    metrics = run_copy / "metrics.csv"
    rows = metrics.read_text(encoding="utf-8")
    metrics.write_text(rows.splitlines()[0] + "\n", encoding="utf-8")  # cut short
    assert main(["compare", str(run_copy), "--rounded-only"]) == 2
    err = capsys.readouterr().err
    assert "metrics.csv has no row for epoch 1, the best epoch in test_results.json" in err, err
    metrics.write_text(rows, encoding="utf-8")

    (run_copy / "checkpoints" / "best.pt").unlink()
    assert main(["compare", str(run_copy), "--rounded-only"]) == 2
    err = capsys.readouterr().err
    assert f"the run {run_copy} has no best checkpoint" in err and "(last.pt is there)" in err

    seeds = tmp_path / "seeds"
    tiny = ["--seeds", "0-1", "--max-epochs-this-run", "1", "--run-dir", str(seeds)]
    assert main(["train", *MG_TINY, *tiny]) == 0  # seed 0 trained, seed 1 not started
    capsys.readouterr()
    assert main(["compare", str(seeds), "--rounded-only"]) == 2
    err = capsys.readouterr().err
    assert f"complete it with `delrec train --resume {seeds}`" in err, err
    (seeds / "run.lock").write_text(files.lock_holder(), encoding="utf-8")  # a live holder
    assert main(["compare", str(seeds), "--rounded-only"]) == 2
    assert f"it is still training (pid {os.getpid()} on host" in capsys.readouterr().err


def test_resume_says_what_a_damaged_or_missing_checkpoint_of_the_run_costs(
    tmp_path_factory, capsys
):
    """Not eval's "use the run's other checkpoint": on resume, last.pt is what continues the
    run, and best.pt the network the test split measures; both are read before any epoch
    trains (a missing best.pt was found after the remaining epochs). A config.json edited
    since names what differs."""
    tiny = [*MG_TINY[:1], "2", *MG_TINY[2:]]  # two epochs
    run = trained_run(tmp_path_factory, "half", [*tiny, "--max-epochs-this-run", "1"])
    best, last = run / "checkpoints" / "best.pt", run / "checkpoints" / "last.pt"
    whole, metrics = best.read_bytes(), (run / "metrics.csv").read_bytes()
    resume = ["train", "--resume", str(run), "--no-progress"]
    lost = "the run's best-validation network is lost: restore best.pt from a copy"
    for damage, message in [
        (lambda: best.write_bytes(whole[:100]), f"checkpoint {best} is corrupt"),
        (best.unlink, f"{best} is missing; {lost}"),
    ]:
        damage()
        assert main(resume) == 2
        out, err = capsys.readouterr()
        assert message in err and lost in err, err
        assert f"delrec eval {run} --checkpoint last measures" in err
        assert "epoch 2/2" not in out and (run / "metrics.csv").read_bytes() == metrics
    best.write_bytes(whole)
    config = (run / "config.json").read_text(encoding="utf-8")
    (run / "config.json").write_text(config.replace('"epochs": 2', '"epochs": 4'), "utf-8")
    assert main(resume) == 2
    assert "(epochs: 4 in config.json, 2 in last.pt); restore config.json" in (
        capsys.readouterr().err
    )
    (run / "config.json").write_text(config, encoding="utf-8")
    last.write_bytes(b"garbage")
    assert main(resume) == 2
    assert "the run cannot continue from it: restore last.pt from a copy, or train again" in (
        capsys.readouterr().err
    )


def test_outputs_that_cannot_be_written_are_refused_before_the_work(
    run_copy, tmp_path, capsys, monkeypatch
):
    """A folder, a file in place of a folder, a folder this user may not write into: refused
    with exit 2 before anything is measured (nothing printed yet), without "[Errno N]"."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file\n", encoding="utf-8")
    run = str(run_copy)
    cases = [
        (["compare", run, "--rounded-only", "--figure", str(tmp_path)], "it is a folder"),
        (["compare", run, "--csv", str(blocker / "t.csv")], f"{blocker} is a file, not a folder"),
        (["report", run, "-o", str(blocker)], f"{blocker} is a file, not a folder"),
        (["analyze", "training", run, "--figure", str(blocker / "a" / "b.png")], "not a folder"),
    ]
    for argv, problem in cases:
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert problem in err and "cannot be written" in err and "Errno" not in err, err
        assert out == "", out  # refused before the work
    monkeypatch.setattr("delrec.commands.os.access", lambda path, mode: False)
    assert main(["report", run, "-o", str(tmp_path / "new" / "report")]) == 2
    err = capsys.readouterr().err
    assert f"-o {tmp_path / 'new' / 'report' / 'hardware_report.json'} cannot be written" in err
    assert f"this user may not write into {tmp_path}; give another path" in err, err
    monkeypatch.undo()

    def read_only(*args, dir=None, **kwargs):  # what /proc or a read-only mount answers
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("delrec.commands.tempfile.mkstemp", read_only)
    assert main(["report", run, "-o", str(tmp_path / "new" / "report")]) == 2
    err = capsys.readouterr().err  # the permission bits allowed it: failed after the work
    assert f"no file can be made in {tmp_path} (Read-only file system)" in err, err
    monkeypatch.undo()
    assert main(["report", run, "-o", str(tmp_path / "new" / "report")]) == 0  # folders made
    assert (tmp_path / "new" / "report" / "hardware_report.json").is_file()
    assert not list(tmp_path.glob(".delrec-probe-*"))  # the probe leaves nothing


@pytest.mark.parametrize(
    "edit,problem",
    [
        (lambda p: p["model"]["blocks.0.neurons.sigma"].fill_(-3), "sigma = -3 is not a usable"),
        (lambda p: p["network_config"].update(max_delay=5), "beyond its max_delay = 5"),
        (lambda p: p["model"]["blocks.0.synapses.weight"].fill_(3e38), "is not finite: inf"),
    ],
    ids=["negative-sigma", "max-delay-below-delays", "overflowing-weights"],
)
def test_a_checkpoint_edited_to_unusable_values_is_bad_input_for_eval_and_compare(
    run_copy, capsys, edit, problem
):
    best = run_copy / "checkpoints" / "best.pt"
    payload = torch.load(best, weights_only=True)
    edit(payload)
    torch.save(payload, best)
    for argv in (["eval", str(run_copy)], ["eval", str(run_copy), "--spread"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"the network in {best} cannot be" in err and problem in err, err
    assert main(["compare", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert f"the network in {best} cannot be" in err and problem in err, err


def test_eval_spread_says_it_changes_nothing_for_a_model_without_learned_delays(
    tmp_path_factory, capsys
):
    run = trained_run(tmp_path_factory, "snn", [*MG_TINY, "--model", "snn"])
    capsys.readouterr()
    assert main(["eval", str(run), "--spread"]) == 0
    captured = capsys.readouterr()
    assert "note: --spread changes nothing for the snn model, which learns no delays" in (
        captured.err
    )
    result = json.loads(captured.out)
    assert result["delays"] == "integer" and result["model"] == "snn"
    assert main(["eval", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["nmse"] == result["nmse"]


def test_eval_prints_strict_json_when_a_metric_overflows(run_copy, capsys):
    """Readout weights of 3e38 give an infinite NMSE: shown as inf, printed as JSON null (not
    the non-standard Infinity that strict parsers refuse)."""
    best = run_copy / "checkpoints" / "best.pt"
    payload = torch.load(best, weights_only=True)
    payload["model"]["readout.weight"].fill_(3e38)
    torch.save(payload, best)
    assert main(["eval", str(run_copy)]) == 0
    captured = capsys.readouterr()
    assert "nmse inf" in captured.err, captured.err

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    result = json.loads(captured.out, parse_constant=refuse)
    assert result["nmse"] is None and result["epoch"] >= 1


def test_absurd_mackey_glass_sizes_are_refused_before_memory_runs_out(run_copy, capsys):
    for settings, message in [
        ({"samples": 10**12}, "need 1e+13 integration steps, more than 1e+08"),
        ({"samples": 1e12}, "samples=1000000000000.0 must be a positive integer"),
        ({"tau": 1e12}, "integration steps, more than 1e+08"),
        ({"samples": 10**6, "window": 10**5}, "the train split holds"),
    ]:
        with pytest.raises(DataError, match=re.escape(message)):
            load_dataset("mackey-glass", "train", **settings)
    best = run_copy / "checkpoints" / "best.pt"
    payload = torch.load(best, weights_only=True)
    payload["train_config"]["data"]["samples"] = 10**12
    torch.save(payload, best)
    assert main(["eval", str(run_copy)]) == 2
    assert "use fewer samples (the default is 6000)" in capsys.readouterr().err


def _bare_memory_error():
    raise MemoryError


@pytest.mark.parametrize(
    "allocate,detail",
    [
        (lambda: np.empty(2**50), "(Unable to allocate 8.00 PiB"),  # numpy names the allocation
        (_bare_memory_error, "(no detail)"),
        (lambda: torch.empty(2**50), "can't allocate memory: you tried to allocate"),  # torch's
    ],
    ids=["numpy", "bare", "torch"],
)
def test_running_out_of_memory_is_a_message_not_a_traceback(
    tmp_path, capsys, monkeypatch, allocate, detail
):
    monkeypatch.setattr("delrec.commands.eval.evaluate_run", lambda *args: allocate())
    assert main(["eval", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("delrec eval: error: out of memory (") and detail in err, err
    assert "use smaller ones or a machine with more memory" in err and "Traceback" not in err


def _set_config(run: Path, **changes) -> None:
    document = json.loads((run / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            document["config"].pop(key)
        else:
            document["config"][key] = value
    (run / "config.json").write_text(json.dumps(document))


@pytest.mark.parametrize(
    "name,damage,message",
    [
        ("config.json", "[]", "config.json does not hold a run configuration (no 'config' object)"),
        ("config.json", {"model": None}, "(model None is not one of snn, rsnn"),
        ("config.json", {"model": 3}, "(model 3 is not one of"),
        ("config.json", {"seed": None}, "(seed None is not a whole number in 0…"),
        ("config.json", {"task": [1]}, "(task [1] is not a data set's name)"),
        ("metrics.csv", "a,b\n1,2\n", "metrics.csv line 2, column epoch: missing"),
        ("metrics.csv", "epoch,firing_rate\nx,0.1\n", "column epoch: 'x' is not a whole number"),
        (
            "metrics.csv",
            "epoch,firing_rate\n1,abc\n",
            "column firing_rate: 'abc' is not a finite number",
        ),
        (
            "metrics.csv",
            "epoch,firing_rate\n1,nan\n",
            "column firing_rate: 'nan' is not a finite number",
        ),
        ("metrics.csv", b"\xff\xfe\n", "metrics.csv cannot be read ('utf-8' codec"),
        ("test_results.json", '{"nmse": NaN, "best_epoch": 1}', "a finite number"),
        ("test_results.json", '{"nmse": Infinity, "best_epoch": 1}', "a finite number"),
        ("test_results.json", '{"nmse": 1e400, "best_epoch": 1}', "a finite number"),
    ],
)
def test_compare_names_a_damaged_run_file(run_copy, capsys, name, damage, message):
    if isinstance(damage, dict):
        _set_config(run_copy, **damage)
    elif isinstance(damage, bytes):
        (run_copy / name).write_bytes(damage)
    else:
        (run_copy / name).write_text(damage)
    assert main(["compare", str(run_copy), "--rounded-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"delrec compare: error: {run_copy / name}") and message in err, err
    assert "edited" in err and "Traceback" not in err


def test_a_damaged_seed_is_trained_again_as_its_message_says(tmp_path, capsys):
    """The fix said "train again into a new --run-dir", which drops every other seed: a seed
    of a run of several seeds starts over when its folder is moved away and the run resumed."""
    tiny = [*MG_TINY[:1], "2", *MG_TINY[2:]]  # two epochs
    seeds = tmp_path / "seeds"
    argv = ["train", *tiny, "--seeds", "0-1", "--max-epochs-this-run", "1", "--run-dir"]
    assert main([*argv, str(seeds)]) == 0  # seed 0 after its first epoch
    capsys.readouterr()
    (seeds / "seed-0" / "checkpoints" / "last.pt").write_bytes(b"garbage")
    resume = ["train", "--resume", str(seeds), "--no-progress"]
    assert main(resume) == 2
    err = capsys.readouterr().err
    fix = f"train that seed again: move {seeds / 'seed-0'} away and resume `delrec train --resume"
    assert fix in err and "new --run-dir" not in err, err
    (seeds / "seed-0").rename(tmp_path / "seed-0-damaged")
    assert main(resume) == 0
    summary = json.loads((seeds / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "complete" and [r["seed"] for r in summary["runs"]] == [0, 1]


def test_a_warning_on_the_command_line_is_one_line_without_source(tmp_path):
    """On the command line a warning is ``warning (Category): message``; it was Python's
    ``FILE:LINE: Category: message`` followed by the line of delrec's (or the console
    script's) source that warned, which say nothing to the user."""
    argv = [sys.executable, "-m", "delrec", "train", *TINY, "--run-dir", str(tmp_path / "run")]
    argv += ["--set", "network.max_delay=1"]  # the preset's delays start above it: a warning
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if "DelayLimitWarning" in x)
    assert line.startswith("warning (DelayLimitWarning): DelRec(") and ".py:" not in line
    assert "sys.exit(main())" not in done.stderr


def test_sigterm_under_torchrun_names_the_torchrun_command(tmp_path, monkeypatch):
    """Under torchrun the run continues with as many processes again: the hint names the
    torchrun command, with the run's folder where this process knows it."""
    from argparse import Namespace

    from delrec.commands.train import after_termination

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    hint = after_termination(Namespace(resume=None, run_dir=None, parallel=None))
    assert hint.startswith("the run continues with `torchrun") and "--resume RUN_DIR" in hint
    assert hint.endswith("(RUN_DIR: the folder its first line named)")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    hint = after_termination(Namespace(resume=None, run_dir=str(run), parallel=None))
    assert "torchrun" in hint and f"--resume {run}`" in hint
