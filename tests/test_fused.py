"""The fused network around the delays against the reference: feedforward LIF layers, the
leaky-integrator readout, BatchNorm over time and dropout masks, alone and in whole networks."""

import dataclasses
import math

import pytest
import torch
from engine_helpers import NEURONS, assert_close_relative
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from delrec.bench import saved_bytes
from delrec.engine import dropout as masks
from delrec.engine import fused, native
from delrec.layers.dropout import Dropout
from delrec.models import build_network, preset_network, set_feedforward_engine
from delrec.neurons import LIF, LeakyIntegrator, Surrogate
from delrec.training.objectives import make_objective

needs_kernels = pytest.mark.skipif(
    native.load("fused") is None,
    reason="the C++ kernels 'fused' are not built (a C++ compiler and ninja are needed)",
)


@dataclasses.dataclass(frozen=True)
class Sigmoid(Surrogate):
    """A surrogate the kernels don't know: its ψ' is precomputed from the saved membrane."""

    beta: float = 3.0

    def derivative(self, x):
        sig = torch.sigmoid(self.beta * x)
        return self.beta * sig * (1 - sig)


def grads_of(output, inputs, grad_out):
    return torch.autograd.grad((output * grad_out).sum(), inputs)


# --------------------------------------------------------------------------- masks
def test_philox_matches_the_published_known_answers():
    # Random123's known-answer vectors for Philox4x32-10: (counter, key) -> four words
    vectors = [
        ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            0x299F31D0A4093822,
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in vectors:
        words = masks.philox(tuple(torch.tensor([c]) for c in counter), key)
        assert tuple(int(w) for w in words) == expected


@needs_kernels
@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 150)),
    key=st.integers(0, 2**63 - 1),
    keep=st.floats(0.05, 0.99),
    offset=st.integers(0, 2**31),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_the_kernel_draws_the_masks_that_the_pytorch_ops_draw(shape, key, keep, offset, dtype):
    draw = masks.MaskDraw(key, keep, offset)
    expected = masks.reference_mask(shape, draw, dtype)
    assert torch.equal(fused.dropout_mask(shape, draw, dtype), expected)
    x = torch.randn(shape, dtype=dtype)
    assert torch.equal(fused.apply_dropout(x, draw), x * expected)


def test_masks_keep_the_asked_share_and_scale_by_one_over_keep():
    draw = masks.MaskDraw(key=12345, keep=0.6)
    values = fused.dropout_mask((50, 64, 100), draw)
    kept = values.ne(0).double().mean().item()
    assert abs(kept - 0.6) < 5 * math.sqrt(0.6 * 0.4 / values.numel())
    assert set(values.unique().tolist()) == {0.0, float(torch.tensor(1.0) / 0.6)}
    # consecutive neurons, samples and steps are not correlated
    bits = values.ne(0).double() - 0.6
    for dim in range(3):
        near = (bits * bits.roll(1, dim)).mean().item() / 0.24
        assert abs(near) < 0.01, dim


def test_a_shard_of_the_batch_draws_its_rows_of_the_whole_batch_mask():
    whole = fused.dropout_mask((4, 10, 9), masks.MaskDraw(5, 0.5, 0))
    assert torch.equal(fused.dropout_mask((4, 3, 9), masks.MaskDraw(5, 0.5, 4)), whole[:, 4:7])
    assert not torch.equal(fused.dropout_mask((4, 10, 9), masks.MaskDraw(6, 0.5, 0)), whole)


def test_keys_come_from_the_global_generator():
    torch.manual_seed(3)
    first = [masks.draw(0.2).key for _ in range(3)]
    torch.manual_seed(3)
    assert [masks.draw(0.2).key for _ in range(3)] == first and len(set(first)) == 3
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        masks.draw(1.0)


@pytest.mark.parametrize("engine", fused.ENGINES)
def test_dropout_module(engine):
    layer = Dropout(0.3)
    layer.engine = engine
    x = torch.randn(6, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    y = layer(x)
    torch.manual_seed(0)
    mask = masks.reference_mask(x.shape, masks.draw(0.3), x.dtype)
    assert torch.equal(y, x * mask)
    (grad,) = grads_of(y, [x], torch.ones_like(x))
    assert torch.equal(grad, mask)
    assert layer.eval()(x) is x and Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="probability"):
        Dropout(1.0)


# --------------------------------------------------------------------------- LIF layer
def with_masks(current, mask_in, mask_out):
    """The reference of a LIF layer with dropout: masks materialised, autograd multiplies."""

    def mask(draw):
        return masks.reference_mask(current.shape, draw, current.dtype)

    def run(neuron, x):
        spikes = neuron(x if mask_in is None else x * mask(mask_in))
        return spikes if mask_out is None else spikes * mask(mask_out)

    return run


@needs_kernels
@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    steps=st.integers(1, 20),
    batch=st.integers(1, 4),
    size=st.integers(1, 70),
    neuron=NEURONS,
    other_surrogate=st.booleans(),
    dropout_in=st.booleans(),
    dropout_out=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_lif_layer_matches_the_autograd_loop(
    steps, batch, size, neuron, other_surrogate, dropout_in, dropout_out, seed
):
    if other_surrogate:
        neuron.p = dataclasses.replace(neuron.p, surrogate=Sigmoid())
    g = torch.Generator().manual_seed(seed)
    current = torch.randn(steps, batch, size, generator=g, dtype=torch.float64) * 0.8 + 0.5
    grad_out = torch.randn(steps, batch, size, generator=g, dtype=torch.float64)
    mask_in = masks.MaskDraw(seed, 0.7) if dropout_in else None
    mask_out = masks.MaskDraw(seed + 1, 0.6) if dropout_out else None

    x = current.clone().requires_grad_()
    expected = with_masks(current, mask_in, mask_out)(neuron, x)
    (expected_grad,) = grads_of(expected, [x], grad_out)
    x = current.clone().requires_grad_()
    spikes = fused.lif_layer(x, neuron.p, mask_in, mask_out)
    assert torch.equal(spikes, expected)
    assert_close_relative(grads_of(spikes, [x], grad_out)[0], expected_grad)


@needs_kernels
@pytest.mark.parametrize("reset", [0.0, None])
def test_fused_lif_layer_in_float32_at_training_size(reset):
    g = torch.Generator().manual_seed(1)
    neuron = LIF(tau=2.0, v_reset=reset, detach_reset=reset is not None)
    current = torch.randn(60, 32, 100, generator=g) * 0.8 + 0.5
    grad_out = torch.randn(60, 32, 100, generator=g)
    draw = masks.MaskDraw(9, 0.8)
    x64 = current.double().requires_grad_()
    exact = with_masks(x64, None, draw)(neuron, x64)
    (exact_grad,) = grads_of(exact, [x64], grad_out.double())
    x = current.clone().requires_grad_()
    spikes = fused.lif_layer(x, neuron.p, None, draw)
    reference = with_masks(current, None, draw)(neuron, current)
    assert torch.equal(spikes, reference)
    assert 0.05 < spikes.ne(0).float().mean() < 0.95
    assert torch.equal(spikes.double(), exact)  # no threshold tie in this draw
    assert_close_relative(grads_of(spikes, [x], grad_out)[0].double(), exact_grad, rtol=1e-5)


@needs_kernels
def test_fused_lif_layer_saves_only_the_membrane():
    current = torch.randn(10, 3, 8, requires_grad=True)
    neuron = LIF()
    saved = saved_bytes(lambda: fused.lif_layer(current, neuron.p, masks.MaskDraw(1, 0.5)))
    assert saved == current.numel() * current.element_size()
    assert saved_bytes(lambda: fused.apply_dropout(current, masks.MaskDraw(1, 0.5))) == 0


# --------------------------------------------------------------------------- readout, norm
@needs_kernels
@pytest.mark.parametrize("decay_input", [False, True])
@pytest.mark.parametrize("tau", [1.05, 20.0])
def test_fused_leaky_integrator_matches_the_module(decay_input, tau):
    g = torch.Generator().manual_seed(2)
    current = torch.randn(30, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(30, 5, 7, generator=g, dtype=torch.float64)
    expected = LeakyIntegrator(tau, decay_input)(current)
    out = fused.integrate(current, tau, decay_input)
    assert_close_relative(out.detach(), expected.detach(), rtol=1e-12)
    assert_close_relative(
        grads_of(out, [current], grad_out)[0], grads_of(expected, [current], grad_out)[0]
    )


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("with_shift", [False, True])
def test_fused_batch_norm_matches_the_module(dtype, momentum, with_shift):
    g = torch.Generator().manual_seed(4)
    current = (torch.randn(20, 9, 6, generator=g, dtype=dtype) * 3 + 2).requires_grad_()
    grad_out = torch.randn(20, 9, 6, generator=g, dtype=dtype)
    shift = (torch.randn(6, generator=g, dtype=dtype) * 5).requires_grad_()
    modules = [nn.BatchNorm1d(6, momentum=momentum).to(dtype) for _ in range(2)]
    with torch.no_grad():
        modules[0].weight.uniform_(0.5, 1.5, generator=g)
        modules[0].bias.uniform_(-1, 1, generator=g)
    modules[1].load_state_dict(modules[0].state_dict())
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for _ in range(2):  # twice: the running statistics' second update
        shifted = current + shift if with_shift else current
        expected = modules[0](shifted.flatten(0, 1)).view_as(current)
        out = fused.batch_norm(current, modules[1], shift if with_shift else None)
        assert_close_relative(out.detach(), expected.detach(), rtol)
        inputs = [[current, *([shift] if with_shift else []), m.weight, m.bias] for m in modules]
        grads = zip(grads_of(out, inputs[1], grad_out), grads_of(expected, inputs[0], grad_out))
        for a, e in grads:  # the shift's gradient is zero, known to rounding
            torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * float(grad_out.abs().sum()))
        for name, buffer in modules[0].named_buffers():
            assert_close_relative(getattr(modules[1], name), buffer, rtol)
    modules[1].eval()
    out = fused.batch_norm(current, modules[1], shift if with_shift else None)
    expected = modules[1](shifted.flatten(0, 1)).view_as(current)
    assert torch.equal(out, expected)
    assert fused.fusable_norm(modules[1]) and not fused.fusable_norm(None)


# --------------------------------------------------------------------------- whole networks
NETWORKS = {  # small versions of the presets: every block kind and every readout
    "shd": dict(hidden_sizes=(12, 10)),  # bn block, lif readout, hard reset, ATan
    "ssc": dict(hidden_sizes=(9, 9, 11)),  # dropout block, sum readout, soft reset, Triangle
    "mackey-glass": dict(hidden_sizes=(13,)),  # dropout block, ema readout
    "psmnist": dict(hidden_sizes=(6, 8, 8), readout="ema"),
}


def network_pair(task, model, dtype):
    config = preset_network(task, model, **NETWORKS[task])
    pair = [build_network(config, seed=5).to(dtype) for _ in range(2)]
    set_feedforward_engine(pair[1], "reference")
    return config, pair


def train_step(network, objective, frames, lengths, targets):
    """Readout, spikes and every parameter's gradient of one training step (seeded masks)."""
    torch.manual_seed(11)
    output, spikes = network.forward_with_spikes(frames)
    loss, _ = objective(output, lengths, targets)
    names = [n for n, p in network.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for n, p in network.named_parameters() if n in names])
    return output, spikes, dict(zip(names, grads))


@needs_kernels
@pytest.mark.parametrize("model", ["delrec", "rsnn", "snn"])
@pytest.mark.parametrize("task", list(NETWORKS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_network_trains_like_the_reference(task, model, dtype):
    config, (fused_net, reference_net) = network_pair(task, model, dtype)
    g = torch.Generator().manual_seed(7)
    steps, batch = 25, 6
    lengths = torch.tensor([25, 7, 19, 25, 1, 12])  # variable lengths, zero-padded
    frames = torch.rand(steps, batch, config.input_size, generator=g, dtype=dtype) * 2
    frames *= (torch.arange(steps).view(-1, 1) < lengths).unsqueeze(-1)
    task_kind = "regression" if task == "mackey-glass" else "classification"
    objective = make_objective(task_kind, config.readout)
    targets = (
        torch.randn(batch, generator=g, dtype=dtype)
        if task_kind == "regression"
        else torch.randint(config.output_size, (batch,), generator=g)
    )
    out, spikes, grads = train_step(fused_net, objective, frames, lengths, targets)
    ref_out, ref_spikes, ref_grads = train_step(reference_net, objective, frames, lengths, targets)
    assert any(s.ne(0).any() for s in spikes)
    for s, r in zip(spikes, ref_spikes):
        assert torch.equal(s, r)
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    assert_close_relative(out.detach(), ref_out.detach(), rtol)
    assert grads.keys() == ref_grads.keys()
    # a bias in front of BatchNorm has a zero gradient, known to rounding: held to the scale
    # of the network's gradients
    floor = 1e-2 * max(float(g.abs().max()) for g in ref_grads.values())
    for name, grad in grads.items():
        expected = ref_grads[name]
        atol = rtol * max(float(expected.abs().max()), floor)
        torch.testing.assert_close(grad, expected, rtol=rtol, atol=atol, msg=name)
    for a, b in zip(fused_net.buffers(), reference_net.buffers()):
        assert_close_relative(a, b, rtol)


@needs_kernels
@pytest.mark.parametrize("shape", [(10, 0), (1, 1)], ids=["empty batch", "one frame"])
def test_fused_network_answers_like_the_reference_without_statistics(shape):
    config, networks = network_pair("shd", "snn", torch.float32)
    frames = torch.rand(*shape, config.input_size)
    answers = []
    for network in networks:
        try:
            answers.append(network(frames).shape)
        except ValueError as error:  # BatchNorm over a single frame
            answers.append(str(error))
    assert answers[0] == answers[1]
    assert all(torch.equal(a, b) for a, b in zip(networks[0].buffers(), networks[1].buffers()))


@needs_kernels
def test_the_switch_chooses_the_path():
    config, (fused_net, reference_net) = network_pair("shd", "delrec", torch.float32)
    x = torch.rand(5, 2, config.input_size)
    assert type(fused_net(x).grad_fn).__name__ == "_IntegratorBackward"
    assert type(reference_net(x).grad_fn).__name__ != "_IntegratorBackward"
    with pytest.raises(ValueError, match="feedforward engine"):
        set_feedforward_engine(fused_net, "fast")
    assert all(m.engine == "reference" for m in reference_net.blocks)
    assert reference_net.blocks[1].neurons.engine == "auto"  # the recurrent layer's own option


@needs_kernels
def test_without_the_kernels_the_reference_runs_with_the_same_masks(monkeypatch):
    config, (network, _) = network_pair("ssc", "snn", torch.float64)
    frames = torch.rand(12, 3, config.input_size, dtype=torch.float64)
    torch.manual_seed(0)
    expected = network(frames)
    monkeypatch.setenv("DELREC_NATIVE", "0")  # masks drawn by PyTorch ops, autograd loops
    torch.manual_seed(0)
    assert torch.equal(network(frames), expected)
    with pytest.raises(RuntimeError, match="reference"):
        fused.lif_layer(frames, LIF().p)
