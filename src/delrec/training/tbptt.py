"""Truncated backpropagation through time: a training step in chunks of ``K`` steps
(docs/training.md#truncated-bptt).

The loss of a sequence, ``L(y)``, depends on the whole readout sequence ``y`` ``(T, B, K)``
(a sum over time, a softmax summed over time, the last valid value). A step runs twice:

1. without autograd, chunk by chunk with the state carried across, to get ``y``, the loss and
   its gradient ``G = ∂L/∂y`` (cheap: ``y`` is small);
2. chunk by chunk again from the same random state (so with the same dropout masks) and the
   same BatchNorm running statistics, each chunk ``c`` backpropagating ``Σ G[c]·y[c]`` plus its
   share of the firing-rate penalty, with the state detached at its start.

The gradient is exactly truncated BPTT of the sequence loss: every path from the loss back to
a parameter that stays inside one chunk counts, none that crosses a chunk boundary. Memory for
backward is that of one chunk (∝ K), plus ``y``; the cost is one extra forward without autograd.
In training mode BatchNorm normalises each chunk by its own statistics; its running statistics
take one update per step, from the statistics of all the step's frames (combined from the
chunks': :func:`sequence_statistics`), as without chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from delrec.config import ConfigError
from delrec.models import SpikingNetwork
from delrec.training.objectives import spike_penalty


@dataclass
class ForwardPass:
    """The forward pass of a training step: the sequence ``loss`` and ``prediction`` (as the
    objective returns them), ``spikes`` ``(layers, 2)`` float64 (each hidden layer's spike
    count over the samples' valid steps, and its number of neuron-steps there: their ratio is
    the layer's firing rate; :func:`spike_tally`), and ``backward()``, which adds the gradient
    of ``loss + rate_penalty · spike_penalty`` to the parameters' ``.grad`` (truncated, for
    :func:`truncated_bptt`'s second pass)."""

    loss: Tensor
    prediction: Tensor
    spikes: Tensor
    backward: Callable[[], None]

    @property
    def firing_rates(self) -> list[float]:
        """Spikes per neuron per valid step of each hidden layer."""
        return (self.spikes[:, 0] / self.spikes[:, 1]).tolist()


def spike_tally(spikes: list[Tensor], lengths: Tensor, start: int = 0) -> Tensor:
    """``(layers, 2)`` float64 on the CPU: each layer's spikes ``(T, B, N)`` summed over the
    valid steps (step ``start + t`` of sample ``b`` counts when it is below ``lengths[b]``),
    and the number of neuron-steps summed. Padding after a sample's end does not count, so a
    firing rate does not depend on the batch a sample is padded in."""
    device = spikes[0].device
    times = torch.arange(start, start + spikes[0].shape[0], device=device)
    valid = (times[:, None] < lengths.to(device)[None, :]).double()  # (T, B)
    counted = [(s.detach().sum(-1, dtype=torch.float64) * valid).sum() for s in spikes]
    slots = [valid.sum() * s.shape[-1] for s in spikes]
    return torch.stack([torch.stack(counted), torch.stack(slots)], dim=1).cpu()


def chunk_bounds(steps: int, chunk: int) -> list[tuple[int, int]]:
    """``[(0, K), (K, 2K), …]`` up to ``steps``; the last chunk may be shorter."""
    if chunk < 1:
        raise ValueError(f"the TBPTT chunk must be at least 1 step, got {chunk}")
    return [(start, min(start + chunk, steps)) for start in range(0, steps, chunk)]


def truncated_bptt(
    network: SpikingNetwork,
    frames: Tensor,
    lengths: Tensor,
    targets: Tensor,
    objective,
    chunk: int,
    rate_penalty: float = 0.0,
) -> ForwardPass:
    """One training step of ``network`` (in training mode) on ``frames`` ``(T, B, C)`` in chunks
    of ``chunk`` steps; ``objective(y, lengths, targets) -> (loss, prediction)``. Returns the
    first pass's results; call ``.backward()`` for the gradients (module docstring)."""
    bounds = chunk_bounds(frames.shape[0], chunk)
    batch_norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    shortest = min(end - start for start, end in bounds)  # the last chunk
    if batch_norms and shortest * frames.shape[1] < 2:
        raise ConfigError(
            f"a chunk of {shortest} step(s) of a batch of {frames.shape[1]} gives BatchNorm one "
            "frame, whose statistics it cannot take: raise tbptt, or choose a batch_size that "
            "leaves no last batch of one item"
        )
    devices = [frames.device] if frames.device.type == "cuda" else []
    rng = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
    statistics = _batch_norm_buffers(batch_norms)
    norms = [norm for norm in batch_norms if norm.track_running_stats]
    momenta = [norm.momentum for norm in norms]
    outputs, tally, state, chunk_statistics = [], 0, None, []
    with torch.no_grad():
        try:
            for norm in norms:  # each chunk's running statistics become its batch statistics
                norm.momentum = 1.0
            for start, end in bounds:
                out, spikes, state = network.forward_with_spikes(
                    frames[start:end], state, return_state=True
                )
                outputs.append(out)
                tally = tally + spike_tally(spikes, lengths, start)
                frames_seen = (end - start) * frames.shape[1]
                chunk_statistics.append(
                    [(frames_seen, n.running_mean.clone(), n.running_var.clone()) for n in norms]
                )
        finally:
            for norm, momentum in zip(norms, momenta):
                norm.momentum = momentum
    whole = [sequence_statistics(list(per_norm)) for per_norm in zip(*chunk_statistics)]
    output = torch.cat(outputs).requires_grad_()
    with torch.enable_grad():
        loss, prediction = objective(output, lengths, targets)
        (grad_output,) = torch.autograd.grad(loss, output)
    steps = frames.shape[0]

    def backward() -> None:
        _restore(statistics)
        torch.set_rng_state(rng[0])
        for device, cuda_state in zip(devices, rng[1]):
            torch.cuda.set_rng_state(cuda_state, device)
        state = None
        for start, end in bounds:
            out, spikes, state = network.forward_with_spikes(
                frames[start:end], state, return_state=True
            )
            total = (out * grad_output[start:end]).sum()
            if rate_penalty > 0:  # the chunk's share of the sequence's penalty
                total = total + rate_penalty * spike_penalty(spikes) * (end - start) / steps
            total.backward()
        _restore(statistics)  # then one update per step, as a pass without chunks makes
        with torch.no_grad():
            for norm, (mean, var) in zip(norms, whole):
                norm.num_batches_tracked += 1
                cumulative = 1 / int(norm.num_batches_tracked)  # momentum None: an average
                factor = cumulative if norm.momentum is None else norm.momentum
                norm.running_mean.lerp_(mean, factor)
                norm.running_var.lerp_(var, factor)

    return ForwardPass(loss.detach(), prediction.detach(), tally, backward)


def sequence_statistics(chunks: list[tuple[int, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The mean and unbiased variance over all frames of the chunks ``(frames, mean, unbiased
    variance)`` of one BatchNorm layer, from theirs (the law of total variance): what the
    layer measures on the whole sequence at once."""
    total = sum(count for count, _, _ in chunks)
    mean = sum(count * chunk_mean for count, chunk_mean, _ in chunks) / total
    spread = sum(
        (count - 1) * var + count * (chunk_mean - mean) ** 2 for count, chunk_mean, var in chunks
    )
    return mean, spread / max(total - 1, 1)


def _batch_norm_buffers(norms: list[nn.Module]) -> list[tuple[Tensor, Tensor]]:
    """Copies of the running statistics of the BatchNorm layers ``norms``, to undo the passes'
    updates."""
    return [(buffer, buffer.detach().clone()) for norm in norms for buffer in norm.buffers()]


def _restore(statistics: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buffer, saved in statistics:
            buffer.copy_(saved)
