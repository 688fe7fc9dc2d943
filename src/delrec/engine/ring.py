"""Integer delays through a ring buffer: what a chip runs, one time step at a time.

:class:`DelayedSynapses` holds dense synapses with one integer delay each and reads their
input from a ring buffer of the last ``max_lag + 1`` input frames. The recurrent layer's
integer-delay inference (eval mode, no autograd: engine path ``ring``,
:func:`ring_recurrence`) and the streaming network (:mod:`delrec.deploy.streaming`) both run on
it (docs/design.md#ring-buffers). Units: time in steps; sequences are time-major ``(T, B, N)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from delrec.delays import MAX_DELAY
from delrec.engine.lif import LIFMap


class DelayedSynapses(nn.Module):
    """Dense synapses with one integer delay per synapse, fed through a ring buffer.

    ``weight`` ``(O, I)`` (row = postsynaptic), ``lags`` ``(O, I)`` integer steps in
    ``[0, MAX_DELAY + 1]``, ``bias`` ``(O,)`` or ``None``; :meth:`read` at step ``t`` gives
    ``Σ_j W_ij x_j[t - lag_ij] + b_i``. ``horizon``: the number of steps the buffer serves when
    it serves one sequence of ``T`` steps (``None``: an endless stream); a lag of ``T`` or more
    never delivers within it, so lags are capped at ``T`` (exactly: the frame it reads is still
    empty) and the buffer holds ``min(max lag, T) + 1`` frames, whatever the delays. The ring
    buffer of a stream is ``(B, F, I)``: frame ``t mod (max_lag + 1)`` holds the input of step
    ``t``. With one lag per presynaptic neuron
    (``column_lags``: axonal delays, or none) a read is one gather and one GEMM, ``F = L``;
    otherwise each frame is stored twice (``F = 2L``), so that the frames of every lag in use are
    one contiguous window, and a read is one GEMM with the lag-stacked weights.
    """

    def __init__(
        self,
        weight: Tensor,
        lags: Tensor,
        bias: Tensor | None = None,
        horizon: int | None = None,
    ):
        super().__init__()
        if weight.dim() != 2 or lags.shape != weight.shape:
            raise ValueError(
                f"weight and lags must both be (O, I), got {tuple(weight.shape)} "
                f"and {tuple(lags.shape)}"
            )
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be (O,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        lags = lags.to(torch.long)
        if (lags < 0).any():
            raise ValueError("synaptic lags must be >= 0 steps")
        if lags.numel() and int(lags.max()) > MAX_DELAY + 1:
            raise ValueError(
                f"a synaptic lag of {int(lags.max())} steps exceeds MAX_DELAY + 1 = "
                f"{MAX_DELAY + 1:g} steps, longer than any sequence; give shorter delays"
            )
        if horizon is not None:
            if horizon < 1:
                raise ValueError(f"horizon must be >= 1 step, got {horizon}")
            lags = lags.clamp(max=horizon)
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("lags", lags.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.max_lag = int(lags.max()) if lags.numel() else 0
        slots = self.max_lag + 1
        inputs = torch.arange(self.in_features, device=lags.device)
        uniform_columns = bool((lags == lags[:1]).all()) if lags.numel() else True
        self.register_buffer("column_lags", lags[0].clone() if uniform_columns else None)
        if uniform_columns:  # (L, I): where x_j[t - lag_j] sits at phase t mod L, flattened
            phase = torch.arange(slots, device=lags.device).view(slots, 1)
            gather = ((phase - self.column_lags) % slots) * self.in_features + inputs
            self.register_buffer("gather", gather, persistent=False)
            self.register_buffer("stacked", None, persistent=False)
        else:  # (lags·I, O): row (l, j) multiplies x_j[t - kmax + l]
            self.kmin, self.kmax = int(lags.min()), self.max_lag
            window = torch.arange(self.kmax, self.kmin - 1, -1, device=lags.device)  # oldest first
            stacked = (self.weight.unsqueeze(-1) * (lags.unsqueeze(-1) == window)).permute(2, 1, 0)
            self.register_buffer("gather", None, persistent=False)
            self.register_buffer(
                "stacked", stacked.reshape(-1, self.out_features), persistent=False
            )

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def new_buffer(self, batch_size: int) -> Tensor:
        """An empty (all-zero history) ring buffer ``(B, F, I)``."""
        frames = (self.max_lag + 1) * (1 if self.column_lags is not None else 2)
        return self.weight.new_zeros(batch_size, frames, self.in_features)

    def write(self, buffer: Tensor, t: int, x: Tensor) -> None:
        """Store the input ``x`` ``(B, I)`` of step ``t`` in ``buffer`` (in place)."""
        slots = self.max_lag + 1
        buffer[:, t % slots] = x
        if self.column_lags is None:
            buffer[:, t % slots + slots] = x

    def read(self, buffer: Tensor, t: int) -> Tensor:
        """``Σ_j W_ij x_j[t - lag_ij] + b_i`` from the buffer, ``(B, O)``."""
        batch, slots = buffer.shape[0], self.max_lag + 1
        if self.column_lags is not None:
            delayed = buffer.view(batch, -1).index_select(1, self.gather[t % slots])  # (B, I)
            return F.linear(delayed, self.weight, self.bias)
        # frames t - kmax … t - kmin sit at slot + L - kmax … slot + L - kmin
        start = t % slots + slots - self.kmax
        past = buffer[:, start : start + self.kmax - self.kmin + 1].reshape(batch, -1)
        if self.bias is None:
            return torch.mm(past, self.stacked)
        return torch.addmm(self.bias, past, self.stacked)

    def extra_repr(self) -> str:
        kind = "per-presynaptic-neuron" if self.column_lags is not None else "per-synapse"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"max_lag={self.max_lag}, lags={kind}, bias={self.bias is not None}"
        )


@torch.no_grad()
def ring_recurrence(
    current: Tensor,
    weight: Tensor,
    delay: Tensor,
    width: Tensor | float,
    neuron: nn.Module,
    mask: Tensor | None = None,
) -> Tensor:
    """Path ``ring``: integer-delay inference, spikes ``(T, B, N)``, no autograd.

    ``delay`` ``(N,)`` or ``(N, N)`` holds integers (eval mode rounds them) and ``width`` is 1
    (σ = 0): each spike lands exactly ``1 + d`` steps later, read from a ring buffer of the
    last spikes (:class:`DelayedSynapses`, at most ``T + 1`` frames), O(B·N) per step plus the
    GEMM. ``neuron`` is the
    built-in :class:`~delrec.neurons.LIF`, ``mask`` ``(B, N)`` or None.
    """
    steps, batch, n = current.shape
    lif = LIFMap.of(neuron.p)
    lags = 1 + delay.detach().long()
    synapses = DelayedSynapses(weight * lif.gain, lags.expand(n, n), horizon=steps)
    ring = synapses.new_buffer(batch)
    drive = lif.drive(current)
    spikes = current.new_empty(steps, batch, n, dtype=torch.bool)
    v = current.new_full((batch, n), lif.v0)
    membrane = current.new_empty(batch, n)
    for t in range(steps):
        u = synapses.read(ring, t)
        u = drive[t] + (u if mask is None else mask * u)
        h = torch.add(u, v, alpha=lif.leak, out=membrane)
        v = lif.fire_and_reset(h, spikes[t])
        synapses.write(ring, t, spikes[t])
    return spikes.to(current.dtype)
