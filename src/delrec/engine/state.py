"""The state of a recurrent-delay layer between two chunks of a sequence
(docs/design.md#state-and-chunks).

At step ``t`` the recurrence reads spikes up to ``L - 1`` steps back (lags ``1 … L-1`` of the
kernel), and the neuron carries its own state from step to step. So a chunk of a sequence
needs exactly :class:`RecurrentState`: the neuron state after the previous chunk and the last
``H`` spikes. The spike history does not depend on the weights or delays, so it stays valid
when an optimizer step changes them between chunks (truncated BPTT).

Every engine path marked ``stateful`` runs
``path.run(current, weight, delay, width, neuron, mask, state=RecurrentState)`` and returns
``(spikes, RecurrentState)``. The reference and ring paths start from the state natively; the
LIF paths run the chunk unchanged from rest with a corrected input current
(:func:`run_lif`): the recurrent input the history still sends into the chunk
(:func:`history_input`, non-zero in its first ``L - 1`` steps) and the membrane's difference from
rest in the first step. The final state carries no gradient (chunks are truncated BPTT); the
gradient with respect to the initial state is exact.

Also here, shared by every path: :func:`empty_batch_safe`, the answer to a batch of no
sequences (and, for a stateful call, its state unchanged).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from delrec.delays import kernel_length, kernel_support, recurrent_kernel
from delrec.engine.lif import LIFMap


class RecurrentState(NamedTuple):
    """What a recurrent-delay layer carries from one chunk to the next.

    ``neuron``: the neuron's state after the last step, a tuple of ``(B, N)`` tensors (the
    built-in LIF: ``(v,)``). ``spikes``: ``(H, B, N)``, the spikes of the last ``H`` steps,
    oldest first (row ``H - 1`` is the last step); spikes before those count as 0, so
    ``H = 0`` is a fresh start. Paths keep :func:`kept_history` steps.
    """

    neuron: tuple[Tensor, ...]
    spikes: Tensor


def history_length(delay: Tensor, width: Tensor | float) -> int:
    """``L - 1``: how many steps back the kernel of ``delay`` and ``width`` (steps) reaches."""
    max_width = float(torch.as_tensor(width).detach().max())
    return kernel_length(float(delay.detach().max()), max_width) - 1


def kept_history(history: Tensor, steps: int, reach: int) -> int:
    """How many steps of spikes the state after a chunk of ``steps`` steps keeps: as far back as
    the kernel reaches (``reach = L - 1``) and at least as many as ``history`` ``(H, B, N)``
    held, but no more than the steps seen (spikes before the sequence are 0 anyway)."""
    return min(max(history.shape[0], reach), history.shape[0] + steps)


def next_history(history: Tensor, spikes: Tensor, length: int) -> Tensor:
    """The last ``length`` steps of ``history`` ``(H, B, N)`` followed by ``spikes``
    ``(T, B, N)``, zero-padded in front when both are shorter, detached: ``(length, B, N)``."""
    joined = torch.cat([history.detach().to(spikes.dtype), spikes.detach()])
    if joined.shape[0] >= length:
        return joined[joined.shape[0] - length :].clone()
    return F.pad(joined, (0, 0, 0, 0, length - joined.shape[0], 0))


def history_input(
    history: Tensor, weight: Tensor, kernel: Tensor, steps: int, lags: tuple[int, int] | None = None
) -> Tensor | None:
    """The recurrent input that the spikes of ``history`` still send into a chunk.

    ``r[t, b, i] = Σ_j W_ij Σ_{m ≥ 1} κ(t + m) s[-m, b, j]`` for ``t < min(steps, L - 1)``
    (``κ_j`` of axonal kernels ``(N, L)``, ``κ_ij`` of synaptic ones ``(N, N, L)``;
    ``s[-m]`` = ``history[H - m]``), ``(T_r, B, N)``, or None when it is empty. ``lags``: the
    smallest and largest lag where a kernel weight or its gradient may be non-zero
    (:func:`~delrec.delays.kernel_support`; default all). Differentiable in ``history``,
    ``weight`` and ``kernel``: for axonal kernels one batched product with the Toeplitz matrix
    ``κ_j(t + m)`` and one GEMM, for synaptic ones one GEMM per lag.
    """
    reach = kernel.shape[-1] - 1
    past = min(history.shape[0], reach)
    rows = min(steps, reach)
    if past == 0 or rows == 0:
        return None
    by_age = history[history.shape[0] - past :].flip(0).to(weight.dtype)  # row m-1: time -m
    if kernel.dim() == 2:  # axonal: z[t, b, j] = Σ_m κ_j(t + m) s[-m, b, j], then z Wᵀ
        lag = torch.arange(rows, device=kernel.device).view(-1, 1) + torch.arange(
            1, past + 1, device=kernel.device
        )
        toeplitz = F.pad(kernel, (0, rows + past))[:, lag]  # (N, T_r, M); 0 beyond lag L-1
        return torch.einsum("ntm,mbn->tbn", toeplitz, by_age) @ weight.t()
    lowest, highest = lags if lags is not None else (1, reach)
    total = None
    for k in range(max(1, lowest), min(reach, highest, rows + past - 1) + 1):
        first, last = max(0, k - past), min(k, rows)  # steps t that read age m = k - t
        arriving = by_age[k - last : k - first].flip(0) @ (weight * kernel[..., k]).t()
        arriving = F.pad(arriving, (0, 0, 0, 0, first, rows - last))
        total = arriving if total is None else total + arriving
    return total


def run_lif(
    run: Callable[[Tensor], tuple[Tensor, Tensor]],
    current: Tensor,
    weight: Tensor,
    delay: Tensor,
    width: Tensor | float,
    lif: LIFMap,
    mask: Tensor | None,
    state: RecurrentState | None,
) -> Tensor | tuple[Tensor, RecurrentState]:
    """A built-in-LIF path, from rest or from ``state``.

    ``run(current) -> (spikes, v_last)`` runs a chunk from rest and zero history. Without a
    state that is all; with one, ``run`` gets ``c + m ⊙ r_hist`` (:func:`history_input`) and,
    in the first step, ``leak·(v - v_rest)/gain`` more, which makes its first charge
    ``leak·v + gain·c + offset``, and the result is the spikes ``(T, B, N)`` and the final state.
    """
    if state is None:
        return run(current)[0]
    (v,) = state.neuron
    history, steps = state.spikes, current.shape[0]
    reach = history_length(delay, width)
    corrected = current
    past, rows = min(history.shape[0], reach), min(steps, reach)
    if past and rows:  # the history's input: lags up to past + rows - 1 can reach the chunk
        kernel = recurrent_kernel(delay, width, length=min(reach, past + rows - 1) + 1)
        recurrent = history_input(history, weight, kernel, steps, kernel_support(delay, width))
        if recurrent is not None:  # None: no lag of the kernels reaches from the history
            recurrent = recurrent if mask is None else recurrent * mask
            corrected = torch.cat([current[:rows] + recurrent, current[rows:]])
    if lif.leak != 0.0:
        start = (v - lif.v0) * (lif.leak / lif.gain)
        corrected = torch.cat([corrected[:1] + start, corrected[1:]])
    spikes, v_last = run(corrected)
    length = kept_history(history, steps, reach)
    return spikes, RecurrentState((v_last,), next_history(history, spikes, length))


# --------------------------------------------------------------------------- empty batches
def empty_batch_safe(run: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``run``, except that a batch of ``B = 0`` sequences is answered here: spikes
    ``(T, 0, N)`` connected to ``current``, ``weight``, ``delay`` and ``width`` (zero gradients
    of their shapes). The C++ kernels divide work by ``B``: every path function that calls
    them is decorated with it, and :class:`~delrec.engine.EnginePath` wraps any other."""

    @functools.wraps(run)
    def guarded(current, weight, delay, width, neuron, mask=None, **options):
        if current.shape[1] > 0:
            return run(current, weight, delay, width, neuron, mask, **options)
        spikes = current * 0.0
        for value in (weight, delay, width):
            if torch.is_tensor(value):
                spikes = spikes + value.sum() * 0.0
        return spikes if options.get("state") is None else (spikes, options["state"])

    guarded.empty_batch_safe = True
    return guarded
