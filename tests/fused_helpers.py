"""The fused network engine against the reference: what tests/test_fused.py (the C++ kernels)
and tests/test_triton_fused.py (the Triton kernels) share. Every helper runs on any device."""

import dataclasses

import torch
from engine_harness import (
    Expected,
    RecordingLIF,
    assert_close_relative,
    assert_grad_close,
    compare,
)
from torch import nn

from delrec.engine import dropout as masks
from delrec.engine import fused
from delrec.models import build_network, preset_network, set_feedforward_engine
from delrec.neurons import Surrogate
from delrec.training.objectives import make_objective


@dataclasses.dataclass(frozen=True)
class Sigmoid(Surrogate):
    """A surrogate the kernels don't know: its ψ' is precomputed from the saved membrane."""

    beta: float = 3.0

    def derivative(self, x):
        sig = torch.sigmoid(self.beta * x)
        return self.beta * sig * (1 - sig)


def grads_of(output, inputs, grad_out):
    return torch.autograd.grad((output * grad_out).sum(), inputs)


def reference_layer(neuron, x, mask_in=None, mask_out=None):
    """The reference of a LIF layer with dropout: masks of the PyTorch ops, autograd loop."""

    def mask(draw):
        return masks.reference_mask(x.shape, draw, x.dtype, x.device)

    spikes = neuron(x if mask_in is None else x * mask(mask_in))
    return spikes if mask_out is None else spikes * mask(mask_out)


def assert_lif_layer_like_the_loop(
    shape, neuron, other_surrogate, dropout_in, dropout_out, seed, device="cpu"
):
    """:func:`fused.lif_layer` in float64 against its autograd loop (:func:`reference_layer`)
    through the engine harness: same spikes, the input gradient entry by entry within 1e-9.
    ``other_surrogate``: a surrogate the kernels don't know (:class:`Sigmoid`) in place of the
    neuron's; masks on the input and on the output (the latter with a batch offset)."""
    if other_surrogate:
        neuron.p = dataclasses.replace(neuron.p, surrogate=Sigmoid())
    g = torch.Generator().manual_seed(seed)
    current = torch.randn(shape, generator=g, dtype=torch.float64) * 0.8 + 0.5
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    current = current.to(device)
    mask_in = masks.MaskDraw(seed, 0.7) if dropout_in else None
    mask_out = masks.MaskDraw(seed + 1, 0.6, batch_offset=seed) if dropout_out else None

    def reference(current):
        recording = RecordingLIF(neuron.p)  # records the pre-spike membrane (threshold ties)
        spikes = reference_layer(recording, current, mask_in, mask_out)
        return spikes, torch.stack(recording.membrane)

    inputs = {"current": current.clone().requires_grad_()}
    expected = Expected(reference, inputs, grad_out, neuron.p.v_threshold)
    compare(lambda current: fused.lif_layer(current, neuron.p, mask_in, mask_out), expected)


# the shift's gradient, per channel, within this share of Σ over the T·B frames of |∂L/∂c|:
# the sum's rounding (measured on the CPU ≤ 2e-16 in float64, ≤ 2e-7 in float32, room left for
# the GPU's float32 reductions; a backward without the -mean(g) term is off by 3e-2 and more)
SHIFT_RTOL = {torch.float64: 1e-12, torch.float32: 1e-4}


def assert_batch_norm_like_the_module(shape, dtype, momentum, with_shift, device="cpu"):
    """:func:`fused.batch_norm` against ``nn.BatchNorm1d`` on ``(T, B, N)`` frames of ``shape``:
    output, the gradients of the input, γ and β entry by entry (:func:`assert_grad_close`), the
    shift's per channel (:data:`SHIFT_RTOL`), and the running statistics over two updates; in
    eval mode, the module's own output."""
    g = torch.Generator().manual_seed(4)
    n = shape[-1]
    current = torch.randn(shape, generator=g, dtype=dtype) * 3 + 2
    grad_out = torch.randn(shape, generator=g, dtype=dtype).to(device)
    shift = (torch.randn(n, generator=g, dtype=dtype) * 5).to(device).requires_grad_()
    current = current.to(device).requires_grad_()
    modules = [nn.BatchNorm1d(n, momentum=momentum).to(dtype) for _ in range(2)]
    with torch.no_grad():
        modules[0].weight.uniform_(0.5, 1.5, generator=g)
        modules[0].bias.uniform_(-1, 1, generator=g)
    modules[1].load_state_dict(modules[0].state_dict())
    modules = [m.to(device) for m in modules]
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for _ in range(2):  # twice: the running statistics' second update
        shifted = current + shift if with_shift else current
        expected = modules[0](shifted.flatten(0, 1)).view_as(current)
        out = fused.batch_norm(current, modules[1], shift if with_shift else None)
        assert_close_relative(out.detach(), expected.detach(), rtol)
        inputs = [[current, m.weight, m.bias, *([shift] if with_shift else [])] for m in modules]
        grads = grads_of(out, inputs[1], grad_out)
        reference_grads = grads_of(expected, inputs[0], grad_out)
        for name, a, e in zip(("input", "weight", "bias"), grads, reference_grads):
            assert_grad_close(name, a, e)
        if with_shift:  # Σ over the T·B frames of the input's gradient: zero up to rounding
            terms = reference_grads[0].flatten(0, 1).abs().sum(0)
            error = (grads[3] - reference_grads[3]).abs()
            assert bool(error.le(SHIFT_RTOL[dtype] * terms).all()), (error / terms).max()
        for name, buffer in modules[0].named_buffers():
            assert_close_relative(getattr(modules[1], name), buffer, rtol)
    modules[1].eval()
    out = fused.batch_norm(current, modules[1], shift if with_shift else None)
    assert torch.equal(out, modules[1](shifted.flatten(0, 1)).view_as(current))
    assert fused.fusable_norm(modules[1]) and not fused.fusable_norm(None)


NETWORKS = {  # small versions of the presets: every block kind and every readout
    "shd": dict(hidden_sizes=(12, 10)),  # bn block, lif readout, hard reset, ATan
    "ssc": dict(hidden_sizes=(9, 9, 11)),  # dropout block, sum readout, soft reset, Triangle
    "mackey-glass": dict(hidden_sizes=(13,)),  # dropout block, ema readout
    "psmnist": dict(hidden_sizes=(6, 8, 8), readout="ema"),
}


def network_pair(task, model, dtype, device="cpu", **sizes):
    """The config and two copies of a small ``task`` preset network as ``model``: fused and
    reference feedforward engines. ``sizes`` override :data:`NETWORKS`."""
    config = preset_network(task, model, **{**NETWORKS[task], **sizes})
    pair = [build_network(config, seed=5).to(device, dtype) for _ in range(2)]
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


def assert_trains_alike(task, config, fused_net, reference_net, lengths, rtol):
    """One training step of both networks on random frames of ``lengths`` (zero-padded to the
    longest): identical spikes, and readout, gradients and BatchNorm buffers within ``rtol``."""
    dtype = next(fused_net.parameters()).dtype
    device = next(fused_net.parameters()).device
    g = torch.Generator().manual_seed(7)
    steps, batch = int(lengths.max()), len(lengths)
    frames = torch.rand(steps, batch, config.input_size, generator=g, dtype=dtype) * 2
    frames *= (torch.arange(steps).view(-1, 1) < lengths).unsqueeze(-1)
    task_kind = "regression" if task == "mackey-glass" else "classification"
    objective = make_objective(task_kind, config.readout)
    targets = (
        torch.randn(batch, generator=g, dtype=dtype)
        if task_kind == "regression"
        else torch.randint(config.output_size, (batch,), generator=g)
    )
    frames, lengths, targets = (x.to(device) for x in (frames, lengths, targets))
    out, spikes, grads = train_step(fused_net, objective, frames, lengths, targets)
    ref_out, ref_spikes, ref_grads = train_step(reference_net, objective, frames, lengths, targets)
    assert any(s.ne(0).any() for s in spikes)
    for s, r in zip(spikes, ref_spikes):
        assert torch.equal(s, r)
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
