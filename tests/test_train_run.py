"""`delrec train` / `delrec eval` end to end through the real CLI, on tiny data: run directory
contents, learning, kill-and-resume bit for bit, several seeds."""

import contextlib
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from delrec.cli import main
from delrec.data import load_dataset
from delrec.data.heidelberg import write_heidelberg
from delrec.runs import RunError, load_checkpoint
from delrec.training import Trainer, resolve
from delrec.training.objectives import Classification, Regression

# Mackey-Glass cut down to a few hundred 30-step windows and a 16-neuron layer.
TINY_MG = [
    "--set",
    "data.samples=700",
    "data.window=30",
    "data.horizon=5",
    "network.hidden_sizes=[16]",
    "network.delay_init=uniform:0:5",
    "batch_size=16",
    "optim.lr=1e-2",
    "--no-progress",
]
# digits-8x8 (64 steps) on 96 training images, 8 neurons, the "lif" readout of SHD.
TINY_DIGITS = [
    "--task",
    "digits-8x8",
    "--set",
    "max_train_samples=96",
    "network.hidden_sizes=[8]",
    "network.readout=lif",
    "network.recurrent_dropout=0.3",
    "batch_size=32",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The presets run on one CPU thread (``threads = 1``); give the next tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_json(capsys, argv) -> dict:
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def read_metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_mackey_glass_run_directory_and_learning(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # five epochs: seed 0's validation error falls slowly at first (0.89, 0.85, 0.78, 0.70, 0.68)
    summary = run_json(capsys, ["train", "--epochs", "5", "--run-dir", str(run_dir), *TINY_MG])
    assert summary["status"] == "complete" and summary["epochs_done"] == 5

    document = json.loads((run_dir / "config.json").read_text())
    data = document["config"]["data"]
    assert (data["tau"], data["horizon"], data["samples"], data["window"]) == (30.0, 5, 700, 30)
    assert data["beta"] == 0.2  # the data set's defaults are resolved too
    assert document["dataset"]["task"] == "regression"

    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    for column in (
        "train_loss",
        "train_nmse",
        "valid_loss",
        "valid_nmse",
        "lr_weights",
        "lr_positions",
        "sigma",
        "delay_mean_rec0",
        "delay_std_rec0",
        "firing_rate",
        "firing_rate_0",
        "grad_norm_0",
        "grad_norm_readout",
        "epoch_time_s",
    ):
        assert column in rows[0]
    for row in rows:  # one hidden layer: its rate is the mean; gradients reach both layers
        assert float(row["firing_rate_0"]) == pytest.approx(float(row["firing_rate"]))
        assert 0 < float(row["firing_rate_0"]) < 1
        assert float(row["grad_norm_0"]) > 0 and float(row["grad_norm_readout"]) > 0
    assert float(rows[0]["sigma"]) == 10.0 and float(rows[-1]["sigma"]) < 1.0
    assert float(rows[-1]["train_loss"]) < 0.85 * float(rows[0]["train_loss"])
    assert float(rows[-1]["valid_nmse"]) < 0.85 * float(rows[0]["valid_nmse"])

    for which in ("best", "last"):
        payload = load_checkpoint(run_dir, which)  # weights_only=True inside
        assert payload["kind"] == which
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["delays"] == "integer" and results["checkpoint"] == "best"
    assert set(summary["test"]) == {"loss", "mse", "nmse", "nrmse", "r2"}
    assert summary["test"]["nmse"] == pytest.approx(results["nmse"])
    assert results["r2"] == pytest.approx(1 - results["nmse"])
    for figure in ("learning_curves", "training", "delays", "raster", "prediction"):
        assert (run_dir / "figures" / f"{figure}.png").stat().st_size > 1000

    # eval re-measures the same number in integer-delay mode, and runs with spread delays
    evaluated = run_json(capsys, ["eval", str(run_dir), "--device", "cpu"])
    assert evaluated["nmse"] == pytest.approx(results["nmse"], rel=1e-6)
    spread = run_json(capsys, ["eval", str(run_dir), "--spread", "--split", "valid"])
    assert spread["delays"].startswith("spread") and spread["split"] == "valid"


def state_of(run_dir) -> dict:
    payload = load_checkpoint(run_dir, "last")
    return {
        "model": payload["model"],
        "optimizers": payload["optimizers"],
        "schedulers": payload["schedulers"],
        "rng": payload["rng"],
    }


def assert_identical(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_identical(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def check_kill_and_resume(tmp_path, capsys, base) -> None:
    """Three epochs in one go and 1 + 2 epochs with a resume end in identical states."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_json(capsys, ["train", "--epochs", "3", "--run-dir", str(whole), *base])
    stopped = run_json(
        capsys,
        ["train", "--epochs", "3", "--run-dir", str(split), "--max-epochs-this-run", "1", *base],
    )
    assert stopped["status"] == "interrupted" and stopped["epochs_done"] == 1
    assert not (split / "test_results.json").exists()
    assert len(read_metrics(split)) == 1
    # something else runs in between and moves the global RNG
    torch.rand(1000)
    resumed = run_json(capsys, ["train", "--resume", str(split), "--no-progress"])
    assert resumed["status"] == "complete" and resumed["epochs_done"] == 3

    assert_identical(state_of(whole), state_of(split))

    def without_time(run_dir):
        return [
            {k: v for k, v in row.items() if k != "epoch_time_s"} for row in read_metrics(run_dir)
        ]

    assert without_time(whole) == without_time(split)
    assert json.loads((whole / "test_results.json").read_text()) == json.loads(
        (split / "test_results.json").read_text()
    )


@pytest.mark.parametrize("base", [TINY_DIGITS, TINY_MG], ids=["digits-lif", "mackey-glass"])
def test_kill_and_resume_is_bit_for_bit(tmp_path, capsys, base):
    check_kill_and_resume(tmp_path, capsys, base)


def write_random_shd(path, count: int, seed: int) -> None:
    """A small SHD-layout file: ``count`` samples of 5-40 spikes in 0-0.6 s, labels i % 20."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        k = int(rng.integers(5, 40))
        samples.append((np.sort(rng.uniform(0, 0.6, k)), rng.integers(0, 700, k)))
    write_heidelberg(path, samples, np.arange(count) % 20)


def test_shd_preset_with_augmentation_resumes_bit_for_bit(tmp_path, capsys):
    root = tmp_path / "shd"
    root.mkdir()
    write_random_shd(root / "shd_train.h5", 40, seed=1)
    write_random_shd(root / "shd_test.h5", 20, seed=2)
    base = [
        "--task",
        "shd",
        "--data-root",
        str(root),
        "--set",
        "network.hidden_sizes=[8,8]",
        "batch_size=16",
        "threads=1",
        "--no-progress",
    ]
    check_kill_and_resume(tmp_path, capsys, base)
    document = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert document["dataset"]["train_items"] == 3 * 32  # 80 % of 40, presented three times
    assert document["config"]["augment"] is True
    assert "accuracy" in json.loads((tmp_path / "whole" / "test_results.json").read_text())


def test_the_training_firing_rate_counts_each_samples_valid_steps(tmp_path):
    """metrics.csv's ``firing_rate_<i>``: all spikes of the epoch over all neuron-steps before
    each sample's end, so the padding does not count and a short last batch counts for its
    samples, not as much as a full batch (as ``delrec report`` counts)."""
    root = tmp_path / "shd"
    root.mkdir()
    write_random_shd(root / "shd_train.h5", 40, seed=1)
    write_random_shd(root / "shd_test.h5", 20, seed=2)
    config = resolve(
        "shd",
        overrides=[
            f"data_root={root}",
            "network.hidden_sizes=[8,8]",
            "batch_size=13",  # 96 items: 7 batches of 13 and one of 5
            "epochs=1",
            "threads=1",
        ],
    )
    trainer = Trainer(config, tmp_path / "run", progress=False, log=lambda message: None)
    spikes, lengths = [], []
    forward, objective = trainer.train_forward, trainer.objective

    def recorded_forward(frames):
        output, layers = forward(frames)
        spikes.append([s.detach().clone() for s in layers])
        return output, layers

    class RecordedObjective:
        meter = objective.meter

        def __call__(self, output, steps, targets):
            lengths.append(steps.clone())
            return objective(output, steps, targets)

    trainer.train_forward, trainer.objective = recorded_forward, RecordedObjective()
    metrics = trainer.train_epoch(0, 0.0)
    assert [len(n) for n in lengths] == [13] * 7 + [5]
    assert any(n.min() < layers[0].shape[0] for n, layers in zip(lengths, spikes))  # padding
    slots = sum(n.sum().item() for n in lengths) * 8  # neuron-steps before each sample's end
    for layer in range(2):
        count = sum(
            layers[layer][:n, b].double().sum().item()
            for batch, layers in zip(lengths, spikes)
            for b, n in enumerate(batch.tolist())
        )
        assert metrics[f"firing_rate_{layer}"] == pytest.approx(count / slots, rel=1e-12)


def test_a_run_written_before_a_setting_existed_resumes(tmp_path, capsys):
    """A run whose config.json and last.pt predate a setting (here ``tbptt``) resumes with the
    setting at its default, instead of being refused as another configuration."""
    run_dir = tmp_path / "old"
    base = ["train", "--epochs", "2", "--run-dir", str(run_dir), *TINY_MG]
    stopped = run_json(capsys, [*base, "--max-epochs-this-run", "1"])
    assert stopped["status"] == "interrupted"
    document = json.loads((run_dir / "config.json").read_text())
    assert document["config"].pop("tbptt") is None
    (run_dir / "config.json").write_text(json.dumps(document))
    last = run_dir / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    assert payload["train_config"].pop("tbptt") is None
    torch.save(payload, last)

    resumed = run_json(capsys, ["train", "--resume", str(run_dir), "--no-progress"])
    assert resumed["status"] == "complete" and resumed["epochs_done"] == 2


def test_resume_refuses_new_settings_and_unknown_dirs(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--epochs", "3"]) == 2
    assert "drop --epochs" in capsys.readouterr().err
    argv = ["train", "--resume", str(tmp_path), "--set", "threads=2", "optim.lr=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "drop --set optim.lr=1 (only --device, --data-root and --set threads/num_workers" in err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing does not exist" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_existing_run_directory_is_not_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    assert main(["train", "--run-dir", str(run_dir), *TINY_MG]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run_dir / "notes.txt").read_text() == "keep me"


def test_several_seeds_report_mean_and_std(tmp_path, capsys):
    """Mean ± population std (as the paper's scripts) of each seed's own test results: the
    test loss, which differs between seeds (one epoch leaves the accuracy at chance)."""
    run_dir = tmp_path / "seeds"
    summary = run_json(
        capsys,
        ["train", "--epochs", "1", "--seeds", "0-2", "--run-dir", str(run_dir), *TINY_DIGITS],
    )
    assert summary["seeds"] == [0, 1, 2]
    losses = []
    for seed in (0, 1, 2):
        document = json.loads((run_dir / f"seed-{seed}" / "config.json").read_text())
        assert document["config"]["seed"] == seed
        results = json.loads((run_dir / f"seed-{seed}" / "test_results.json").read_text())
        losses.append(results["loss"])
    assert len(set(losses)) == 3, losses
    loss = summary["test"]["loss"]
    assert loss["values"] == losses
    assert loss["mean"] == pytest.approx(np.mean(losses), rel=1e-12)
    assert loss["std"] == pytest.approx(np.std(losses, ddof=0), rel=1e-9)
    assert json.loads((run_dir / "summary.json").read_text())["test"] == summary["test"]


def test_max_epochs_this_run_counts_the_epochs_of_every_seed_together(tmp_path, capsys):
    """--max-epochs-this-run bounds one invocation (a job's time limit), not each seed: two
    epochs were trained by a call of 1 (the last of seed 0, the first of seed 1). The stopped
    run's hint names the folder of all seeds, and the summary is that of one uninterrupted
    call."""
    run_dir, whole = tmp_path / "seeds", tmp_path / "whole"
    argv = ["train", "--epochs", "2", "--seeds", "0-1", *TINY_DIGITS]
    assert (
        run_json(capsys, [*argv, "--run-dir", str(run_dir), "--max-epochs-this-run", "1"])["status"]
        == "interrupted"
    )
    resume = ["train", "--resume", str(run_dir), "--no-progress", "--max-epochs-this-run", "1"]
    assert main(resume) == 0
    err = capsys.readouterr().err
    assert f"stopped before seed 1; continue with `delrec train --resume {run_dir}`" in err
    assert len(read_metrics(run_dir / "seed-0")) == 2 and not (run_dir / "seed-1").exists()
    for trained in (1, 2):  # seed 1's first epoch, then its second
        summary = run_json(capsys, resume)
        assert len(read_metrics(run_dir / "seed-1")) == trained
    assert summary["status"] == "complete"
    expected = run_json(capsys, [*argv, "--run-dir", str(whole)])
    assert summary["test"] == expected["test"]


# Mackey-Glass on 400 20-step windows, 8 neurons, and digits-8x8 on 64 images: six epochs at a
# learning rate high enough that the validation metric turns back (best epochs 3 and 2)
SHORT_RUNS = {
    "mackey-glass": [
        "data.samples=400",
        "data.window=20",
        "data.horizon=5",
        "network.hidden_sizes=[8]",
        "network.delay_init=uniform:0:5",
        "batch_size=16",
    ],
    "digits-8x8": ["max_train_samples=64", "network.hidden_sizes=[8]", "batch_size=32"],
}


def short_run(tmp_path, task, *overrides) -> Trainer:
    """A complete run of ``task`` (:data:`SHORT_RUNS`) in ``tmp_path/run``, tested."""
    config = resolve(task, overrides=[*SHORT_RUNS[task], *overrides])
    trainer = Trainer(config, tmp_path / "run", progress=False, log=lambda message: None)
    assert trainer.fit()
    trainer.test()
    return trainer


@pytest.mark.parametrize("task", list(SHORT_RUNS))
def test_the_best_checkpoint_is_the_best_validation_epoch(tmp_path, task):
    """Lowest validation NMSE (regression), highest accuracy (classification; the first of
    equals): the epoch of best.pt and of test_results.json."""
    trainer = short_run(tmp_path, task, "epochs=6", "optim.lr=5e-2")
    metric = trainer.objective.metric
    values = [float(row[f"valid_{metric}"]) for row in read_metrics(tmp_path / "run")]
    best = 1 + int(np.argmin(values) if task == "mackey-glass" else np.argmax(values))
    assert 1 < best < len(values) == 6, values  # the metric turns: neither first nor last
    assert json.loads((tmp_path / "run" / "test_results.json").read_text())["best_epoch"] == best
    payload = load_checkpoint(tmp_path / "run", "best")
    assert payload["epoch"] == best
    assert payload["valid"][metric] == pytest.approx(values[best - 1], rel=1e-6)


def test_a_trainer_driven_from_python_leaves_a_run_the_commands_read(tmp_path, capsys):
    short_run(tmp_path, "digits-8x8", "epochs=1")  # Trainer(...).fit(), .test(): no jobs module
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["task"] == (
        "digits-8x8"
    )
    table = tmp_path / "table.csv"
    assert main(["compare", str(tmp_path / "run"), "--csv", str(table), "--rounded-only"]) == 0
    assert "digits-8x8" in table.read_text()
    # a second new Trainer into the finished run is refused before it writes (it overwrote
    # config.json, the checkpoints and metrics.csv and left the old test_results.json)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    config = resolve("digits-8x8", overrides=[*SHORT_RUNS["digits-8x8"], "epochs=1"])
    again = Trainer(config, tmp_path / "run", progress=False, log=lambda message: None)
    with pytest.raises(RunError, match="already holds a run, which a new one would overwrite"):
        again.fit()
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert again.restore() and again.fit()  # continuing it is what restore() is for


def test_regression_mse_is_in_the_units_of_the_raw_targets(tmp_path):
    """With standardised targets: the stored standardisation is the training targets' mean and
    (population) std, and the test ``mse`` is ``nmse · Var(raw test targets)``."""
    trainer = short_run(tmp_path, "mackey-glass", "epochs=1", "standardize=true")
    config = trainer.config
    targets = {}
    for split in ("train", "test"):
        raw = load_dataset(config.task, split=split, root=config.data_root, **config.data)
        targets[split] = np.array([float(raw[i][1]) for i in range(len(raw))])
    mean, std = load_checkpoint(tmp_path / "run", "best")["standardization"].tolist()
    assert mean == pytest.approx(targets["train"].mean(), rel=1e-9)
    assert std == pytest.approx(targets["train"].std(), rel=1e-9)
    assert abs(std - 1) > 0.5  # the scale matters
    results = json.loads((tmp_path / "run" / "test_results.json").read_text())
    assert results["mse"] == pytest.approx(results["nmse"] * targets["test"].var(), rel=1e-6)


def test_rate_penalty_lowers_firing(tmp_path):
    rates = {}
    for penalty in (0.0, 10.0):
        config = resolve(
            overrides=[
                "data.samples=500",
                "data.window=20",
                "data.horizon=5",
                "network.hidden_sizes=[16]",
                "network.delay_init=uniform:0:5",
                "batch_size=16",
                "epochs=2",
                "optim.scheduler=constant",
                "optim.lr=1e-2",
                f"rate_penalty={penalty}",
            ]
        )
        trainer = Trainer(config, tmp_path / f"p{penalty}", progress=False, log=lambda m: None)
        trainer.fit()
        rates[penalty] = trainer.state.history[-1]["firing_rate"]
    assert rates[10.0] < 0.6 * rates[0.0]


def test_objectives_match_their_formulas():
    torch.manual_seed(0)
    output = torch.randn(5, 3, 4)
    lengths, labels = torch.tensor([5, 5, 5]), torch.tensor([0, 3, 1])
    loss, summed = Classification("lif")(output, lengths, labels)
    expected = -output.softmax(-1).sum(0).log_softmax(-1)[torch.arange(3), labels].mean()
    assert torch.allclose(loss, expected) and torch.allclose(summed.sum(-1), torch.full((3,), 5.0))
    _, scores = Classification("ema")(output, torch.tensor([5, 2, 1]), labels)
    assert torch.equal(scores, torch.stack([output[4, 0], output[1, 1], output[0, 2]]))

    objective = Regression()
    meter = objective.meter()
    targets = torch.tensor([1.0, 2.0, 4.0, 5.0])
    for part in (slice(0, 2), slice(2, 4)):
        out = torch.zeros(3, 2, 1)
        out[-1, :, 0] = targets[part] + 0.5
        loss, prediction = objective(out, torch.tensor([3, 3]), targets[part])
        meter.update(loss, prediction, targets[part])
    result = meter.result()
    assert result["mse"] == pytest.approx(0.25)
    assert result["nmse"] == pytest.approx(0.25 / targets.var(correction=0).item())
    assert result["r2"] == pytest.approx(1 - result["nmse"])


def test_layer_gradient_norms_cover_every_weight_once_and_leave_out_delays():
    from delrec.models import build_network, preset_network
    from delrec.training.loop import gradient_norms, layer_parameters, parameter_groups

    network = build_network(preset_network("digits-8x8", "ff+rec", hidden_sizes=(6, 5)), seed=0)
    layers = layer_parameters(network)
    assert list(layers) == ["0", "1", "readout"]
    groups = parameter_groups(network)
    listed = [id(p) for params in layers.values() for p in params]
    assert sorted(listed) == sorted(id(p) for p in groups["weights"] + groups["no_decay"])
    assert not set(listed) & {id(p) for p in groups["positions"]} and groups["positions"]

    network.train()
    network(torch.rand(64, 3, 1)).pow(2).sum().backward()
    expected = [
        torch.cat([p.grad.flatten() for p in params]).double().norm() for params in layers.values()
    ]
    assert gradient_norms(layers).tolist() == pytest.approx([float(e) for e in expected], rel=1e-6)
    assert min(gradient_norms(layers).tolist()) > 0


def _start_training(run_dir, stderr) -> subprocess.Popen:
    """``delrec train`` (2 tiny epochs, progress bars not turned off) in a fresh process, its
    stderr going to ``stderr``."""
    options = [a for a in TINY_MG if a != "--no-progress"]
    command = [sys.executable, "-m", "delrec", "train", "--epochs", "2", "--run-dir", str(run_dir)]
    return subprocess.Popen(command + options, stdout=subprocess.DEVNULL, stderr=stderr)


def test_a_run_whose_network_gets_no_gradient_says_so_once(tmp_path, capsys):
    """A readout τ of 1e30 scales the readout's input current to 0: every gradient was 0 and
    the run "trained" without a word (and the figure's log scale warned of no positive data)."""
    tiny = ["--epochs", "2", "--no-progress", "--set", "data.samples=1200"]
    silent = [*tiny, "network.hidden_sizes=[8]", "network.readout_tau=1e30"]
    assert main(["train", *silent, "--run-dir", str(tmp_path / "silent")]) == 0
    err = capsys.readouterr().err
    assert err.count("note: no gradient reached any weight in epoch 1") == 1, err
    assert "no positive values" not in err
    assert (
        main(["train", *tiny, "network.hidden_sizes=[8]", "--run-dir", str(tmp_path / "ok")]) == 0
    )
    assert "no gradient reached" not in capsys.readouterr().err


def test_progress_bars_show_on_a_terminal_only(tmp_path):
    """A batch job's log (stderr to a file or pipe) gets the epoch lines, not a progress bar's
    carriage-return updates; a terminal gets the bar."""
    with open(tmp_path / "log", "w", encoding="utf-8") as log:
        assert _start_training(tmp_path / "to-file", log).wait(timeout=300) == 0
    text = (tmp_path / "log").read_text()
    assert "epoch 2" in text and "\r" not in text and "batch/s" not in text

    leader, follower = os.openpty()
    training = _start_training(tmp_path / "to-terminal", follower)
    os.close(follower)
    seen = b""
    try:
        with contextlib.suppress(OSError):  # EIO once the process closed the terminal
            while chunk := os.read(leader, 1 << 16):
                seen += chunk
    finally:
        os.close(leader)
    assert training.wait(timeout=300) == 0
    assert b"\r" in seen and b"epoch 1/2" in seen


def test_resume_may_change_the_threads_and_loader_workers(tmp_path, capsys):
    """Where a run runs, not what it computes: ``--set threads=… num_workers=…`` on resume
    (a run of seeds passes them on to each seed's process with ``--parallel``)."""
    from delrec.runs import RunDir
    from delrec.training.parallel_seeds import seed_command

    run_dir = tmp_path / "run"
    base = ["train", "--epochs", "2", "--run-dir", str(run_dir), *TINY_MG]
    assert run_json(capsys, [*base, "--max-epochs-this-run", "1"])["status"] == "interrupted"
    argv = ["train", "--resume", str(run_dir), "--no-progress"]
    resumed = run_json(capsys, [*argv, "--set", "threads=1", "num_workers=1"])
    assert resumed["status"] == "complete"
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert (config["threads"], config["num_workers"]) == (1, 1)
    assert main([*argv, "--set", "threads=0"]) == 2
    assert "threads must be in 1…1024" in capsys.readouterr().err

    config = RunDir(run_dir).read_config(threads=3)
    command = seed_command(config, tmp_path / "c.json", 0, RunDir(run_dir), None)
    assert command[command.index("--set") :][:3] == ["--set", "threads=3", "num_workers=1"]


def test_resume_refuses_a_data_root_holding_another_data_set(tmp_path, capsys):
    """`--data-root` may change on resume (the files moved), not the data: a folder whose data
    set has other item counts is refused before training on it."""
    for name, count, seed in (("good", 40, 1), ("other", 60, 1), ("same-sizes", 40, 5)):
        (tmp_path / name).mkdir()
        write_random_shd(tmp_path / name / "shd_train.h5", count, seed=seed)
        write_random_shd(tmp_path / name / "shd_test.h5", 20, seed=seed + 1)
    run_dir = tmp_path / "run"
    base = ["train", "--task", "shd", "--epochs", "2", "--no-progress", "--run-dir", str(run_dir)]
    settings = ["--set", "network.hidden_sizes=[6,6]", "batch_size=16", "threads=1"]
    argv = [*base, "--data-root", str(tmp_path / "good"), *settings, "--max-epochs-this-run", "1"]
    assert run_json(capsys, argv)["status"] == "interrupted"
    before = (run_dir / "config.json").read_text()
    resume = ["train", "--resume", str(run_dir), "--no-progress", "--data-root"]
    assert main([*resume, str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert f"the data set in {tmp_path / 'other'} is not the one {run_dir} trained on" in err
    assert "train_items 144 now, 96 when it trained" in err and "valid_items 12 now, 8" in err
    assert (run_dir / "config.json").read_text() == before
    # other recordings of the same sizes: only the items tell (the counts let it through)
    assert main([*resume, str(tmp_path / "same-sizes")]) == 2
    err = capsys.readouterr().err
    assert f"the data set in {tmp_path / 'same-sizes'} is not the one {run_dir} trained on" in err
    assert "its validation and test items differ from the same items when it trained" in err
    assert (run_dir / "config.json").read_text() == before
    (tmp_path / "good").rename(tmp_path / "moved")
    resumed = run_json(capsys, [*resume, str(tmp_path / "moved")])
    assert resumed["status"] == "complete"
