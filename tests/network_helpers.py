"""Whole preset-shaped networks, fused against the reference: what tests/test_fused.py (the C++
kernels) and tests/test_triton_fused.py (the Triton kernels) share."""

import torch
from engine_helpers import assert_close_relative

from delrec.models import build_network, preset_network, set_feedforward_engine
from delrec.training.objectives import make_objective

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
