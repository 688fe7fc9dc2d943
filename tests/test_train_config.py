"""Training configuration: presets encode Tables S1–S4 (docs/design.md#training-recipes);
overrides; errors."""

import json
import os
from pathlib import Path

import pytest
import torch

from delrec.cli import main
from delrec.config import (
    ConfigError,
    given_settings,
    ignored_settings,
    load_config_file,
    preset,
    resolve,
)
from delrec.data import DATASETS
from delrec.delays import spread_schedule
from delrec.layers import DelRec, delay_parameters
from delrec.models import NetworkConfig, build_network
from delrec.recipes import RECIPES
from delrec.training.loop import (
    make_optimizers,
    make_scheduler,
    parameter_groups,
    short_schedule_notes,
    spike_penalty,
)

# task -> (epochs, batch, optimizer, lr, weight decay, weight schedule, position schedule)
TABLES = {
    "shd": (150, 256, "adamw", 5e-3, 1e-5, "onecycle", "cosine"),  # Table S3
    "ssc": (100, 128, "adam", 1e-3, 1e-5, "onecycle", "onecycle"),  # Table S1
    "psmnist": (200, 256, "adamw", 1e-3, 1e-2, "onecycle", "onecycle"),  # Table S1
    # docs/design.md#training-recipes
    "mackey-glass": (None, None, "adam", 5e-4, 1e-4, "cosine", "cosine"),
}
SIZES = {"shd": (140, 20), "ssc": (140, 35), "psmnist": (1, 10), "mackey-glass": (1, 1)}


def test_one_preset_per_data_set():
    assert set(RECIPES) == set(DATASETS)


@pytest.mark.parametrize("task", sorted(TABLES))
def test_preset_optimizers_and_schedules_follow_the_tables(task):
    epochs, batch, kind, lr, wd, schedule, position_schedule = TABLES[task]
    config = preset(task, "delrec")
    if epochs is not None:
        assert (config.epochs, config.batch_size) == (epochs, batch)
    optim = config.optim
    assert (optim.optimizer, optim.lr, optim.weight_decay) == (kind, lr, wd)
    assert (optim.scheduler, optim.position_scheduler) == (schedule, position_schedule)
    assert (optim.position_lr, optim.position_weight_decay, optim.grad_clip) == (5e-2, 0.0, None)
    assert config.spread.sigma0 == 10.0 and config.spread.gamma == 0.95
    assert spread_schedule(0, config.epochs, config.spread.sigma0, config.spread.gamma) == 10.0

    network = build_network(config.network_config(*SIZES[task]), seed=0)
    groups = parameter_groups(network)
    delrec_layers = [m for m in network.modules() if isinstance(m, DelRec)]
    expected_positions = {id(m.delay) for m in delrec_layers} | {
        id(m.spread_logits) for m in delrec_layers if m.spread_logits is not None
    }
    assert {id(p) for p in groups["positions"]} == expected_positions
    named = dict(network.named_parameters())
    no_decay = {n for n, p in named.items() if any(p is q for q in groups["no_decay"])}
    assert no_decay == {n for n in named if n.endswith("bias") or ".norm." in n}

    optimizers = make_optimizers(network, config)
    expected_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    assert all(type(o) is expected_class for o in optimizers.values())
    weight_groups = optimizers["weights"].param_groups
    assert [(g["lr"], g["weight_decay"]) for g in weight_groups] == (
        [(lr, wd), (lr, 0.0)] if groups["no_decay"] else [(lr, wd)]
    )
    (position_group,) = optimizers["positions"].param_groups
    assert (position_group["lr"], position_group["weight_decay"]) == (5e-2, 0.0)

    for name, kind_ in (("weights", schedule), ("positions", position_schedule)):
        scheduler = make_scheduler(optimizers[name], kind_, config.epochs)
        if kind_ == "onecycle":
            assert scheduler.total_steps == config.epochs
            peak = lr if name == "weights" else 5e-2
            assert all(g["max_lr"] == peak for g in optimizers[name].param_groups)
        else:
            assert scheduler.T_max == config.epochs


@pytest.mark.parametrize("model", ["ff+rec", "ffdelay", "fixed", "rsnn"])
def test_delay_parameters_are_what_trains_at_the_position_rate(model):
    """``delrec.layers.delay_parameters``: learned delays, spread logits and feedforward
    positions, none of a model that learns no delays; the optimizer's position group."""
    config = NetworkConfig(3, (6, 5), 2, model=model, learn_spread=True, ff_delay_window=5)
    network = build_network(config, seed=0)
    names = {
        name
        for name, p in network.named_parameters()
        if any(p is d for d in delay_parameters(network))
    }
    expected = {
        "ff+rec": {
            "blocks.0.synapses.position",
            "blocks.1.synapses.position",
            "blocks.0.neurons.delay",
            "blocks.0.neurons.spread_logits",
            "blocks.1.neurons.delay",
            "blocks.1.neurons.spread_logits",
        },
        "ffdelay": {"blocks.0.synapses.position", "blocks.1.synapses.position"},
        "fixed": set(),
        "rsnn": set(),
    }[model]
    assert names == expected
    assert parameter_groups(network)["positions"] == delay_parameters(network)


def test_delay_parameters_include_delays_frozen_for_a_warm_up():
    """An optimizer split made while the delays are frozen (``requires_grad_(False)``, a
    warm-up of the weights) keeps them out of the weights' group, as docs/layer.md splits it:
    once unfrozen they train at the delays' rate, without weight decay."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), DelRec(8, delay_init="uniform:0:6"))
    net[1].delay.requires_grad_(False)
    delays = delay_parameters(net)
    weights = [p for p in net.parameters() if not any(p is d for d in delays)]
    assert any(p is net[1].delay for p in delays)
    assert not any(p is net[1].delay for p in weights)
    fixed = DelRec(8, delay_init=2.0, learn_delays=False)
    assert delay_parameters(fixed) == []


def test_shd_preset_network_and_augmentation():
    config = preset("shd")
    net = config.network
    assert config.augment is True
    assert (net["block"], net["bias"], net["dropout"], net["recurrent_dropout"]) == (
        "bn",
        True,
        0.4,
        0.2,
    )
    expected = {
        "tau": 1.05,
        "v_threshold": 1.0,
        "reset": "hard",
        "v_reset": 0.0,
        "detach_reset": True,
        "surrogate": "atan",
        "surrogate_scale": 5.0,
    }
    assert {k: net["neuron"][k] for k in expected} == expected
    assert net["delay_init"] == "uniform:10:30" and net["readout"] == "lif"


@pytest.mark.parametrize(
    "task,dropout,recurrent_dropout", [("ssc", 0.1, 0.3), ("psmnist", 0.1, 0.2)]
)
def test_ssc_psmnist_preset_neurons(task, dropout, recurrent_dropout):
    net = preset(task).network
    assert (net["dropout"], net["recurrent_dropout"], net["learn_spread"]) == (
        dropout,
        recurrent_dropout,
        True,
    )
    neuron = net["neuron"]
    assert (
        neuron["tau"],
        neuron["v_threshold"],
        neuron["reset"],
        neuron["detach_reset"],
        neuron["surrogate"],
    ) == (2.0, 1.0, "soft", False, "triangle")


def test_mackey_glass_default_task():
    config = resolve()
    assert (config.task, config.model) == ("mackey-glass", "delrec")
    assert (config.data["tau"], config.data["horizon"], config.data["window"]) == (30.0, 20, 150)
    assert config.network["hidden_sizes"] == (128,) and config.network["readout"] == "ema"
    assert config.network["delay_init"] == "uniform:0:40"
    assert (config.epochs, config.batch_size, config.max_train_samples) == (20, 64, None)


def test_rsnn_gets_gradient_clipping_and_no_position_optimizer():
    config = preset("shd", "rsnn")
    assert config.optim.grad_clip == 1.0
    network = build_network(config.network_config(140, 20), seed=0)
    assert set(make_optimizers(network, config)) == {"weights"}


def test_overrides_file_then_set_then_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        "epochs = 7\nbatch_size = 5\n[optim]\nlr = 0.02\n"
        "[network]\nhidden_sizes = [8, 8]\n[network.neuron]\ntau = 3.0\n"
    )
    config = resolve(
        task="digits-8x8",
        file_values=load_config_file(path),
        overrides=["batch_size=9", "optim.position_lr=0.1", "network.delay_init=uniform:0:3"],
        flags={"epochs": 2, "seed": None},
    )
    assert (config.epochs, config.batch_size, config.seed) == (2, 9, 0)
    assert (config.optim.lr, config.optim.position_lr) == (0.02, 0.1)
    assert config.network["hidden_sizes"] == (8, 8)
    assert config.network["neuron"]["tau"] == 3.0
    assert config.network["neuron"]["surrogate"] == "triangle"  # untouched preset value
    assert config.network["delay_init"] == "uniform:0:3"
    assert resolve(overrides=["network.delay_init=0"]).network["delay_init"] == "constant:0"
    assert type(config).from_dict(config.to_dict()) == config
    assert resolve(overrides=["task=digits-8x8", "model=rsnn"]).optim.grad_clip == 1.0


@pytest.mark.parametrize(
    "override,message",
    [
        ("epoch=3", "did you mean 'epochs'"),
        ("optim.lrr=1", "unknown setting 'optim.lrr'"),
        ("network.dropout=1.5", "dropout must be in [0, 1)"),
        # every element dropped (keep rounds to 0 in steps of 2^-16), silently
        ("network.dropout=0.999995", "dropout = 0.999995 drops more than the masks can resolve"),
        ("network.delay_type=bogus", "delay_type must be one of ('axonal', 'synaptic', 'shared')"),
        ("network.readout_tau=0", "readout_tau must be a number of time steps >= 1, got 0"),
        ("network.recurrent_layers=[0,0]", "recurrent_layers [0, 0] names a layer twice"),
        ("network.recurrent_layers=[]", "leaves the delrec model no layer for its recurrence"),
        ("data.horizon=0", "data: Mackey-Glass: window=150 and horizon=0 must be >= 1"),
        ("max_train_samples=1", "leaves regression (mackey-glass) one training item"),
        ("network.hidden_size=[4]", "did you mean 'hidden_sizes'"),
        ("network.input_size=3", "set by the task"),
        ("network.neuron.reset=medium", "reset must be 'hard' or 'soft'"),
        ("network.delay_init=gauss:3", "unknown delay init"),
        ("network.readout=sum", "regression (mackey-glass) needs network.readout = 'ema'"),
        ("optim.scheduler=linear", "optim.scheduler must be one of"),
        ("optim.lr=fast", "optim.lr must be a finite number"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("epochs=0", "epochs must be in 1…2147483647, got 0"),
        ("batch_size=99999999999999999999", "batch_size must be in 1…2147483647"),
        ("seed=99999999999999999999", "seed must be in 0…9223372036854775807"),
        ("seed=4294967296", "seed 4294967296 is beyond 4294967295: torch's generators"),  # = 0
        ("batch_size=2.5", "batch_size must be an integer"),
        ("augment=1", "augment must be true or false"),
        ("augment=true", "augment shifts and thins spike counts, so it applies to shd and ssc"),
        ("threads=100000000", "threads must be in 1…1024 or null"),  # torch segfaulted
        ("num_workers=100000", "num_workers must be in 0…1024"),  # a fork per worker
        ("data.tau=abc", "data: tau='abc' must be a finite number"),
        ("data.tau=NaN", "data: tau=nan must be a finite number"),
        ("data.horizon=2.5", "data: horizon=2.5 must be a positive integer"),
        ("data_root=", "data_root must name a folder or be null"),
        ("task=", "unknown task ''"),  # not silently the default task
        ("model=", "unknown model ''"),
        ("spread.gamma=2", "spread.gamma must be in (0, 1]"),
        ("data.taux=3", "unknown setting(s) taux"),
        ("device=tpu", "device 'tpu'"),
        ("optim", "--set expects key=value"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError) as error:
        resolve(overrides=[override])
    assert message in str(error.value)


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--epochs", "1", "--set", "epochs=-3"], "epochs is given twice, --epochs 1 and --set"),
        (["--model", "rsnn", "--set", "model=snn"], "model is given twice, --model rsnn and"),
        (["--task", "mackey-glass", "--set", "task=foo"], "task is given twice, --task mackey"),
        (["--batch-size", "8", "--set", "batch_size=16"], "batch_size is given twice"),
        (["--seed", "3", "--set", "seed=5"], "seed is given twice, --seed 3 and --set seed=5"),
    ],
)
def test_a_flag_and_a_set_of_the_same_setting_must_agree(arguments, message, capsys):
    """The flag won and the other value, however absurd, went unchecked."""
    assert main(["train", *arguments, "--print-config"]) == 2
    assert message in capsys.readouterr().err
    agreeing = ["train", "--epochs", "2", "--set", "epochs=2", "--print-config"]
    assert main(agreeing) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 2


def test_augmentation_is_refused_for_data_that_are_not_spike_counts():
    """Its blend thins counts binomially: pixel intensities in [0, 1] became zeros."""
    for task in ("digits-8x8", "psmnist-mini", "psmnist"):
        with pytest.raises(ConfigError, match=f"applies to shd and ssc only, not '{task}'"):
            resolve(task=task, overrides=["augment=true"])
    assert resolve(task="ssc", overrides=["augment=true"]).augment


def test_bad_config_fails_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # a data value only the data set can check: caught when loading, before training
    code = main(["train", "--set", "data.window=0", "--run-dir", str(run_dir), "--no-progress"])
    assert code == 2
    assert "window=0" in capsys.readouterr().err
    assert not run_dir.exists()
    assert main(["train", "--set", "optim.lr=-1", "--run-dir", str(run_dir)]) == 2
    assert "optim.lr must be > 0" in capsys.readouterr().err
    assert not run_dir.exists()


def test_print_config_is_json(capsys):
    assert main(["train", "--task", "ssc", "--model", "fixed", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["task"], printed["model"], printed["epochs"]) == ("ssc", "fixed", 100)


def test_spike_penalty_is_half_mean_square_over_layers():
    spikes = [torch.ones(4, 2, 3), torch.zeros(5, 2, 7)]
    assert float(spike_penalty(spikes)) == pytest.approx(0.25)


def test_shipped_config_files_resolve():
    paper = resolve(
        file_values=load_config_file(
            Path(__file__).parents[1] / "configs" / "mackey-glass-paper.toml"
        )
    )
    assert (paper.task, paper.epochs, paper.batch_size) == ("mackey-glass", 100, 512)
    assert paper.optim == preset("mackey-glass").optim
    assert paper.network["delay_init"] == "uniform:0:20"  # docs/design.md#the-papers-networks


def test_bad_data_value_with_several_seeds_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "seeds"
    argv = ["train", "--seeds", "0-1", "--set", "data.horizon=0", "--run-dir", str(run_dir)]
    assert main(argv) == 2
    assert "horizon=0" in capsys.readouterr().err
    assert not run_dir.exists()


def test_version_names_delrec_torch_and_python(capsys):
    import platform

    import delrec

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"delrec {delrec.__version__} (torch {torch.__version__}, Python "
        f"{platform.python_version()})"
    )


def test_config_and_run_files_are_read_as_utf8_under_an_ascii_locale(tmp_path):
    """delrec writes UTF-8; a JSON config and a run's files are read back as UTF-8 whatever the
    locale (under LANG=C without UTF-8 mode, the locale's encoding is ASCII)."""
    import subprocess
    import sys

    folder = "/data/données"
    (tmp_path / "config.json").write_text(json.dumps({"data_root": folder}), encoding="utf-8")
    run = tmp_path / "run"
    run.mkdir()
    document = {"config": {"task": "mackey-glass", "model": "delrec", "seed": 0}}
    document["config"]["data_root"] = folder
    (run / "config.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    (run / "metrics.csv").write_text(f"epoch,note\n1,{folder}\n", encoding="utf-8")
    script = (
        "import sys\n"
        "from delrec.config import load_config_file\n"
        "from delrec.runs import RunDir\n"
        "run = RunDir(sys.argv[2])\n"
        "print(ascii([load_config_file(sys.argv[1])['data_root'],\n"
        "             run.config_values()['data_root'], run.read_metrics()[0]['note']]))\n"
    )
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "config.json"), str(run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ascii([folder] * 3)


def test_a_runs_own_config_file_given_as_config_says_what_it_is(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    settings = resolve(task="digits-8x8").to_dict()
    (run / "config.json").write_text(json.dumps({"config": settings}), encoding="utf-8")
    assert main(["train", "--config", str(run / "config.json"), "--print-config"]) == 2
    error = capsys.readouterr().err
    assert "is a run's own file" in error and f"--resume {run}" in error
    (tmp_path / "again.json").write_text(json.dumps(settings), encoding="utf-8")
    assert main(["train", "--config", str(tmp_path / "again.json"), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "digits-8x8"


def test_one_cycle_runs_too_short_to_train_get_a_note():
    """Stepped once per epoch, one-cycle spends its last epoch at lr/250000: one epoch trained
    nothing (digits-8x8 stayed at chance) without a word. The rate the note names is the one
    the scheduler gives."""
    optimizers = {"weights": None, "positions": None}
    one = resolve(task="digits-8x8", overrides=["epochs=1"])
    notes = short_schedule_notes(one, optimizers)
    assert (
        len(notes) == 2 and "optim.scheduler=onecycle over 1 epoch(s) barely trains" in (notes[0])
    )
    assert "(8e-08 here)" in notes[0] and "--set optim.position_scheduler=cosine" in notes[1]
    network = build_network(one.network_config(64, 10), seed=0)
    weights = make_optimizers(network, one)["weights"]
    make_scheduler(weights, "onecycle", 1)
    assert f"({weights.param_groups[0]['lr']:.3g} here)" in notes[0]
    two = resolve(task="digits-8x8", overrides=["epochs=2"])
    assert "over 2 epoch(s)" in short_schedule_notes(two, optimizers)[0]
    assert len(short_schedule_notes(one, {"weights": None})) == 1  # no delays: no positions
    cosine = ["epochs=1", "optim.scheduler=cosine", "optim.position_scheduler=cosine"]
    for fine in (["epochs=3"], cosine):
        assert short_schedule_notes(resolve(task="digits-8x8", overrides=fine), optimizers) == []


@pytest.mark.parametrize(
    "model, overrides, ignored",
    [
        (
            "rsnn",
            ["network.learn_spread=true", "optim.position_lr=0.1", "spread.sigma0=3"],
            ["network.learn_spread=True", "optim.position_lr=0.1", "spread.sigma0=3"],
        ),
        ("fixed", ["network.delay_type=synaptic", "spread.gamma=0.5"], ["spread.gamma=0.5"]),
        ("delrec-shared", ["network.delay_type=synaptic"], ["network.delay_type='synaptic'"]),
        ("delrec-shared", ["network.delay_type=shared"], []),
        (
            "snn",
            ["network.recurrent_dropout=0.2", "network.ff_delay_window=5"],
            ["network.recurrent_dropout=0.2", "network.ff_delay_window=5"],
        ),
        ("snn", ["network.recurrent_dropout=0"], []),
        ("ffdelay", ["optim.position_lr=0.1", "network.ff_delay_window=5"], []),
        ("delrec", ["network.learn_spread=true", "network.delay_type=synaptic"], []),
    ],
)
def test_settings_the_model_does_not_use_are_named(model, overrides, ignored, capsys):
    """Accepted and recorded in config.json as given, they looked applied (a preset's own
    values, which every model inherits, are not the user's and get no note)."""
    config = resolve(model=model, overrides=overrides)
    found = ignored_settings(config, given_settings(None, overrides))
    assert [entry.split(" (")[0] for entry in found] == ignored
    assert ignored_settings(resolve(task="ssc", model=model), {}) == []
    assert main(["train", "--model", model, "--print-config", "--set", *overrides]) == 0
    err = capsys.readouterr().err
    assert err.count("does nothing for the") == len(ignored), err


def test_a_data_root_for_a_data_set_without_files_gets_a_note(tmp_path, capsys):
    """Mackey-Glass is generated and digits-8x8 ships with scikit-learn: a data root given
    for them was accepted and recorded without a word, as if it were read."""
    for task in ("mackey-glass", "digits-8x8"):
        argv = ["train", "--task", task, "--print-config", "--data-root", str(tmp_path)]
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert f"(--data-root) does nothing for {task}, whose data is generated" in err, err
    assert main(["train", "--task", "shd", "--print-config", "--data-root", str(tmp_path)]) == 0
    assert "does nothing" not in capsys.readouterr().err
    assert main(["train", "--task", "mackey-glass", "--print-config"]) == 0
    assert "does nothing" not in capsys.readouterr().err


def test_a_new_run_takes_seeds_torch_tells_apart_and_an_old_run_keeps_its_own(tmp_path):
    """torch keeps a seed's low 32 bits: a new run of seed 2**32 would initialise, shuffle and
    drop out as seed 0. A run written before with such a seed still loads (its resume and
    evaluation checked the stored config against the new limit and refused it), and data
    seeds, which go to numpy, keep the 64-bit range."""
    from delrec.training import TrainConfig, Trainer

    with pytest.raises(ConfigError, match="seed 4294967296 is beyond 4294967295"):
        resolve(flags={"seed": 2**32})
    stored = resolve(flags={"seed": 5}).to_dict()
    stored["seed"] = 2**32 + 1
    old = TrainConfig.from_dict(stored)  # as resume, eval and compare read config.json
    assert old.seed == 2**32 + 1
    with pytest.raises(ConfigError, match="as seed 1; give a seed in 0…4294967295"):
        Trainer(old, tmp_path / "new", progress=False).fit()
    assert not (tmp_path / "new" / "config.json").exists()
    resolve(task="shd", overrides=["data.split_seed=4294967296"])  # numpy's: 64-bit
