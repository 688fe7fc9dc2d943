"""Deployment: streaming equals whole-sequence integer-delay eval, NIR round trip, refusals,
hardware report, and the export/report commands."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from delrec.checkpoint import network_payload, save_checkpoint
from delrec.cli import main
from delrec.deploy import (
    DelayedSynapses,
    NIRExportError,
    NIRImportError,
    StreamingLayer,
    StreamingNetwork,
    export_nir,
    import_nir,
    to_nir,
)
from delrec.deploy.report import format_report, hardware_report, write_report
from delrec.layers import DelRec, FeedforwardDelay
from delrec.models import MODELS, NetworkConfig, build_network, preset_network
from delrec.neurons import AdLIF, lif_charge

nir = pytest.importorskip("nir", reason="NIR tests need the optional `nir` package")

T, B = 40, 3


def random_network(
    model: str,
    delay_type: str = "axonal",
    reset: str = "hard",
    block: str = "bn",
    readout: str = "lif",
    seed: int = 0,
) -> nn.Module:
    """A small float64 network in eval mode with non-trivial BN statistics and a spread σ
    that integer-delay mode must ignore."""
    cfg = NetworkConfig(
        6,
        (8, 10),
        3,
        model=model,
        delay_type=delay_type,
        delay_init="uniform:0:8",
        block=block,
        readout=readout,
        learn_spread=True,
        ff_delay_window=5,
        neuron=dict(reset=reset, tau=1.5),
    )
    net = build_network(cfg, seed=seed).double()
    randomise(net, seed)
    return net.eval()


def randomise(net: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=generator))
                m.weight.copy_(0.8 + 0.8 * torch.rand(m.num_features, generator=generator))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=generator))
            if isinstance(m, DelRec):
                m.sigma.fill_(3.0)


def spike_input(channels: int, seed: int = 0, steps: int = T, batch: int = B) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 2.0 * (torch.rand(steps, batch, channels, generator=generator) < 0.3).double()


def assert_same_run(net, stream, x):
    out, spikes = net.forward_with_spikes(x)
    out_stream, spikes_stream = stream.run(x)
    for layer, (a, b) in enumerate(zip(spikes, spikes_stream)):
        assert torch.equal(a, b), f"layer {layer}: {(a != b).sum().item()} spikes differ"
        assert 0 < a.mean() < 1, f"layer {layer} is silent or saturated; the test would be vacuous"
    torch.testing.assert_close(out_stream, out, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("delay_type", ["axonal", "synaptic"])
@pytest.mark.parametrize("model", MODELS)
def test_streaming_equals_integer_delay_eval_spike_for_spike(model, delay_type, reset):
    block, readout = ("bn", "lif") if reset == "hard" else ("dropout", "sum")
    net = random_network(model, delay_type, reset, block, readout)
    assert_same_run(net, StreamingNetwork.from_network(net), spike_input(6))


@pytest.mark.parametrize("task", ["shd", "ssc", "psmnist", "mackey-glass"])
def test_streaming_equals_eval_on_small_presets(task):
    cfg = preset_network(
        task,
        "delrec",
        hidden_sizes=(12,) * len(preset_network(task).hidden_sizes),
        delay_init="uniform:0:10",
    )
    net = build_network(cfg, seed=1).double()
    randomise(net, 1)
    net.eval()
    x = spike_input(cfg.input_size, seed=2) * (4 if task != "shd" else 1)
    out, spikes = net.forward_with_spikes(x)
    out_stream, spikes_stream = StreamingNetwork.from_network(net).run(x)
    assert all(torch.equal(a, b) for a, b in zip(spikes, spikes_stream))
    assert sum(s.sum() for s in spikes) > 0
    torch.testing.assert_close(out_stream, out, rtol=1e-12, atol=1e-12)


def test_spike_arrives_one_plus_rounded_delay_steps_later():
    """Neuron 0 fires once at t = 0; its recurrent synapses reach neuron 1 after 1 + round(d)
    steps: d = 2.5 rounds (half to even) to 2, so neuron 1 fires at t = 3, in eval and streaming."""
    cfg = NetworkConfig(
        1,
        (2,),
        1,
        model="delrec",
        block="dropout",
        dropout=0.0,
        bias=False,
        readout="sum",
        neuron=dict(reset="hard", tau=2.0),
    )
    net = build_network(cfg, seed=0).double().eval()
    with torch.no_grad():
        net.blocks[0].synapses.weight.copy_(torch.tensor([[2.0], [0.0]]))
        layer = net.blocks[0].neurons
        layer.weight.copy_(torch.tensor([[0.0, 0.0], [5.0, 0.0]]))
        layer.delay.copy_(torch.tensor([2.5, 0.0]))
    x = torch.zeros(10, 1, 1, dtype=torch.float64)
    x[0] = 1.0
    expected = {0: [0], 1: [3]}
    for spikes in (
        net.forward_with_spikes(x)[1][0],
        StreamingNetwork.from_network(net).run(x)[1][0],
    ):
        assert {n: spikes[:, 0, n].nonzero().flatten().tolist() for n in (0, 1)} == expected


def test_streaming_is_sensitive_to_an_off_by_one_delay():
    net = random_network("delrec", "axonal")
    stream = StreamingNetwork.from_network(net)
    shifted = StreamingNetwork.from_network(net)
    for layer in shifted.layers:
        layer.recurrent = type(layer.recurrent)(layer.recurrent.weight, layer.recurrent.lags + 1)
    x = spike_input(6)
    assert any(not torch.equal(a, b) for a, b in zip(stream.run(x)[1], shifted.run(x)[1]))


def test_single_sample_and_batched_streams_agree_step_by_step():
    net = random_network("delrec", "synaptic")
    stream = StreamingNetwork.from_network(net)
    x = spike_input(6)
    batched = stream.initial_state(B)
    singles = [stream.initial_state() for _ in range(B)]
    for x_t in x:
        y = stream.step(x_t, batched)
        for b, state in enumerate(singles):
            y_b = stream.step(x_t[b], state)
            assert y_b.shape == (3,)
            torch.testing.assert_close(y_b, y[b], rtol=0, atol=1e-12)
            for layer in range(2):
                assert torch.equal(state.spikes[layer][0], batched.spikes[layer][b])
    unbatched_out, unbatched_spikes = stream.run(x[:, 0])
    assert unbatched_out.shape == (T, 3) and unbatched_spikes[0].shape == (T, 8)


def test_a_copied_state_branches_the_stream_and_a_fresh_state_restarts_it():
    import copy

    stream = StreamingNetwork.from_network(random_network("fixed", "axonal"))
    x = spike_input(6)
    state = stream.initial_state(B)
    for x_t in x[:20]:
        stream.step(x_t, state)
    branch = copy.deepcopy(state)
    tail = [stream.step(x_t, state) for x_t in x[20:]]
    assert all(torch.equal(stream.step(x_t, branch), y) for x_t, y in zip(x[20:], tail))
    assert torch.equal(stream.run(x)[0], stream.run(x)[0])


def test_streaming_supports_adaptive_neurons_and_drops_out_of_window_positions():
    net = random_network("ff+rec", "axonal", block="dropout", readout="sum")
    with torch.no_grad():
        net.blocks[1].neurons.neuron = AdLIF(tau_u=3.0, tau_w=10.0)
        ffd = net.blocks[0].synapses
        assert isinstance(ffd, FeedforwardDelay)
        ffd.position[0, :3] = torch.tensor(
            [4.6, -0.7, 4.4]
        )  # before clamping: 5 and -1 fall outside
    stream = StreamingNetwork.from_network(net)
    assert stream.layers[0].synapses.weight[0, :2].eq(0).all()
    assert stream.layers[0].synapses.lags[0, 2] == 4
    assert_same_run(net, stream, spike_input(6) * 1.5)


def test_streaming_errors_name_the_problem():
    net = random_network("delrec")
    stream = StreamingNetwork.from_network(net)
    state = stream.initial_state(2)
    with pytest.raises(ValueError, match=r"\(2, 6\)"):
        stream.step(torch.zeros(3, 6, dtype=torch.float64), state)
    with pytest.raises(TypeError, match="dtype"):
        stream.step(torch.zeros(2, 6), state)
    net.blocks[0].norm = nn.BatchNorm1d(8, track_running_stats=False).double()
    with pytest.raises(ValueError, match="running statistics"):
        StreamingNetwork.from_network(net)
    with pytest.raises(TypeError, match="SpikingNetwork"):
        StreamingNetwork.from_network(nn.Linear(2, 2))


# --------------------------------------------------------------------------- NIR
HARD_RESET_CASES = [(m, d) for m in MODELS for d in ("axonal", "synaptic")]


@pytest.mark.parametrize("model,delay_type", HARD_RESET_CASES)
def test_nir_round_trip_reproduces_the_spikes(tmp_path, model, delay_type):
    net = random_network(model, delay_type, "hard", block="bn", readout="lif")
    path = tmp_path / "model.nir"
    export_nir(net, path, dt=0.01)
    graph = nir.read(path)  # nir's own reading, with type checking
    graph.check_types()
    assert_same_run(net, import_nir(path), spike_input(6))


@pytest.mark.parametrize("task", ["shd", "mackey-glass"])
def test_nir_round_trip_of_hard_reset_presets(tmp_path, task):
    cfg = preset_network(
        task, "delrec", hidden_sizes=(12,) * len(preset_network(task).hidden_sizes)
    )
    net = build_network(cfg, seed=3).double()
    randomise(net, 3)
    net.eval()
    export_nir(net, tmp_path / "m.nir", dt=0.001)
    stream = import_nir(tmp_path / "m.nir")
    x = spike_input(cfg.input_size, seed=4) * (4 if task != "shd" else 1)
    out, spikes = net.forward_with_spikes(x)
    out_stream, spikes_stream = stream.run(x)
    assert all(torch.equal(a, b) for a, b in zip(spikes, spikes_stream))
    torch.testing.assert_close(out_stream, out, rtol=1e-12, atol=1e-12)
    assert stream.readout_reduction == cfg.readout


def test_nir_graph_maps_lif_and_puts_axonal_delays_in_the_loop(tmp_path):
    net = random_network("delrec", "axonal")
    graph = to_nir(net, dt=0.01)
    lif = graph.nodes["layer1.lif"]
    assert lif.tau == pytest.approx(1.5 * 0.01) and (lif.r == 1.5).all()
    assert (lif.v_threshold == 1.0).all() and (lif.v_reset == 0).all() and (lif.v_leak == 0).all()
    edges = set(graph.edges)
    assert {
        ("layer1.lif", "layer1.recurrent.delay"),
        ("layer1.recurrent.delay", "layer1.recurrent.weight"),
        ("layer1.recurrent.weight", "layer1.lif"),
    } <= edges
    layer = net.blocks[1].neurons
    assert graph.nodes["layer1.recurrent.delay"].delay == pytest.approx(
        layer.delay.detach().round().numpy() * 0.01
    )
    assert graph.metadata["dt"] == 0.01 and "forward-Euler" in graph.metadata["time_convention"]
    # the stated convention: a forward-Euler step of NIR's LIF ODE is delrec's discrete LIF
    v, current = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    dt, tau, r, v_leak = 0.01, float(lif.tau[0]), float(lif.r[0]), float(lif.v_leak[0])
    euler = v + dt / tau * (v_leak - v + r * current)
    torch.testing.assert_close(
        euler, lif_charge(current, v, layer.neuron.p), rtol=1e-12, atol=1e-12
    )


def test_nir_synaptic_delays_become_one_branch_per_distinct_delay():
    net = random_network("delrec", "synaptic")
    graph = to_nir(net)
    distinct = torch.unique(net.blocks[1].neurons.delay.detach().round()).tolist()
    branches = [
        name
        for name in graph.nodes
        if name.startswith("layer1.recurrent.") and name.endswith(".weight")
    ]
    assert len(branches) == len(distinct) > 1
    total = sum(torch.from_numpy(graph.nodes[n].weight) for n in branches)
    torch.testing.assert_close(total, net.blocks[1].neurons.weight.detach())


@pytest.mark.parametrize(
    "change,construct",
    [
        (lambda net: None, "soft reset"),
        (lambda net: setattr(net.blocks[1].neurons, "neuron", AdLIF()), "AdLIF"),
    ],
)
def test_unsupported_constructs_are_refused_and_nothing_is_written(tmp_path, change, construct):
    net = random_network("delrec", reset="soft" if construct == "soft reset" else "hard")
    change(net)
    existing = tmp_path / "model.nir"
    existing.write_bytes(b"previous export")
    with pytest.raises(NIRExportError, match=construct):
        export_nir(net, existing)
    with pytest.raises(NIRExportError, match=construct):
        export_nir(net, tmp_path / "new.nir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.nir"]
    assert existing.read_bytes() == b"previous export"


def test_importer_rejects_graphs_of_another_shape(tmp_path):
    n = 3
    graph = nir.NIRGraph(
        nodes={
            "input": nir.Input(input_type={"input": np.array([2])}),
            "affine": nir.Affine(weight=np.ones((n, 2)), bias=np.zeros(n)),
            "cuba": nir.CubaLIF(
                **{k: np.ones(n) for k in ("tau_syn", "tau_mem", "r", "v_leak", "v_threshold")}
            ),
            "output": nir.Output(output_type={"output": np.array([n])}),
        },
        edges=[("input", "affine"), ("affine", "cuba"), ("cuba", "output")],
        metadata={"dt": 1.0},
    )
    with pytest.raises(NIRImportError, match="'cuba' is a CubaLIF"):
        import_nir(graph)
    del graph.metadata["dt"]
    with pytest.raises(NIRImportError, match="pass dt"):
        import_nir(graph)


# --------------------------------------------------------------------------- report
def test_report_counts_delays_and_buffer_memory():
    cfg = NetworkConfig(
        3,
        (4, 5),
        2,
        model="ff+rec",
        recurrent_layers=(0,),
        block="dropout",
        ff_delay_window=4,
        readout="sum",
    )
    net = build_network(cfg, seed=0)
    with torch.no_grad():
        net.blocks[0].neurons.delay.copy_(torch.tensor([0.0, 1.0, 1.4, 3.6]))  # → 0, 1, 1, 4
        net.blocks[0].synapses.position.copy_(torch.tensor([[0.0, 1.0, 3.0]] * 4))
    report = hardware_report(net)
    first = report["layers"][0]
    assert (
        first["neurons"] == 4
        and first["feedforward_synapses"] == 12
        and first["recurrent_synapses"] == 16
    )
    feedforward, recurrent = first["delays"]
    assert feedforward["histogram"] == {"0": 4, "1": 4, "3": 4} and feedforward["max"] == 3
    assert recurrent["histogram"] == {"0": 1, "1": 2, "4": 1} and recurrent["max"] == 4
    assert recurrent["axonal_buffer_bits"] == 4 * 4  # N_pre × max d
    assert recurrent["synaptic_buffer_bits"] == 4 * (0 + 1 + 1 + 4)  # N_post × Σ d_j
    assert recurrent["delay_value_bits"] == 4 * 3  # 4 values of ceil(log2(5)) bits
    assert feedforward["synaptic_buffer_bits"] == 4 * (0 + 1 + 3)
    assert report["layers"][1]["delays"] == [] and report["layers"][2]["name"] == "readout"
    assert report["totals"]["axonal_buffer_bits"] == 16 + 3 * 3
    assert "evaluation" not in report and "layer0" in format_report(report)


@torch.no_grad()
def test_the_rounding_cost_covers_feedforward_delays():
    """FeedforwardDelay rounded its positions in both passes, so the cost of rounding an
    ffdelay network read 0 however much the output moved."""
    cfg = NetworkConfig(3, (8,), 1, model="ffdelay", readout="ema", ff_delay_window=6)
    net = build_network(cfg, seed=0).double().eval()
    layers = [m for m in net.modules() if isinstance(m, FeedforwardDelay)]
    for layer in layers:  # halfway between two taps: rounding moves every synapse by 0.5
        layer.position.copy_(torch.randint(0, 5, layer.position.shape) + 0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 16, 3, generator=g, dtype=torch.float64)
    y = torch.randn(16, generator=g, dtype=torch.float64)
    evaluation = hardware_report(net, [(x, None, y)])["evaluation"]
    assert all(layer.integer_eval for layer in layers)
    assert evaluation["metric"] == "nmse"
    assert evaluation["spread_delays"] != pytest.approx(evaluation["integer_delays"], rel=1e-3)
    for layer in layers:
        layer.integer_eval = False
    assert hardware_report(net, [(x, None, y)])["evaluation"]["integer_delays"] == (
        pytest.approx(evaluation["integer_delays"])  # the report rounds whatever the flag
    )


@torch.no_grad()
def test_report_activity_and_rounding_cost_on_a_labelled_loader():
    net = random_network("delrec", "axonal", readout="sum", block="dropout")
    x = spike_input(6, steps=30, batch=6)
    lengths = torch.tensor([30, 30, 20, 25, 30, 10])
    mask = (torch.arange(30)[:, None] < lengths).unsqueeze(-1).double()
    out, spikes = net.forward_with_spikes(x)
    labels = (out * mask).sum(0).argmax(-1)  # integer-delay predictions over the true lengths
    for m in net.modules():
        if isinstance(m, DelRec):
            m.integer_eval = False
    spread_accuracy = float(((net(x) * mask).sum(0).argmax(-1) == labels).double().mean())
    for m in net.modules():
        if isinstance(m, DelRec):
            m.integer_eval = True
    net.train()
    loader = [(x[:, :3], lengths[:3], labels[:3]), (x[:, 3:], lengths[3:], labels[3:])]
    report = hardware_report(net, loader)
    assert net.training and all(m.integer_eval for m in net.modules() if isinstance(m, DelRec))
    evaluation = report["evaluation"]
    assert evaluation["samples"] == 6 and evaluation["integer_delays"] == 1.0
    assert evaluation["spread_delays"] == pytest.approx(spread_accuracy) and spread_accuracy < 1
    assert evaluation["rounding_cost"] == pytest.approx(spread_accuracy - 1.0)
    layer0, layer1, readout = report["layers"]  # activity: only the true lengths count
    assert layer1["spikes_per_inference"] == pytest.approx(float((spikes[1] * mask).sum()) / 6)
    inputs = float(((x != 0) * mask).sum()) / 6
    expected = inputs * 8 + float((spikes[0] * mask).sum()) / 6 * 8  # dense fan-outs: 8 and 8
    assert layer0["synops_per_inference"] == pytest.approx(expected)
    assert readout["synops_per_inference"] == pytest.approx(layer1["spikes_per_inference"] * 3)


@torch.no_grad()
def test_report_scores_regression_by_nmse(tmp_path):
    cfg = preset_network("mackey-glass", "delrec", hidden_sizes=(10,))
    net = build_network(cfg, seed=0).eval()
    x = torch.rand(25, 8, 1) * 4
    targets = torch.randn(8)
    prediction = net(x)[-1, :, 0]
    report = hardware_report(net, [(x, targets)])
    nmse = float(((prediction - targets) ** 2).sum() / ((targets - targets.mean()) ** 2).sum())
    assert report["evaluation"]["metric"] == "nmse"
    assert report["evaluation"]["integer_delays"] == pytest.approx(nmse, rel=1e-5)
    json_path, png_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text()) == report
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- CLI
def save_run(tmp_path, net):
    run = tmp_path / "run"
    save_checkpoint(network_payload(net), run / "checkpoints" / "best.pt")
    return run


def test_export_command_writes_a_readable_nir_file(tmp_path, capsys):
    net = build_network(
        NetworkConfig(
            1, (6,), 10, model="delrec", block="dropout", readout="sum", neuron=dict(reset="hard")
        ),
        seed=0,
    ).eval()
    run = save_run(tmp_path, net)
    out = tmp_path / "model.nir"
    assert main(["export", str(run), "--format", "nir", "-o", str(out), "--dt", "0.01"]) == 0
    assert "Delay" in capsys.readouterr().out
    assert math.isclose(float(nir.read(out).metadata["dt"]), 0.01)
    x = torch.rand(30, 2, 1) * 3
    assert torch.equal(import_nir(out).run(x)[1][0], net.forward_with_spikes(x)[1][0])
    # an earlier export is replaced; any other file is not (a checkpoint outside a run was)
    assert main(["export", str(run), "-o", str(out)]) == 0
    mine = tmp_path / "mine.pt"
    mine.write_bytes((run / "checkpoints" / "best.pt").read_bytes())
    assert main(["export", str(run), "-o", str(mine)]) == 2
    assert "exists and is not a NIR (HDF5) file, which the export would" in (
        capsys.readouterr().err
    )
    assert mine.read_bytes() == (run / "checkpoints" / "best.pt").read_bytes()
    for command in ("export", "eval"):  # a NIR file given where a run is expected
        assert main([command, str(out)]) == 2
        assert "is an HDF5 file, such as a NIR export, not a checkpoint" in (
            capsys.readouterr().err
        )


def test_export_command_refuses_soft_reset_cleanly(tmp_path, capsys):
    net = build_network(
        NetworkConfig(1, (6,), 10, model="delrec", neuron=dict(reset="soft")), seed=0
    )
    run = save_run(tmp_path, net)
    # a network NIR cannot express is bad input: exit code 2 (delrec.commands)
    assert main(["export", str(run), "-o", str(tmp_path / "model.nir")]) == 2
    assert "--set network.neuron.reset=hard" in capsys.readouterr().err
    assert not (tmp_path / "model.nir").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "run"
    ]


def test_report_command_measures_on_the_runs_test_split(tmp_path, capsys):
    from delrec.config import preset

    train_config = preset("digits-8x8", "delrec")
    net = build_network(train_config.network_config(1, 10), seed=0)
    run = tmp_path / "run"
    save_checkpoint(
        {**network_payload(net), "train_config": train_config.to_dict()},
        run / "checkpoints" / "best.pt",
    )
    assert main(["report", str(run), "--max-batches", "1", "--batch-size", "16"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "synops/inf" in printed and "accuracy on 16 samples" in printed
    assert "note: --max-batches 1: measuring 16 of the test split's" in captured.err  # not out
    report = json.loads((run / "report" / "hardware_report.json").read_text())
    assert (
        report["evaluation"]["samples"] == 16
        and report["layers"][0]["delays"][0]["kind"] == "axonal"
    )
    assert (run / "report" / "delay_histograms.png").is_file()
    assert main(["report", str(run), "--no-data", "-o", str(tmp_path / "static")]) == 0
    assert "evaluation" not in json.loads(
        (tmp_path / "static" / "hardware_report.json").read_text()
    )
    assert main(["report", str(tmp_path / "missing")]) == 2  # a missing file: bad input
    assert "no checkpoint" in capsys.readouterr().err


def test_report_max_batches_measures_a_random_subset_the_same_on_every_pass(capsys):
    """A split sorted by class (psmnist-mini's test split) would score its first classes only."""
    import argparse

    from delrec.commands.report import _measured

    by_class = list(range(100))  # item i of class i // 10
    args = argparse.Namespace(max_batches=2, batch_size=5, split="test")
    loaders = [_measured(by_class, args) for _ in range(2)]
    chosen = [loader.dataset.indices for loader in loaders]
    assert chosen[0] == chosen[1] and len(chosen[0]) == 10 and chosen[0] == sorted(chosen[0])
    assert len({i // 10 for i in chosen[0]}) >= 5, chosen[0]  # not the first classes only
    assert "measuring 10 of the test split's 100 items, drawn at random (seed 0)" in (
        capsys.readouterr().err
    )
    whole = _measured(by_class, argparse.Namespace(max_batches=20, batch_size=5, split="test"))
    assert whole.dataset is by_class  # batches enough for the whole split: every item


def test_report_command_on_a_named_data_set(tmp_path, capsys):
    net = build_network(NetworkConfig(1, (6, 6), 10, model="delrec", delay_type="synaptic"), seed=0)
    run = save_run(tmp_path, net)  # a bare network checkpoint: no training config
    assert main(["report", str(run)]) == 0
    assert "no training configuration" in capsys.readouterr().err
    assert (
        main(
            ["report", str(run), "--data", "digits-8x8", "--max-batches", "1", "--batch-size", "8"]
        )
        == 0
    )
    assert "accuracy on 8 samples" in capsys.readouterr().out


def test_report_refuses_a_data_set_the_network_cannot_answer(tmp_path, capsys):
    regression = build_network(NetworkConfig(1, (6,), 1, readout="ema"), seed=0)
    three = build_network(NetworkConfig(1, (6,), 3), seed=0)
    for net, data, problem in [
        (regression, "digits-8x8", "asks for scores of 10 classes, but the network has 1"),
        (three, "digits-8x8", "asks for scores of 10 classes, but the network has 3"),
        (three, "mackey-glass", "asks for one regression output, but the network has 3"),
    ]:
        run = save_run(tmp_path / data / str(net.config.output_size), net)
        assert main(["report", str(run), "--data", data]) == 2
        assert problem in capsys.readouterr().err
    assert main(["report", str(run), "--no-data", "--data", "mackey-glass"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_report_on_the_runs_own_data_set_named_measures_it_as_the_run_saw_it(tmp_path, capsys):
    # Mackey-Glass targets are standardised with the moments stored in the checkpoint: naming
    # the run's own data set must not measure raw targets against standardised predictions
    from delrec.config import preset

    train_config = preset("mackey-glass", "delrec")
    net = build_network(train_config.network_config(1, 1), seed=0)
    run = tmp_path / "run"
    save_checkpoint(
        {
            **network_payload(net),
            "train_config": train_config.to_dict(),
            "standardization": torch.tensor([0.9, 0.2], dtype=torch.float64),
        },
        run / "checkpoints" / "best.pt",
    )
    scores = []
    for named in ([], ["--data", "mackey-glass"]):
        assert main(["report", str(run), *named, "--max-batches", "1", "--batch-size", "16"]) == 0
        scores.append(next(line for line in capsys.readouterr().out.splitlines() if "nmse" in line))
    assert scores[0] == scores[1] and "nmse on 16 samples" in scores[0]


def test_report_scores_a_classifier_with_the_ema_readout_by_accuracy(tmp_path, capsys):
    net = build_network(NetworkConfig(1, (6,), 10, readout="ema"), seed=0)
    run = save_run(tmp_path, net)
    argv = ["report", str(run), "--data", "digits-8x8", "--max-batches", "1", "--batch-size", "8"]
    assert main(argv) == 0
    assert "accuracy on 8 samples" in capsys.readouterr().out


def _edited(edit):
    graph = to_nir(random_network("delrec"))
    edit(graph)
    return graph


@pytest.mark.parametrize(
    "edit,problem",
    [
        (  # a loop through both layers: refused, not followed forever
            lambda g: g.edges.__setitem__(
                g.edges.index(("layer1.lif", "readout")), ("layer1.lif", "layer0.synapses")
            ),
            "'layer0.lif' is reached again from 'layer1.lif'",
        ),
        (
            lambda g: setattr(g.nodes["input"], "input_type", {"input": np.array([99])}),
            r"from 'input' to 'layer0.lif' are \(8, 6\), but the nodes have 99 and 8",
        ),
        (
            lambda g: g.metadata.update(readout_reduction="bogus"),
            "readout_reduction 'bogus'",
        ),
        (
            lambda g: setattr(g.nodes["layer0.lif"], "tau", -g.nodes["layer0.lif"].tau),
            "layer0.lif: tau = -.* steps; a time constant must be positive",
        ),
        (
            lambda g: setattr(g.nodes["layer1.lif"], "v_threshold", np.full(10, np.nan)),
            "layer1.lif: v_threshold holds NaN or Inf",
        ),
        (  # per-neuron parameters of another length: were accepted as long as they agreed
            lambda g: setattr(g.nodes["layer1.lif"], "v_threshold", np.ones(3)),
            r"layer1.lif: v_threshold holds 3 values for the node's 10 neurons",
        ),
        (  # an Output node wider than the readout feeding it: the stream gave 3 values
            lambda g: g.nodes.update(output=nir.Output(output_type={"output": np.array([7])})),
            r"the Output node 'output' has 7 values, but the readout LI node 'readout.li'",
        ),
        (
            lambda g: setattr(g.nodes["layer0.synapses"], "bias", np.zeros(5)),
            "the synapses leaving 'input': bias must be",
        ),
        (
            lambda g: g.edges.append(("layer1.lif", "ghost")),
            "names a node 'ghost' it lacks",
        ),
        (  # an edge out of the Output node: was ignored, running another network
            lambda g: g.edges.append(("output", "layer0.lif")),
            r"the Output node 'output' feeds \['layer0.lif'\]",
        ),
        (  # a node feeding a layer but fed by nothing: its bias was ignored
            lambda g: (
                g.nodes.update(ghost=nir.Affine(weight=np.ones((8, 8)), bias=np.ones(8))),
                g.edges.append(("ghost", "layer0.lif")),
            ),
            r"nodes \['ghost'\] are not reached from the Input node 'input'",
        ),
        (
            lambda g: setattr(g.nodes["readout"], "weight", np.full((3, 10), "w")),
            "readout: weight holds values of type <U1, not numbers",
        ),
        (
            lambda g: setattr(g.nodes["layer1.recurrent.delay"], "delay", np.full(10, "d")),
            "layer1.recurrent.delay: delay holds values of type <U1, not numbers",
        ),
    ],
)
def test_importer_names_what_is_wrong_in_an_edited_graph(edit, problem):
    with pytest.raises(NIRImportError, match=problem):
        import_nir(_edited(edit))


def test_a_bias_on_a_recurrent_connection_is_added_every_step():
    """NIR adds an Affine's bias to the membrane's input at every step, whatever feeds it: a
    recurrent Affine's bias was read and then never added (the stream ran as without it)."""
    graph = to_nir(random_network("delrec"))
    plain = import_nir(graph)
    loop, synapses = graph.nodes["layer1.recurrent.weight"], graph.nodes["layer1.synapses"]
    bias = np.linspace(-0.5, 0.8, loop.weight.shape[0]).astype(loop.weight.dtype)
    graph.nodes["layer1.recurrent.weight"] = nir.Affine(weight=loop.weight, bias=bias)
    with_loop_bias = import_nir(graph)
    graph.nodes["layer1.recurrent.weight"] = loop  # the same current through the feedforward bias
    synapses.bias = synapses.bias + bias
    expected = import_nir(graph)
    x = spike_input(6)
    out, spikes = with_loop_bias.run(x)
    want_out, want_spikes = expected.run(x)
    assert all(torch.equal(a, b) for a, b in zip(spikes, want_spikes))
    assert torch.equal(out, want_out)
    assert not torch.equal(out, plain.run(x)[0])
    layer = with_loop_bias.layers[1]
    with pytest.raises(ValueError, match="the recurrent synapses have a bias"):
        StreamingLayer(
            layer.synapses,
            layer.neuron,
            DelayedSynapses(
                layer.recurrent.weight, layer.recurrent.lags, torch.ones(10, dtype=out.dtype)
            ),
        )


def test_a_source_or_dt_of_the_wrong_kind_is_named(tmp_path):
    """``dt=True`` ran as 1 s a step; a dict or None failed inside pathlib."""
    net = random_network("delrec")
    with pytest.raises(ValueError, match="dt must be a positive number of seconds .* got True"):
        to_nir(net, dt=True)
    graph = to_nir(net)
    graph.metadata["dt"] = True
    with pytest.raises(NIRImportError, match="dt = True is not a positive number of seconds"):
        import_nir(graph)
    for source in (None, {"nodes": {}}, 5):
        with pytest.raises(TypeError, match="import_nir takes the path of a NIR file or a nir"):
            import_nir(source)
    with pytest.raises(TypeError, match="export_nir writes to a file path, got NoneType"):
        export_nir(net, None)


def test_import_runs_weights_of_mixed_dtypes_in_one_dtype():
    """Another tool may store one node's weights in float64 and the rest in float32 (or in
    integers): every layer runs in the widest float dtype instead of failing at the first step."""
    graph = to_nir(random_network("delrec"))
    weights = [n for n in graph.nodes.values() if isinstance(n, (nir.Affine, nir.Linear))]
    for node in weights:  # values a float32 holds exactly
        node.weight = node.weight.astype(np.float32).astype(np.float64)
        if isinstance(node, nir.Affine):
            node.bias = node.bias.astype(np.float32).astype(np.float64)
    reference = import_nir(graph)
    for node in weights[:-1]:
        node.weight = node.weight.astype(np.float32)
    stream = import_nir(graph)
    assert {t.dtype for t in stream.buffers() if t.is_floating_point()} == {torch.float64}
    x = spike_input(6)
    out, spikes = stream.run(x)
    want_out, want_spikes = reference.run(x)
    assert all(torch.equal(a, b) for a, b in zip(spikes, want_spikes))
    assert torch.equal(out, want_out)
    for node in weights:
        node.weight = np.rint(node.weight * 4).astype(np.int8)
        if isinstance(node, nir.Affine):
            node.bias = node.bias.astype(np.float32)
    assert import_nir(graph).run(x.float())[0].dtype == torch.float32


def test_import_names_a_wrong_dt_and_a_folder(tmp_path):
    graph = to_nir(random_network("delrec"), dt=0.01)
    with pytest.raises(NIRImportError, match=r"^layer0.lif: r = .*, pass dt \(seconds per step\)"):
        import_nir(graph, dt=0.02)
    with pytest.raises(IsADirectoryError, match="is a folder; give the path of a NIR file"):
        import_nir(tmp_path)


def test_report_takes_a_target_by_name_and_refuses_no_batches():
    net = random_network("delrec")
    report = hardware_report(net, target="spinnaker")
    assert report["target"]["target"]["name"] == "spinnaker"
    loader = [(spike_input(6), torch.zeros(B, dtype=torch.long))]
    for max_batches in (0, -1):
        with pytest.raises(ValueError, match="max_batches must be >= 1"):
            hardware_report(net, loader, max_batches=max_batches)


def test_export_refuses_a_dt_that_overflows_and_a_file_in_the_way(tmp_path, capsys):
    net = build_network(NetworkConfig(1, (6,), 10, neuron={"reset": "hard"}), seed=0)
    run = save_run(tmp_path, net)
    assert main(["export", str(run), "--dt", "1e308", "-o", str(tmp_path / "big.nir")]) == 2
    assert "at most 1e+06" in capsys.readouterr().err and not (tmp_path / "big.nir").exists()
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(run), "-o", str(tmp_path / "afile" / "x.nir")]) == 2  # before work
    assert "afile is a file, not a folder" in capsys.readouterr().err
    assert main(["export", str(run), "-o", str(tmp_path / "new" / "sub" / "m.nir")]) == 0
    assert (tmp_path / "new" / "sub" / "m.nir").is_file()  # missing folders made, as elsewhere
    with pytest.raises(NIRImportError, match="dt = 'x' is not a positive number"):
        import_nir(to_nir(random_network("delrec")), dt="x")


def test_export_records_the_runs_standardisation_and_pixel_order(tmp_path, capsys):
    """A Mackey-Glass network takes and predicts ``(x - mean) / std``, a PS-MNIST one reads its
    pixels in the run's order: the export writes both into the graph's metadata and says so.
    The graph used to say nothing, and a chip fed the raw series predicted garbage."""
    import nir

    from delrec.config import TrainConfig, preset

    values = preset("mackey-glass", "delrec").to_dict()
    values["network"]["neuron"]["reset"] = "hard"
    train_config = TrainConfig.from_dict(values)
    net = build_network(train_config.network_config(1, 1), seed=0)
    run = tmp_path / "run"
    order = torch.randperm(5)
    save_checkpoint(
        {
            **network_payload(net),
            "train_config": train_config.to_dict(),
            "standardization": torch.tensor([0.9, 0.2], dtype=torch.float64),
            "data_permutation": order,
        },
        run / "checkpoints" / "best.pt",
    )
    out = tmp_path / "mg.nir"
    assert main(["export", str(run), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "(x - 0.9) / 0.2" in said and "input_order" in said
    metadata = nir.read(out).metadata
    assert list(metadata["input_standardization"]) == pytest.approx([0.9, 0.2])
    assert list(metadata["output_standardization"]) == pytest.approx([0.9, 0.2])
    assert [int(i) for i in metadata["input_order"]] == order.tolist()
    assert str(metadata["task"]) == "mackey-glass"
    with pytest.raises(ValueError, match="written by delrec itself"):
        to_nir(net, metadata={"dt": 2.0})


def test_parallel_branches_of_one_delay_add_up_and_of_two_delays_are_refused():
    """NIR sums parallel edges: two Linear branches from one source into one LIF import as
    their sum (they were refused as "two delays"); one synapse reached through branches of
    different delays is refused, naming the synapse and both delays."""
    net = random_network("snn")
    graph = to_nir(net)
    inputs = graph.nodes["layer0.synapses"].weight.shape[1]
    x = (torch.rand(12, 2, inputs) < 0.4).double()
    expected, spikes = import_nir(graph).run(x)
    half = graph.nodes["layer0.synapses"].weight / 2
    graph.nodes["layer0.synapses"].weight = half
    graph.nodes["layer0.again"] = nir.Linear(weight=half)
    graph.edges += [("input", "layer0.again"), ("layer0.again", "layer0.lif")]
    out, summed = import_nir(graph).run(x)
    assert torch.allclose(out, expected, atol=1e-9) and spikes[0].sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(summed, spikes))
    graph.nodes["layer0.later"] = nir.Delay(delay=np.full(inputs, 2.0))
    graph.edges.remove(("input", "layer0.again"))
    graph.edges += [("input", "layer0.later"), ("layer0.later", "layer0.again")]
    with pytest.raises(NIRImportError, match=r"two branches with different delays \(0 and 2"):
        import_nir(graph)


def test_a_graph_whose_output_is_spikes_is_refused_naming_the_readout_it_lacks():
    graph = to_nir(random_network("snn"))
    graph.edges = [e for e in graph.edges if e[0] not in ("readout", "readout.li")]
    graph.edges = [e for e in graph.edges if e[1] != "readout"]
    for name in ("readout", "readout.li"):
        graph.nodes.pop(name, None)
    graph.edges.append(("layer1.lif", "output"))
    with pytest.raises(NIRImportError, match="output is the spikes of LIF 'layer1.lif'"):
        import_nir(graph)
