"""Feedforward delays and the network builders (presets, ablation family, parameter counts)."""

import dataclasses

import pytest
import torch

from delrec.engine import dropout, fused
from delrec.layers import DelRec, FeedforwardDelay, clamp_delays
from delrec.models import (
    MODELS,
    NetworkConfig,
    NetworkState,
    NeuronConfig,
    build_network,
    count_parameters,
    hooked,
    preset_network,
    readout_reduce,
    set_feedforward_engine,
)
from delrec.neurons import LIF


def test_feedforward_delay_shifts_by_integer_positions_and_is_causal():
    layer = FeedforwardDelay(2, 3, kernel_size=8, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
        layer.position.copy_(torch.tensor([[3.0, 0.0], [0.0, 7.0], [0.0, 5.0]]))
    x = torch.zeros(20, 1, 2, dtype=torch.float64)
    x[2, 0, 0] = 1.0
    x[4, 0, 1] = 1.0
    y = layer(x)[:, 0]
    assert y[:, 0].nonzero().flatten().tolist() == [5]
    assert y[:, 1].nonzero().flatten().tolist() == [11] and y[11, 1] == 2.0
    assert y[:, 2].nonzero().flatten().tolist() == [2, 9]


def test_feedforward_delay_interpolates_rounds_in_eval_and_clamps():
    layer = FeedforwardDelay(1, 1, kernel_size=6, bias=False).double()
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.position.fill_(2.25)
    x = torch.zeros(10, 1, 1, dtype=torch.float64)
    x[0] = 1.0
    assert layer(x)[:4, 0, 0].tolist() == pytest.approx([0, 0, 0.75, 0.25])
    assert layer.eval()(x)[:4, 0, 0].tolist() == [0, 0, 1.0, 0]
    assert layer.position.item() == 2.25  # eval did not round the parameter
    with torch.no_grad():
        layer.position.fill_(9.0)
    clamp_delays(layer)
    assert layer.position.item() == 5.0


def test_feedforward_delay_gradients_by_finite_differences():
    torch.manual_seed(0)
    layer = FeedforwardDelay(3, 2, kernel_size=5).double()
    x = torch.rand(9, 2, 3, dtype=torch.float64)
    names = ["weight", "position", "bias"]
    values = [getattr(layer, n).detach().clone().requires_grad_() for n in names]
    torch.autograd.gradcheck(
        lambda *v: torch.func.functional_call(layer, dict(zip(names, v)), (x,)), values
    )


@pytest.mark.parametrize(
    "task,expected", [("shd", 173_844), ("ssc", 374_819), ("psmnist", 156_154)]
)
def test_delrec_parameter_counts_match_the_paper(task, expected):
    assert count_parameters(build_network(preset_network(task), seed=0)) == expected


def test_ablation_family_changes_exactly_the_recurrent_positions():
    kinds = {}
    for model in MODELS:
        net = build_network(preset_network("shd", model), seed=0)
        first, second = net.blocks
        assert isinstance(first.neurons, LIF) and isinstance(first.synapses, torch.nn.Linear)
        kinds[model] = (type(second.synapses).__name__, type(second.neurons).__name__)
    assert kinds["snn"] == ("Linear", "LIF")
    assert kinds["ffdelay"] == ("FeedforwardDelay", "LIF")
    assert kinds["ff+rec"] == ("FeedforwardDelay", "DelRec")
    for model in ("rsnn", "fixed", "delrec", "delrec-shared"):
        assert kinds[model] == ("Linear", "DelRec")
    fixed = build_network(preset_network("shd", "fixed"), seed=0).blocks[1].neurons
    assert not fixed.delay.requires_grad and torch.equal(fixed.delay, fixed.delay.round())
    assert 10 <= fixed.delay.min() and fixed.delay.max() <= 30


def test_presets_encode_the_paper_settings():
    shd = build_network(preset_network("shd"), seed=0)
    rec = shd.blocks[1].neurons
    assert rec.neuron.p.tau == 1.05 and rec.neuron.p.v_reset == 0.0 and rec.neuron.p.detach_reset
    assert rec.recurrent_dropout == 0.2 and shd.blocks[1].norm is not None
    assert 10 <= rec.delay.min() and rec.delay.max() <= 30
    fan_in_bound = (6 / 140) ** 0.5
    assert shd.blocks[0].synapses.weight.abs().max() <= fan_in_bound
    assert shd.blocks[0].synapses.weight.abs().max() > 0.9 * fan_in_bound
    w = rec.weight.detach()
    assert torch.allclose(w @ w.T, torch.eye(256), atol=1e-4)  # orthogonal init
    ssc = build_network(preset_network("ssc"), seed=0)
    assert all(
        isinstance(b.neurons, DelRec)
        and b.neurons.spread_logits is not None
        and b.neurons.neuron.p.soft_reset
        for b in ssc.blocks
    )
    mg = build_network(preset_network("mackey-glass"), seed=0)
    assert mg.config.hidden_sizes == (128,) and mg.readout_neuron.decay_input
    assert mg.readout_neuron.tau == 20.0 and mg.readout.bias is None


def test_same_seed_same_network_and_forward_shapes():
    cfg = preset_network("ssc", hidden_sizes=(16, 16, 16))
    a, b = build_network(cfg, seed=3), build_network(cfg, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    out, spikes = a.forward_with_spikes(torch.rand(12, 2, 140))
    assert out.shape == (12, 2, 35) and [s.shape for s in spikes] == [(12, 2, 16)] * 3
    assert readout_reduce(out, "sum").shape == (2, 35)
    probs = readout_reduce(torch.randn(12, 2, 35), "lif")
    assert torch.allclose(probs.sum(-1), torch.full((2,), 12.0))


@pytest.mark.parametrize("readout", ["lif", "sum", "ema"])
def test_a_sample_scores_the_same_alone_and_padded_in_a_batch(readout):
    # the padding after a sample's true length must not count in its scores or loss gradient
    cfg = NetworkConfig(4, (8, 8), 3, block="bn", readout=readout, recurrent_layers=(1,))
    net = build_network(cfg, seed=0).double().eval()
    sample = torch.rand(10, 1, 4, dtype=torch.float64)
    padded = torch.cat([sample, torch.zeros(20, 1, 4, dtype=torch.float64)])
    other = torch.rand(30, 1, 4, dtype=torch.float64)  # a longer neighbour in the batch
    alone = readout_reduce(net(sample), readout, torch.tensor([10]))
    output = net(torch.cat([padded, other], dim=1)).detach().requires_grad_()
    batched = readout_reduce(output, readout, torch.tensor([10, 30]))
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-12, atol=1e-12)
    for dtype in (torch.uint8, torch.uint16, torch.int16, torch.int32):  # any integer type
        lengths = torch.tensor([10, 30], dtype=dtype)
        assert torch.equal(readout_reduce(output, readout, lengths), batched)
    assert not torch.allclose(batched[0], readout_reduce(output, readout)[0])  # padding counts
    batched[0].sum().backward()
    assert output.grad[10:, 0].abs().max() == 0 and output.grad[:10, 0].abs().max() > 0


def test_the_sum_readout_sums_each_sample_over_its_true_steps():
    out = torch.randn(9, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lengths = torch.tensor([9, 1, 5, 8])
    scores = readout_reduce(out, "sum", lengths)
    assert scores.shape == (4, 3)
    for b, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(scores[b], out[:length, b].sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(readout_reduce(out, "sum"), out.sum(0), rtol=1e-12, atol=1e-12)


def test_bad_lengths_get_clear_errors():
    output = torch.randn(10, 2, 3)
    for lengths, problem in [
        (torch.tensor([10]), r"shape \(1,\).*\(2,\)"),
        (torch.tensor([10.0, 5.0]), "integers"),
        (torch.tensor([0, 5]), r"\[1, 10\]"),
        (torch.tensor([11, 5]), r"\[1, 10\]"),
    ]:
        for readout in ("lif", "ema"):
            with pytest.raises(ValueError, match=problem):
                readout_reduce(output, readout, lengths)


def test_bad_network_configs_get_clear_errors():
    with pytest.raises(ValueError, match="unknown model"):
        preset_network("shd", "transformer")
    with pytest.raises(ValueError, match="unknown task"):
        preset_network("cifar")
    with pytest.raises(ValueError, match="recurrent_layers"):
        NetworkConfig(4, (8,), 2, recurrent_layers=(3,))
    with pytest.raises(ValueError, match="dropout"):
        dataclasses.replace(preset_network("ssc"), dropout=1.5)
    net = build_network(preset_network("ssc", hidden_sizes=(8, 8, 8)))
    with pytest.raises(ValueError, match=r"\(T, B, 140\)"):
        net(torch.zeros(2, 140))


@pytest.mark.parametrize("init", ["uniform-sqrt6", "torch"])
def test_feedforward_init_sets_every_feedforward_weight_delay_synapses_too(init):
    cfg = NetworkConfig(
        input_size=400, hidden_sizes=(300,), output_size=3, model="ffdelay", feedforward_init=init
    )
    network = build_network(cfg, seed=0)
    synapses, readout = network.blocks[0].synapses, network.readout
    assert isinstance(synapses, FeedforwardDelay)
    for weight, fan_in in ((synapses.weight, 400), (readout.weight, 300)):
        bound = (6 / fan_in) ** 0.5 if init == "uniform-sqrt6" else fan_in**-0.5
        assert 0.98 * bound < float(weight.detach().abs().max()) <= bound  # 120,000 draws
    with pytest.raises(ValueError, match="feedforward_init must be one of uniform-sqrt6, torch"):
        NetworkConfig(input_size=2, hidden_sizes=(2,), output_size=2, feedforward_init="he")


# --------------------------------------------------------------------------- refused inputs
@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
@pytest.mark.parametrize("surrogate", ["triangle", "atan"])
def test_a_bad_surrogate_scale_in_the_neuron_config_is_named(surrogate, scale):
    neuron = NeuronConfig(surrogate=surrogate, surrogate_scale=scale)
    with pytest.raises(ValueError, match="neuron surrogate_scale: .* must be a finite number > 0"):
        neuron.build()
    with pytest.raises(ValueError, match="unknown surrogate 'relu'"):  # not a scale's fault
        NeuronConfig(surrogate="relu").build()


def small_network(engine: str):
    cfg = NetworkConfig(3, (8, 8), 2, block="dropout", dropout=0.3, readout="lif")
    net = build_network(cfg, seed=0).double()
    set_feedforward_engine(net, engine)
    return net


@pytest.mark.parametrize("engine", ["fused", "reference"])
def test_network_states_of_another_kind_or_not_finite_are_refused(engine):
    net = small_network(engine).eval()
    x = torch.rand(5, 2, 3, dtype=torch.float64)
    _, state = net(x, return_state=True)
    with pytest.raises(TypeError, match="state must be the NetworkState this network returned"):
        net(x, tuple(state))
    nan = NetworkState(state.blocks, (torch.full_like(state.readout[0], float("nan")),))
    with pytest.raises(ValueError, match="the state of the readout holds NaN or Inf"):
        net(x, nan)


def test_double_backward_through_the_fused_network_names_the_reference():
    """The fused loops have hand-written first derivatives: create_graph=True is refused with
    the settings that compute second derivatives (it crashed or went silently wrong)."""
    x = torch.rand(6, 2, 3, dtype=torch.float64, requires_grad=True)
    net = small_network("fused")
    for block in net.blocks:
        block.neurons.engine = "reference"
    with pytest.raises(RuntimeError, match="set_feedforward_engine\\(network, 'reference'\\)"):
        torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
    net = small_network("reference")
    for block in net.blocks:
        block.neurons.engine = "reference"
    (grad,) = torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
    assert grad.requires_grad  # a second derivative exists


def test_fused_dropout_has_exact_second_derivatives():
    """x ⊙ m is linear: its backward is the same fused loop again, differentiable any number of
    times."""
    x = torch.rand(5, 2, 3, dtype=torch.float64, requires_grad=True)
    draw = dropout.draw(0.5)
    assert torch.autograd.gradgradcheck(lambda x: fused.dropped(x, draw), (x,))


@pytest.mark.parametrize("delay_type", ["axonal", "synaptic"])
@pytest.mark.parametrize("task", ["shd", "psmnist", "mackey-glass"])
def test_weight_count_is_the_weights_delays_and_positions_a_network_holds(task, delay_type):
    """The memory check's count from the sizes alone: the synaptic matrices of every model (the
    tensors with a dimension of more than one neuron), exactly."""
    for model in MODELS:
        config = dataclasses.replace(preset_network(task, model), delay_type=delay_type)
        net = build_network(config, seed=0)
        tensors = [*net.parameters(), *net.buffers()]
        matrices = sum(t.numel() for t in tensors if t.dim() == 2)
        assert config.weight_count() == matrices, model


class _OwnModel(torch.nn.Module):
    """A model of one's own around the layers: Linear → DelRec → FeedforwardDelay → sum."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(5, 8)
        self.delays = DelRec(8, delay_init="uniform:0:4")
        self.feedforward = FeedforwardDelay(8, 3, kernel_size=5, max_delay=4)

    def forward(self, x):
        return self.feedforward(self.delays(torch.tanh(self.linear(x)) * 3)).sum(0)


@pytest.mark.parametrize("model", ["preset", "own"])
def test_torch_compile_runs_the_engines_as_they_are(model):
    """torch.compile leaves the layers' forwards and the fused loops to run as they are (a
    graph break each): same outputs and gradients as eager, and no warning from the compiler
    trying to trace into the kernels (it used to warn at every kernel call)."""
    import warnings

    torch.manual_seed(0)
    if model == "preset":
        net = build_network(preset_network("shd", "delrec", hidden_sizes=[16, 16]), seed=0)
        x = (torch.rand(12, 3, net.config.input_size) < 0.1).float()
    else:
        net, x = _OwnModel(), torch.randn(12, 3, 5)
    net.train()
    torch.manual_seed(1)
    eager = net(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(1)
        compiled = torch.compile(net, backend="eager")(x)
        compiled.sum().backward()
    assert torch.equal(compiled, eager)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))
    assert [str(w.message) for w in caught if "Dynamo" in str(w.message)] == []


@pytest.mark.parametrize("task", ["shd", "ssc"])  # BatchNorm blocks, dropout-first blocks
def test_hooks_on_a_networks_modules_run_on_the_fused_path_too(task):
    """The fused loops call no module: a block whose modules carry hooks (an ablation, an
    activation recorder, torch.nn.utils.prune) runs its modules, with the reference numbers
    (the hooks were skipped: the ablation did nothing, pruning used a stale weight)."""
    torch.manual_seed(0)
    config = preset_network(task, "delrec", hidden_sizes=[12, 12])
    net = build_network(config, seed=0).double().eval()
    x = (torch.rand(15, 3, net.config.input_size, dtype=torch.float64) < 0.5).double() * 4
    plain = net(x)
    assert net.forward_with_spikes(x)[1][0].any()  # the first layer fires: ablating it shows
    recorded = []

    def ablate(module, inputs, output):
        recorded.append(type(module).__name__)
        return torch.zeros_like(output)

    handle = net.blocks[0].neurons.register_forward_hook(ablate)
    last = net.readout_neuron or net.readout
    reader = last.register_forward_hook(lambda m, i, o: recorded.append("readout"))
    fused_out = net(x)
    set_feedforward_engine(net, "reference")
    reference_out = net(x)
    set_feedforward_engine(net, "fused")
    assert torch.equal(fused_out, reference_out) and not torch.equal(fused_out, plain)
    assert recorded == [type(net.blocks[0].neurons).__name__, "readout"] * 2
    handle.remove()
    reader.remove()
    assert torch.equal(net(x), plain)
    delrec = next(m for m in net.modules() if isinstance(m, DelRec))
    delrec.register_forward_pre_hook(lambda m, i: None)  # called as a module either way
    assert not hooked(net.blocks)  # the block keeps its fused loops

    from torch.nn.utils import prune

    pruned = build_network(config, seed=0).double().eval()
    prune.l1_unstructured(pruned.blocks[1].synapses, "weight", amount=0.5)
    pruned.load_state_dict(
        {
            **pruned.state_dict(),
            "blocks.1.synapses.weight_orig": net.blocks[1].synapses.weight.detach() * 2,
        }
    )
    expected = build_network(config, seed=0).double().eval()
    expected.load_state_dict(net.state_dict())
    with torch.no_grad():
        expected.blocks[1].synapses.weight.copy_(
            2 * net.blocks[1].synapses.weight * pruned.blocks[1].synapses.weight_mask
        )
    assert torch.allclose(pruned(x), expected(x), rtol=0, atol=1e-12)


def test_a_network_under_autocast_runs_in_its_dtype():
    """bfloat16 autocast: the fused loops run float32 and float64 only (they raised "not
    implemented for 'BFloat16'"); the network runs in its parameters' dtype, as without."""
    torch.manual_seed(0)
    net = build_network(preset_network("shd", "delrec", hidden_sizes=[12, 12]), seed=0).eval()
    x = (torch.rand(15, 3, net.config.input_size) < 0.2).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = net(x)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, net(x))
    with pytest.raises(TypeError, match="runs in float32 or float64 .* not torch.float16"):
        net.half()(x.half())
