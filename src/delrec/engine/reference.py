"""The reference recurrence: the paper's buffer-of-future-inputs algorithm, step by step.

Obviously correct and slow on purpose: every fast path is tested against it. At each step
the spikes just emitted are spread over their lags by the kernel, weighted, and added to a
buffer of future recurrent input, so work is O(B·N²·L) per step and autograd keeps a
``(B, N, L)`` tensor per step (docs/design.md#the-reference-loop). From a state it replays the
spike history into that buffer: the definition of running a sequence in chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from delrec.delays import recurrent_kernel
from delrec.engine.state import RecurrentState, kept_history, next_history
from delrec.neurons import check_initial_state, check_step


def reference_recurrence(
    current: Tensor,
    weight: Tensor,
    kernel: Tensor,
    neuron: nn.Module,
    mask: Tensor | None = None,
    state: RecurrentState | None = None,
) -> Tensor | tuple[Tensor, RecurrentState]:
    """Run a recurrent-delay layer over a sequence; returns spikes ``(T, B, N)``.

    ``current``: feedforward input current ``c``, ``(T, B, N)``; ``weight``: recurrent weights
    ``W``, ``(N, N)``, row = postsynaptic, column = presynaptic; ``kernel``: interpolation
    kernel over lags ``0 … L-1``, ``(N, L)`` per presynaptic neuron (axonal) or ``(N, N, L)``
    per synapse (synaptic); ``neuron``: follows :class:`delrec.neurons.Neuron`; ``mask``:
    recurrent dropout mask ``(B, N)`` on the postsynaptic side, or ``None``; ``state``: a
    :class:`~delrec.engine.state.RecurrentState` to start from: the neuron starts from its
    state and the spikes of its history are replayed, oldest first, into the buffer of future
    input (docs/design.md#state-and-chunks). Then the result is ``(spikes, final state)``.
    """
    synaptic = kernel.dim() == 3
    weighted_kernel = weight.unsqueeze(-1) * kernel if synaptic else None

    def advance(future: Tensor, s_t: Tensor) -> Tensor:
        """The buffer one step later, after the spikes ``s_t`` of this step are spread."""
        if synaptic:
            arriving = torch.einsum("ijl,bj->bil", weighted_kernel, s_t)
        else:
            arriving = torch.einsum("ij,bjl->bil", weight, s_t.unsqueeze(-1) * kernel)
        return F.pad((future + arriving)[..., 1:], (0, 1))

    # future[b, i, k]: recurrent input reaching neuron i in k steps (k = 0 is now); a zero
    # connected to the weights and the kernel, so that they get zero gradients (not None) where
    # no spike reaches a later step (T = 1), as on every other path
    future = current.new_zeros(current.shape[1], current.shape[2], kernel.shape[-1])
    future = future + 0.0 * (weight.sum() + kernel.sum())
    if state is None:
        neuron_state = neuron.initial_state(current[0])
        check_initial_state(neuron, neuron_state)
    else:
        neuron_state = state.neuron
        for s_past in state.spikes[max(0, state.spikes.shape[0] - kernel.shape[-1] + 1) :]:
            future = advance(future, s_past.to(current.dtype))
    spikes = []
    for c_t in current:
        recurrent = future[..., 0] if mask is None else mask * future[..., 0]
        s_t, neuron_state = neuron.step(c_t + recurrent, neuron_state)
        check_step(neuron, c_t, s_t)
        spikes.append(s_t)
        future = advance(future, s_t)
    spikes = torch.stack(spikes)
    if state is None:
        return spikes
    length = kept_history(state.spikes, current.shape[0], kernel.shape[-1] - 1)
    final = tuple(x.detach() for x in neuron_state)
    return spikes, RecurrentState(final, next_history(state.spikes, spikes, length))


def triangle_recurrence(
    current: Tensor,
    weight: Tensor,
    delay: Tensor,
    width: Tensor | float,
    neuron: nn.Module,
    mask: Tensor | None = None,
    state: RecurrentState | None = None,
) -> Tensor | tuple[Tensor, RecurrentState]:
    """Path ``reference``: :func:`reference_recurrence` with the triangle kernel of ``delay``
    (``(N,)`` or ``(N, N)``, steps) and half-width ``width`` (a number or ``(N,)``), any neuron."""
    kernel = recurrent_kernel(delay, width)
    return reference_recurrence(current, weight, kernel, neuron, mask, state)
