"""Chips' delay limits: ``network.max_delay`` validated, respected from initialisation through
every optimizer step of a real training run, recorded in the run, checked by `delrec export` and
`delrec report`; `delrec report --target` against the table of chips, whose every number cites
its source (docs/deployment.md#chips-delay-limits)."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from delrec.checkpoint import network_from, network_payload, save_checkpoint
from delrec.cli import main
from delrec.config import ConfigError, resolve
from delrec.delays import MAX_DELAY, DelayLimitWarning
from delrec.deploy.report import format_report, hardware_report
from delrec.deploy.targets import (
    TARGETS,
    Target,
    bits_for,
    format_target_check,
    format_targets,
    get_target,
    target_check,
)
from delrec.layers import DelRec, FeedforwardDelay, clamp_delays
from delrec.models import NetworkConfig, build_network
from delrec.runs import load_checkpoint
from delrec.training import Trainer
from delrec.training.jobs import train_one

DOCS = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The presets run on one CPU thread; give the next tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def network(delay_type="axonal", model="delrec", max_delay=None, **settings):
    """A small network: 3 inputs, hidden layers 6 and 5, hard reset (exportable to NIR)."""
    settings = {"delay_init": "uniform:0:8", "ff_delay_window": 6, **settings}
    cfg = NetworkConfig(
        3,
        (6, 5),
        2,
        model=model,
        delay_type=delay_type,
        max_delay=max_delay,
        block="dropout",
        readout="sum",
        neuron=dict(reset="hard"),
        **settings,
    )
    return build_network(cfg, seed=0).eval()


def set_delays(layer: DelRec, values) -> None:
    with torch.no_grad():
        layer.delay.copy_(torch.as_tensor(values, dtype=layer.delay.dtype).expand_as(layer.delay))


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "value, message",
    [
        ("62.5", "network.max_delay must be an integer"),
        ("true", "network.max_delay must be an integer"),
        ('"sixty"', "network.max_delay must be an integer"),
        ("NaN", "network.max_delay must be an integer"),
        ("-1", "max_delay = -1 steps is out of range"),
        ("65536", "max_delay = 65536 steps is out of range"),
    ],
)
def test_bad_max_delay_is_refused_naming_the_setting(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve("digits-8x8", overrides=[f"network.max_delay={value}"])


def test_max_delay_is_a_network_setting_recorded_in_the_config_and_checkpoints():
    config = resolve("digits-8x8", overrides=["network.max_delay=62"])
    assert config.network["max_delay"] == 62
    assert resolve("digits-8x8").network["max_delay"] is None  # no limit by default
    assert resolve("digits-8x8", overrides=[f"network.max_delay={MAX_DELAY:.0f}"])
    net = build_network(config.network_config(1, 10), seed=0)
    payload = network_payload(net)
    assert payload["network_config"]["max_delay"] == 62
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading never warns: the checkpoint's delays are used
        loaded = network_from(payload)
    assert loaded.config.max_delay == 62
    assert all(m.max_delay == 62 for m in loaded.modules() if isinstance(m, DelRec))
    legacy = dict(payload["network_config"])
    del legacy["max_delay"]  # a checkpoint written before the setting existed: no limit
    assert network_from({**payload, "network_config": legacy}).config.max_delay is None
    for bad in (2.5, -3, True, MAX_DELAY + 1):
        with pytest.raises(ValueError, match="max_delay"):
            NetworkConfig(3, (4,), 2, max_delay=bad)
        with pytest.raises(ValueError, match="max_delay"):
            DelRec(4, max_delay=bad)


def test_the_train_command_refuses_a_bad_limit_before_loading_anything(capsys):
    assert main(["train", "--set", "network.max_delay=-5", "--print-config"]) == 2
    assert "max_delay = -5 steps is out of range" in capsys.readouterr().err
    assert main(["train", "--set", "network.max_delay=30", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["network"]["max_delay"] == 30


# --------------------------------------------------------------------------- layers
@pytest.mark.parametrize("delay_type", ["axonal", "synaptic", "shared"])
@pytest.mark.parametrize("variant", ["learned", "fixed"])
def test_initial_delays_above_the_limit_are_clamped_with_a_notice(delay_type, variant):
    make = DelRec if variant == "learned" else DelRec.fixed
    generator = torch.Generator().manual_seed(1)
    with pytest.warns(DelayLimitWarning, match=r"above max_delay = 5 steps and start at 5"):
        layer = make(
            16, delay_type=delay_type, delay_init="uniform:0:20", max_delay=5, generator=generator
        )
    assert float(layer.delay.detach().max()) == 5.0 and float(layer.delay.detach().min()) >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", DelayLimitWarning)  # within the limit: no notice
        DelRec(16, delay_type=delay_type, delay_init="uniform:0:5", max_delay=5)
        DelRec(16, delay_type=delay_type, delay_init="uniform:0:20")  # no limit


@pytest.mark.parametrize("delay_type", ["axonal", "synaptic", "shared"])
def test_clamp_keeps_recurrent_delays_in_zero_to_max_delay(delay_type):
    layer = DelRec(6, delay_type=delay_type, delay_init="uniform:0:3", max_delay=4)
    set_delays(layer, 9.5)
    clamp_delays(layer)
    assert torch.all(layer.delay == 4.0)
    set_delays(layer, -2.0)
    layer.clamp_delays_()
    assert torch.all(layer.delay == 0.0)
    unlimited = DelRec(6, delay_type=delay_type)
    set_delays(unlimited, 9.5)
    clamp_delays(unlimited)
    assert torch.all(unlimited.delay == 9.5)  # without a limit only MAX_DELAY bounds them


def test_feedforward_positions_stay_below_the_window_and_the_limit():
    with pytest.warns(DelayLimitWarning, match=r"kernel_size = max_delay \+ 1 = 4"):
        layer = FeedforwardDelay(5, 7, kernel_size=10, max_delay=3)
    assert float(layer.position.detach().max()) == 3.0 and layer.position_limit == 3
    with torch.no_grad():
        layer.position.fill_(8.0)
    clamp_delays(layer)
    assert torch.all(layer.position == 3.0)
    wide_limit = FeedforwardDelay(5, 7, kernel_size=4, max_delay=100)  # the window is tighter
    assert wide_limit.position_limit == 3


@pytest.mark.parametrize("value", [3.6, 9.0, 9.7])
def test_feedforward_positions_beyond_max_delay_are_refused_in_eval_as_recurrent_delays_are(
    value,
):
    """Eval mode runs the positions as a chip would: one beyond ``max_delay`` that still reaches
    a tap of the window is an error naming the clamp, never a silent tap; training runs it,
    and a position outside the window counts nothing in either mode (docs/design.md)."""
    with pytest.warns(DelayLimitWarning):  # initial positions in the window 0…9, above 3
        layer = FeedforwardDelay(3, 2, 10, generator=torch.Generator().manual_seed(0), max_delay=3)
    x = torch.rand(8, 2, 3)
    with torch.no_grad():
        layer.position[0, 1] = value
    layer(x)  # training mode: between an optimizer step and the clamp
    with pytest.raises(ValueError, match=rf"reach {value:g} steps, beyond its max_delay = 3 \("):
        layer.eval()(x)
    clamp_delays(layer)
    layer(x)
    with torch.no_grad():
        layer.position[0, 1] = 10.0  # beyond the window: its synapse counts nothing
        layer.position[1, 0] = -2.0
    dropped = layer(x)
    with torch.no_grad():
        layer.weight[0, 1] = layer.weight[1, 0] = 0.0
    assert torch.equal(layer(x), dropped)


# --------------------------------------------------------------------------- training
def test_a_training_run_respects_the_limit_after_every_step_and_records_it(tmp_path, capsys):
    """digits-8x8 with learned recurrent and feedforward delays and a large position learning
    rate: the optimizer pushes delays past max_delay = 3, and every forward of the run still
    sees them in [0, 3]; the limit is in config.json and the checkpoints, export and report
    accept the result."""
    limit = 3
    config = resolve(
        "digits-8x8",
        "ff+rec",
        overrides=[
            "max_train_samples=64",
            "epochs=2",
            "batch_size=32",
            "network.hidden_sizes=[8]",
            "network.delay_init=uniform:0:6",
            "network.ff_delay_window=6",
            f"network.max_delay={limit}",
            "network.neuron.reset=hard",
            "optim.position_lr=0.5",
        ],
    )
    with pytest.warns(DelayLimitWarning):  # U(0, 6) and the window 0 … 5 reach past 3
        trainer = Trainer(config, tmp_path / "run", progress=False, log=lambda m: None)
    delay_layers = [
        m for m in trainer.network.modules() if isinstance(m, (DelRec, FeedforwardDelay))
    ]
    assert {type(m) for m in delay_layers} == {DelRec, FeedforwardDelay}

    def values(module):
        return (module.delay if isinstance(module, DelRec) else module.position).detach()

    def largest() -> float:
        return max(float(values(m).max()) for m in delay_layers)

    def smallest() -> float:
        return min(float(values(m).min()) for m in delay_layers)

    seen, after_step = [], []
    for module in delay_layers:
        module.register_forward_pre_hook(lambda *_: seen.append((smallest(), largest())))
    trainer.optimizers["positions"].register_step_post_hook(lambda *_: after_step.append(largest()))
    messages = []
    trainer.log = messages.append
    summary = train_one(trainer)

    assert summary["status"] == "complete" and after_step
    assert max(after_step) > limit  # the optimizer did push delays past the limit …
    assert all(0 <= low and high <= limit for low, high in seen)  # … and no forward saw it
    assert any(high == limit for _, high in seen)  # delays sat at the limit
    assert any(f"delays ≤ {limit} steps (network.max_delay)" in m for m in messages)

    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["config"]["network"]["max_delay"] == limit
    for which in ("best", "last"):
        payload = load_checkpoint(run, which)
        assert payload["network_config"]["max_delay"] == limit
        for name, value in payload["model"].items():
            if name.endswith((".delay", ".position")):
                assert float(value.max()) <= limit and float(value.min()) >= 0, name

    capsys.readouterr()
    assert main(["report", str(run), "--no-data", "--target", "spinnaker"]) == 0
    printed = capsys.readouterr().out
    assert f"network.max_delay: {limit} steps; every integer delay is within it" in printed
    report = json.loads((run / "report" / "hardware_report.json").read_text())
    assert report["max_delay"]["pass"] and report["target"]["pass"]
    assert main(["export", str(run), "-o", str(tmp_path / "model.nir")]) == 0


# --------------------------------------------------------------------------- export / report
def test_export_refuses_a_network_whose_delays_exceed_its_limit(tmp_path, capsys):
    pytest.importorskip("nir", reason="NIR export needs the optional `nir` package")
    net = network(max_delay=10)
    set_delays(net.blocks[1].neurons, [1.0, 2.0, 12.4, 3.0, 0.0])  # 12 > 10: edited by hand
    run = tmp_path / "run"
    save_checkpoint(network_payload(net), run / "checkpoints" / "best.pt")
    out = tmp_path / "model.nir"
    assert main(["export", str(run), "-o", str(out)]) == 2
    error = capsys.readouterr().err
    assert "network.max_delay: 10 steps; EXCEEDED by layer1 recurrent axonal delays (max 12)" in (
        error
    )
    assert "retrain with --set network.max_delay" in error and not out.exists()

    assert main(["report", str(run), "--no-data"]) == 0  # the report shows it, and goes on
    assert "EXCEEDED by layer1 recurrent axonal delays (max 12)" in capsys.readouterr().out
    report = json.loads((run / "report" / "hardware_report.json").read_text())
    assert report["max_delay"] == {
        "max_delay": 10,
        "largest": 12,
        "pass": False,
        "exceeding": [{"projection": "layer1 recurrent axonal delays", "max": 12}],
    }

    clamp_delays(net)  # rounded 10 is within the limit again: exported
    save_checkpoint(network_payload(net), run / "checkpoints" / "best.pt")
    assert main(["export", str(run), "-o", str(out)]) == 0 and out.is_file()


def test_the_report_measures_a_network_whose_delays_exceed_its_limit_on_data():
    """The data pass runs the delays as they are (a stream would), the report says they
    exceed the limit, and the layers keep their ``max_delay`` afterwards."""
    net = network(max_delay=10)
    layer = net.blocks[1].neurons
    set_delays(layer, [1.0, 2.0, 12.4, 3.0, 0.0])
    g = torch.Generator().manual_seed(0)
    loader = [((torch.rand(30, 4, 3, generator=g) < 0.5).float() * 4, torch.arange(4) % 2)]
    report = hardware_report(net, loader)
    assert report["max_delay"]["pass"] is False and report["max_delay"]["largest"] == 12
    assert layer.max_delay == 10 and not net.training
    unlimited = network()
    unlimited.load_state_dict(net.state_dict())
    assert report == {**hardware_report(unlimited, loader), "max_delay": report["max_delay"]}
    with pytest.raises(ValueError, match="beyond its max_delay = 10"):
        net(loader[0][0])  # the layer itself still refuses them in eval mode


def test_the_report_measures_feedforward_positions_beyond_their_limit_on_data():
    with pytest.warns(DelayLimitWarning, match="FeedforwardDelay"):  # window 6 > limit 4
        net = network(model="ff+rec", max_delay=4, delay_init="uniform:0:4")
    synapses = net.blocks[0].synapses
    assert isinstance(synapses, FeedforwardDelay) and synapses.max_delay == 4
    with torch.no_grad():
        synapses.position[0, 0] = 5.0  # within the window (6), beyond the limit
    g = torch.Generator().manual_seed(0)
    loader = [((torch.rand(30, 4, 3, generator=g) < 0.5).float() * 4, torch.arange(4) % 2)]
    report = hardware_report(net, loader)
    assert report["max_delay"]["pass"] is False and synapses.max_delay == 4
    assert report["evaluation"]["samples"] == 4
    with pytest.raises(ValueError, match=r"reach 5 steps, beyond its max_delay = 4"):
        net(loader[0][0])


def statuses(check: dict, name: str) -> list[str]:
    return [c["status"] for c in check["checks"] if c["check"] == name]


@pytest.mark.parametrize(
    "delay_type, per_neuron_chip",
    [("axonal", "PASS"), ("shared", "PASS"), ("synaptic", "FAIL")],
)
def test_target_check_on_each_recurrent_delay_type(delay_type, per_neuron_chip):
    net = network(delay_type, delay_init="uniform:0:14")
    report = hardware_report(net)
    longest = max(d["max"] for layer in report["layers"] for d in layer["delays"])
    assert 8 <= longest <= 14
    loihi = target_check(report, get_target("loihi2-lava-dl"))
    assert statuses(loihi, "max delay") == ["PASS", "PASS"]
    assert statuses(loihi, "delay type") == [per_neuron_chip] * 2
    assert statuses(loihi, "recurrent delays") == ["FAIL", "FAIL"] and not loihi["pass"]
    spinnaker = target_check(report, get_target("spinnaker"))
    assert statuses(spinnaker, "delay type") == ["PASS", "PASS"] and spinnaker["pass"]
    assert statuses(spinnaker, "delay bits") == ["n/a", "n/a"]  # no source states them

    set_delays(net.blocks[1].neurons, 20.0)  # beyond SpiNNaker's 15, within 143 with extensions
    report = hardware_report(net)
    spinnaker = target_check(report, get_target("spinnaker"))
    assert statuses(spinnaker, "max delay") == ["PASS", "FAIL"]
    assert "train for it: --set network.max_delay=15" in spinnaker["checks"][3]["detail"]
    assert target_check(report, get_target("spinnaker-delay-ext"))["pass"]


def test_a_target_without_recurrent_delays_fails_delrec_and_passes_a_plain_loop():
    """lava-dl delays a block's output to the next layer, not its recurrent synapses: a DelRec
    network fails loihi2-lava-dl (it used to pass as "axonal delays are per neuron"), a
    recurrent network without delays (rsnn) passes, and the listing says why."""
    delrec = target_check(hardware_report(network("axonal")), get_target("loihi2-lava-dl"))
    failed = [c for c in delrec["checks"] if c["check"] == "recurrent delays"]
    assert failed and all(c["status"] == "FAIL" for c in failed)
    assert "not its recurrent synapses" in failed[0]["detail"]
    assert "no delays on recurrent synapses" in format_target_check(delrec)
    plain = target_check(hardware_report(network(model="rsnn")), get_target("loihi2-lava-dl"))
    assert plain["pass"] and set(statuses(plain, "recurrent delays")) <= {"PASS"}
    assert "AbstractRecurrent" in format_targets()


def test_per_neuron_targets_take_synaptic_delays_that_are_equal_per_neuron():
    net = network("synaptic")
    layer = net.blocks[0].neurons
    columns = torch.arange(6.0).expand(6, 6)  # synapses from neuron j all have delay j
    set_delays(layer, columns)
    with torch.no_grad():
        layer.weight[0, 2] = 0.0  # a zero-weight synapse does not count …
        layer.delay[0, 2] = 9.0  # … whatever its delay
    set_delays(net.blocks[1].neurons, torch.arange(5.0).expand(5, 5))
    report = hardware_report(net)
    assert [d["neurons_with_mixed_delays"] for d in report["layers"][0]["delays"]] == [0]
    check = target_check(report, get_target("loihi2-lava-dl"))
    assert statuses(check, "delay type") == ["PASS", "PASS"]
    assert "run as per-neuron delays" in check["checks"][1]["detail"]
    with torch.no_grad():
        layer.delay[1, 3] = 4.0  # neuron 3 now sends with delays 3 and 4
    check = target_check(hardware_report(net), get_target("loihi2-lava-dl"))
    assert statuses(check, "delay type") == ["FAIL", "PASS"]
    assert "1 presynaptic neurons" in check["checks"][1]["detail"]


def test_target_check_on_feedforward_delays():
    net = network(model="ffdelay", ff_delay_window=12)
    report = hardware_report(net)
    kinds = [d["kind"] for layer in report["layers"] for d in layer["delays"]]
    assert kinds == ["feedforward", "feedforward"]
    loihi = target_check(report, get_target("loihi2-lava-dl"))
    assert statuses(loihi, "delay type") == ["FAIL", "FAIL"] and not loihi["pass"]
    assert "without feedforward delays" in loihi["checks"][1]["detail"]
    assert target_check(report, get_target("spinnaker"))["pass"]  # one delay per synapse
    plain = target_check(hardware_report(network(model="snn")), get_target("loihi2-lava-dl"))
    assert plain == {**plain, "checks": [], "pass": True}  # no delays: nothing to fail
    assert "the network has no delays" in format_target_check(plain)


def test_delay_bits_are_compared_when_a_target_states_them():
    assert [bits_for(d) for d in (0, 1, 2, 3, 62, 63, 64)] == [1, 1, 2, 2, 6, 6, 7]
    chip = Target("six-bit", "a 6-bit chip", 100, "test", "test", True, "test", 6, "test")
    net = network("axonal")
    set_delays(net.blocks[1].neurons, 63.0)
    assert statuses(target_check(hardware_report(net), chip), "delay bits") == ["PASS", "PASS"]
    set_delays(net.blocks[1].neurons, 64.0)
    check = target_check(hardware_report(net), chip)
    assert statuses(check, "delay bits") == ["PASS", "FAIL"] and not check["pass"]
    assert "needs 7 bits, the target stores 6" in check["checks"][-1]["detail"]


def test_report_target_command_prints_pass_fail_and_writes_json(tmp_path, capsys):
    net = network("synaptic", max_delay=30)
    run = tmp_path / "run"
    save_checkpoint(network_payload(net), run / "checkpoints" / "best.pt")
    assert main(["report", str(run), "--no-data", "--target", "loihi2-lava-dl"]) == 3
    captured = capsys.readouterr()
    printed = captured.out
    assert "target loihi2-lava-dl:" in printed and "verdict: FAIL" in printed
    assert "does not fit loihi2-lava-dl (verdict FAIL above): exit code 3" in captured.err
    assert re.search(r"FAIL\s+delay type: layer0 recurrent synaptic delays", printed)
    assert re.search(r"PASS\s+max delay: layer0 recurrent synaptic delays", printed)
    report = json.loads((run / "report" / "hardware_report.json").read_text())
    assert report["target"]["target"]["name"] == "loihi2-lava-dl" and not report["target"]["pass"]
    assert format_report(report).count("verdict: FAIL") == 1

    assert main(["report", str(run), "--no-data", "--target", "loihi"]) == 2
    error = capsys.readouterr().err
    assert "unknown target 'loihi' (did you mean 'loihi2-lava-dl'?)" in error
    assert all(name in error for name in TARGETS)
    fits = "spinnaker-delay-ext"  # per-synapse delays up to 143 steps
    assert main(["report", str(run), "--no-data", "--target", fits]) == 0
    assert "verdict: PASS" in capsys.readouterr().out
    assert main(["report", "--list-targets"]) == 0
    listing = capsys.readouterr().out
    assert all(f"{name}:" in listing for name in TARGETS) and "source: https://" in listing
    assert main(["report"]) == 2  # neither a run nor --list-targets


# --------------------------------------------------------------------------- the table
def test_every_number_of_the_target_table_cites_its_source():
    assert TARGETS and all(name == target.name for name, target in TARGETS.items())
    for target in TARGETS.values():
        assert isinstance(target.max_delay, int) and 0 <= target.max_delay <= MAX_DELAY
        for source in (target.max_delay_source, target.granularity_source):
            assert re.search(r"https://github\.com/\S+/blob/[0-9a-f]{40}/\S+", source), target.name
        assert str(target.max_delay) in target.published  # how the limit maps into ours
        assert (target.delay_bits is None) == (target.delay_bits_source is None)
        if target.delay_bits is not None:
            assert "https://" in target.delay_bits_source


def test_the_docs_table_lists_every_target_with_its_numbers():
    text = DOCS.read_text()
    section = text[text.index("## Chips' delay limits") :]
    for target in TARGETS.values():
        row = next(line for line in section.splitlines() if line.startswith(f"| `{target.name}`"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[2] == str(target.max_delay), target.name
        assert cells[3] == ("per synapse" if target.per_synapse else "per neuron"), target.name
        assert cells[4] == (
            "not published" if target.delay_bits is None else str(target.delay_bits)
        )


def test_deployment_refuses_what_a_chip_would_run_differently(tmp_path):
    """From Python as from the command line: a NaN weight, a delay below 0 (training reads it as
    it is, a chip as 0), delays beyond the network's max_delay (to_nir); nothing is written."""
    pytest.importorskip("nir", reason="NIR export needs the optional `nir` package")
    from delrec.deploy import StreamingNetwork, export_nir

    out = tmp_path / "model.nir"
    nan_weight = network(model="ff+rec")
    with torch.no_grad():
        nan_weight.blocks[1].neurons.weight[0, 0] = float("nan")
    negative = network()
    set_delays(negative.blocks[0].neurons, -2.0)
    over = network(max_delay=10)
    set_delays(over.blocks[1].neurons, [1.0, 2.0, 12.4, 3.0, 0.0])
    for net, message in (
        (nan_weight, r"blocks\.1\.neurons\.weight holds NaN or Inf"),
        (negative, r"blocks\.0\.neurons\.delay holds delays below 0 \(-2 steps\).*clamp_delays"),
    ):
        for deploy in (StreamingNetwork.from_network, lambda net: export_nir(net, out)):
            with pytest.raises(ValueError, match=message):
                deploy(net)
    with pytest.raises(ValueError, match=r"EXCEEDED by layer1 recurrent axonal delays \(max 12\)"):
        export_nir(over, out)
    assert not out.exists()
    StreamingNetwork.from_network(over)  # a stream of it runs, for the hardware report
    clamp_delays(over)
    export_nir(over, out)
    assert out.is_file()


def test_a_pruned_synapse_counts_in_no_delay_figure_and_exports_no_branch():
    """A zero-weight synapse is dropped by a chip: its delay no longer sets the maximum, the
    histogram, the buffers or a target's verdict, and the NIR export writes no Delay branch
    for it (a 40-step synapse of weight 0 made SpiNNaker FAIL and exported a 40-step Delay)."""
    from delrec.deploy.nir_format import to_nir

    net = network("synaptic", delay_init="uniform:0:10")
    layer = net.blocks[0].neurons
    with torch.no_grad():
        layer.delay[0, 0] = 40.0
        layer.weight[0, 0] = 0.0
    report = hardware_report(net)
    entry = report["layers"][0]["delays"][0]
    assert entry["max"] <= 10 and "40" not in entry["histogram"]
    assert entry["values"] == layer.weight.numel() - 1
    assert target_check(report, get_target("spinnaker"))["pass"]
    assert not any("lag40" in name for name in to_nir(net).nodes)
    axonal = network("axonal", delay_init="uniform:0:10", max_delay=10)
    with torch.no_grad():
        axonal.blocks[0].neurons.delay[2] = 40.0
        axonal.blocks[0].neurons.weight[:, 2] = 0.0  # neuron 2 sends nothing back
    assert hardware_report(axonal)["layers"][0]["delays"][0]["max"] <= 10
    delay = to_nir(axonal).nodes["layer0.recurrent.delay"].delay  # exported within the limit
    assert delay.max() <= 10 and delay[2] == 0
