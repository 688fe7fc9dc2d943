"""The reference recurrence: the paper's buffer-of-future-inputs algorithm, step by step.

Obviously correct and slow on purpose: every fast path is tested against it. At each step
the spikes just emitted are spread over their lags by the kernel, weighted, and added to a
buffer of future recurrent input, so work is O(B·N²·L) per step and autograd keeps a
``(B, N, L)`` tensor per step (docs/design.md#the-reference-loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from delrec.delays import recurrent_kernel


def reference_recurrence(
    current: Tensor, weight: Tensor, kernel: Tensor, neuron: nn.Module, mask: Tensor | None = None
) -> Tensor:
    """Run a recurrent-delay layer over a sequence; returns spikes ``(T, B, N)``.

    current: feedforward input current ``c``, ``(T, B, N)``.
    weight:  recurrent weights ``W``, ``(N, N)``, row = postsynaptic, column = presynaptic.
    kernel:  interpolation kernel over lags ``0 … L-1``: ``(N, L)`` per presynaptic neuron
             (axonal) or ``(N, N, L)`` per synapse (synaptic).
    neuron:  follows :class:`delrec.neurons.Neuron`.
    mask:    recurrent dropout mask ``(B, N)`` on the postsynaptic side, or ``None``.
    """
    synaptic = kernel.dim() == 3
    weighted_kernel = weight.unsqueeze(-1) * kernel if synaptic else None
    state = neuron.initial_state(current[0])
    # future[b, i, k]: recurrent input reaching neuron i in k steps (k = 0 is now).
    future = current.new_zeros(current.shape[1], current.shape[2], kernel.shape[-1])
    spikes = []
    for c_t in current:
        recurrent = future[..., 0] if mask is None else mask * future[..., 0]
        s_t, state = neuron.step(c_t + recurrent, state)
        spikes.append(s_t)
        if synaptic:
            arriving = torch.einsum("ijl,bj->bil", weighted_kernel, s_t)
        else:
            arriving = torch.einsum("ij,bjl->bil", weight, s_t.unsqueeze(-1) * kernel)
        future = F.pad((future + arriving)[..., 1:], (0, 1))
    return torch.stack(spikes)


def triangle_recurrence(
    current: Tensor,
    weight: Tensor,
    delay: Tensor,
    width: Tensor | float,
    neuron: nn.Module,
    mask: Tensor | None = None,
) -> Tensor:
    """Path ``reference``: :func:`reference_recurrence` with the triangle kernel of ``delay``
    (``(N,)`` or ``(N, N)``, steps) and half-width ``width`` (a number or ``(N,)``), any neuron."""
    return reference_recurrence(current, weight, recurrent_kernel(delay, width), neuron, mask)
