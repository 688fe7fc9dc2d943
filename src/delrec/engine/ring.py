"""Integer delays: what a chip runs, a chunk of steps (or one step) at a time from a state.

:class:`DelayedSynapses` holds dense synapses with one integer lag each and reads its input
from a window of past frames. :class:`IntegerLayer` is one whole layer with integer delays —
feedforward synapses (or a given current), recurrent synapses (or none), LIF neurons or a
leaky-integrator readout — run by the compiled loop of ``csrc/ring.cpp``, event by event.
The recurrent layer's integer-delay inference (eval mode, no autograd: engine paths
``cpp-ring``, :func:`cpp_ring_recurrence`, and ``ring``, :func:`ring_recurrence`, the same in
PyTorch ops on any device) and the streaming network (:mod:`delrec.deploy.streaming`) run on
them (docs/design.md#ring-buffers). Units: time in steps; sequences are time-major
``(T, B, N)``; a window of past frames ``(H, B, ·)`` is oldest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from delrec.delays import MAX_DELAY
from delrec.engine import native
from delrec.engine.lif import LIFMap
from delrec.engine.state import RecurrentState, history_length, kept_history, next_history


class DelayedSynapses(nn.Module):
    """Dense synapses with one integer delay per synapse.

    ``weight`` ``(O, I)`` (row = postsynaptic), ``lags`` ``(O, I)`` integer steps in
    ``[0, MAX_DELAY + 1]``, ``bias`` ``(O,)`` or ``None``: the output at step ``t`` is
    ``Σ_j W_ij x_j[t - lag_ij] + b_i``. :meth:`run` takes a chunk of inputs and the ``max_lag``
    frames before it. ``horizon``: how many steps of input there are at most (``None``: an
    endless stream); a lag of that many steps or more never delivers, so lags are capped there
    and a window holds at most ``horizon`` past frames, whatever the delays. With one lag per
    presynaptic neuron (``column_lags``: axonal delays, or none) a read gathers one frame per
    input and multiplies once; otherwise it multiplies the window of the lags in use by the
    weights stacked by lag. What is derived from the tensors (``max_lag``, ``column_lags``, the
    stacked weights) is derived again when they change: an in-place edit, ``load_state_dict``,
    ``.data =``, a move (an edit through ``.data`` is not seen: call ``refresh(force=True)``).
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
        if horizon is not None and horizon < 1:
            raise ValueError(f"horizon must be >= 1 step, got {horizon}")
        self.horizon = horizon
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("lags", lags.to(torch.long).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("column_lags", None, persistent=False)
        self.register_buffer("stacked", None, persistent=False)
        self._derived_from: tuple | None = None
        self.refresh()

    def sources(self) -> tuple:
        """The storage and version of ``weight``, ``lags`` and ``bias``: it changes with any
        edit of them but one through ``.data``."""
        tensors = self._buffers  # read once per step of a stream: no Module.__getattr__
        weight, lags, bias = tensors["weight"], tensors["lags"], tensors["bias"]
        return (
            weight.data_ptr(),
            weight._version,
            lags.data_ptr(),
            lags._version,
            None if bias is None else (bias.data_ptr(), bias._version),
        )

    def refresh(self, force: bool = False) -> bool:
        """Check the lags and derive ``max_lag``, ``column_lags`` and the stacked weights again
        if the tensors changed since they were last derived (or ``force``); whether it did."""
        if not force and self.sources() == self._derived_from:
            return False
        lags = self.lags
        if lags.dtype != torch.long or lags.shape != self.weight.shape:
            raise ValueError(
                f"lags must be integer steps of the weights' shape {tuple(self.weight.shape)}, "
                f"got {lags.dtype} {tuple(lags.shape)}"
            )
        if (lags < 0).any():
            raise ValueError("synaptic lags must be >= 0 steps")
        if lags.numel() and int(lags.max()) > MAX_DELAY + 1:
            raise ValueError(
                f"a synaptic lag of {int(lags.max())} steps exceeds MAX_DELAY + 1 = "
                f"{MAX_DELAY + 1:g} steps, longer than any sequence; give shorter delays"
            )
        if self.horizon is not None:
            lags.clamp_(max=self.horizon)
        self.max_lag = int(lags.max()) if lags.numel() else 0
        uniform_columns = bool((lags == lags[:1]).all()) if lags.numel() else True
        self.column_lags = lags[0].clone() if uniform_columns else None
        self.stacked = None
        if not uniform_columns:  # (lags·I, O): row (l, j) multiplies x_j[t - kmax + l]
            self.kmin, self.kmax = int(lags.min()), self.max_lag
            window = torch.arange(self.kmax, self.kmin - 1, -1, device=lags.device)  # oldest first
            stacked = (self.weight.unsqueeze(-1) * (lags.unsqueeze(-1) == window)).permute(2, 1, 0)
            self.stacked = stacked.reshape(-1, self.out_features)
        self._derived_from = self.sources()
        return True

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def at(self, window: Tensor, now: int | Tensor) -> Tensor:
        """``Σ_j W_ij x_j[now - lag_ij] + b_i`` for the rows ``now`` (an int or ``(T,)``) of
        ``window`` ``(W, B, I)`` (every row ``now - lag`` must exist): ``(T, B, O)``. It reads
        what was derived at the last :meth:`refresh` (:meth:`run` calls one; a loop of ``at``
        calls once before it), so that a time loop does not check the tensors at every step."""
        now = torch.as_tensor(now, device=window.device).view(-1)
        if self.column_lags is not None:
            rows = now.view(-1, 1) - self.column_lags  # (T, I)
            inputs = torch.arange(self.in_features, device=window.device)
            delayed = window[rows, :, inputs].transpose(1, 2)  # (T, B, I)
            return F.linear(delayed, self.weight, self.bias)
        lags = self.kmax - self.kmin + 1
        frames = window.unfold(0, lags, 1)[now - self.kmax]  # (T, B, I, lags), oldest first
        past = frames.permute(0, 1, 3, 2).reshape(now.shape[0], window.shape[1], -1)
        out = past @ self.stacked
        return out if self.bias is None else out + self.bias

    def run(self, x: Tensor, past: Tensor) -> tuple[Tensor, Tensor]:
        """Outputs ``(T, B, O)`` of the inputs ``x`` ``(T, B, I)`` preceded by ``past``
        ``(max_lag, B, I)``, and the ``max_lag`` frames before the next chunk."""
        self.refresh()
        if self.max_lag == 0:
            return F.linear(x, self.weight, self.bias), past
        window = torch.cat([past, x])
        now = torch.arange(self.max_lag, window.shape[0], device=x.device)
        return self.at(window, now), window[x.shape[0] :]

    def extra_repr(self) -> str:
        kind = "per-presynaptic-neuron" if self.column_lags is not None else "per-synapse"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"max_lag={self.max_lag}, lags={kind}, bias={self.bias is not None}"
        )


def _projection(kernels, weight: Tensor, lags: Tensor | None):
    """The compiled form of synapses ``weight`` ``(O, I)`` with integer ``lags`` ``(O, I)``
    (None: all 0): by input with one lag per input, else each input's synapses grouped by lag
    (``csrc/ring.cpp``, Projection)."""
    outputs, inputs = weight.shape
    none = torch.empty(0, dtype=torch.long)
    if lags is None or bool((lags == lags[:1]).all()):
        column = lags[0].long().contiguous() if lags is not None and bool(lags.any()) else none
        weight_t = weight.t().contiguous()
        empty = weight.new_empty(0)
        return kernels.Projection(inputs, outputs, weight_t, column, none, none, none, none, empty)
    by_input, order = torch.sort(lags.t().long(), dim=1, stable=True)  # (I, O)
    first = torch.ones_like(by_input, dtype=torch.bool)
    first[:, 1:] = by_input[:, 1:] != by_input[:, :-1]  # a group starts: a new lag of input j
    starts = first.flatten().nonzero().flatten()
    group_start = torch.cat([starts, starts.new_tensor([first.numel()])])
    input_groups = torch.cat([none.new_zeros(1), first.sum(1).cumsum(0)])
    return kernels.Projection(
        inputs,
        outputs,
        weight.new_empty(0),
        none,
        input_groups,
        by_input.flatten()[starts].contiguous(),
        group_start,
        order.flatten().contiguous(),
        weight.t().gather(1, order).flatten().contiguous(),
    )


class IntegerLayer:
    """One layer with integer delays, run over a chunk by the compiled loop (``csrc/ring.cpp``).

    ``size``: neurons ``N``. ``synapses``: feedforward :class:`DelayedSynapses` from ``I``
    inputs, or None (the input is the current, ``I = N``). ``recurrent``: ``(weight (N, N),
    lags)`` with lags ``≥ 1`` steps, ``(N,)`` per presynaptic neuron or ``(N, N)``, or None.
    ``lif``: the neurons, or None for a leaky integrator ``v = leak·v + gain·a`` whose membrane
    is the output (``integrator = (leak, gain)``). Its state: ``inputs`` ``(max feedforward lag,
    B, I)``, ``spikes`` ``(≥ max recurrent lag, B, N)`` and ``v`` ``(B, N)``. ``plan`` is the
    compiled layer; :func:`run_stack` runs several, each feeding the next, in one call.
    """

    def __init__(
        self,
        size: int,
        synapses: DelayedSynapses | None = None,
        recurrent: tuple[Tensor, Tensor] | None = None,
        lif: LIFMap | None = None,
        integrator: tuple[float, float] | None = None,
    ):
        if (lif is None) == (integrator is None):
            raise ValueError("an IntegerLayer has either LIF neurons or a leaky integrator")
        self.kernels = native.load("ring")
        if self.kernels is None:
            raise RuntimeError(native.unavailable("ring"))
        self.size = size
        leak, gain = (lif.leak, lif.gain) if lif is not None else integrator
        absent = self.kernels.Projection()
        feedforward, bias = absent, torch.empty(0)
        if synapses is not None:
            feedforward = _projection(self.kernels, synapses.weight, synapses.lags)
            if synapses.bias is not None:
                bias = synapses.bias.contiguous()
        rec = absent
        if recurrent is not None:
            weight, lags = recurrent
            rec = _projection(self.kernels, weight.detach() * gain, lags.long().expand(size, size))
        p = lif.p if lif is not None else None
        self.plan = self.kernels.Layer(
            feedforward,
            rec,
            bias,
            size,
            p is None,
            gain,
            lif.offset if p is not None else 0.0,
            leak,
            p.v_threshold if p is not None else 0.0,
            (p.v_reset or 0.0) if p is not None else 0.0,
            p.soft_reset if p is not None else False,
        )
        self.no_mask = torch.empty(0)

    def run(
        self,
        x: Tensor,
        v: Tensor,
        inputs: Tensor,
        spikes: Tensor,
        mask: Tensor | None = None,
        into: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Outputs ``(T, B, N)`` (spikes, or the integrator's membrane) of the chunk ``x``
        ``(T, B, I)`` from the state ``v``, ``inputs``, ``spikes``, and the state after it:
        ``(out, v, inputs, spikes)``, new tensors of the same shapes, or ``into`` (which may be
        the state's own tensors, updated in place)."""
        if into is None:
            into = (torch.empty_like(v), torch.empty_like(inputs), torch.empty_like(spikes))
        out = x.new_empty(x.shape[0], x.shape[1], self.size)
        mask = self.no_mask if mask is None else mask.contiguous()
        self.plan.forward(x.contiguous(), mask, v, inputs, spikes, out, *into)
        return (out, *into)


def run_stack(layers: list[IntegerLayer], x: Tensor, states: list) -> list[Tensor]:
    """The outputs ``(T, B, N_l)`` of ``layers`` over the chunk ``x``, each layer feeding the
    next, in one compiled call; ``states[l]``, with fields ``neuron = (v,)``, ``inputs`` and
    ``spikes``, are updated in place."""
    return layers[0].kernels.stack_forward(
        [layer.plan for layer in layers],
        x,
        [s.neuron[0] for s in states],
        [s.inputs for s in states],
        [s.spikes for s in states],
    )


@torch.no_grad()
def cpp_ring_recurrence(
    current: Tensor,
    weight: Tensor,
    delay: Tensor,
    width: Tensor | float,
    neuron: nn.Module,
    mask: Tensor | None = None,
    state: RecurrentState | None = None,
) -> Tensor | tuple[Tensor, RecurrentState]:
    """Path ``cpp-ring``: what :func:`ring_recurrence` computes, in the compiled loop of
    :class:`IntegerLayer` (CPU tensors), recurrent input summed spike by spike."""
    batch, n = current.shape[1:]
    lif = LIFMap.of(neuron.p)
    layer = IntegerLayer(n, recurrent=(weight, 1 + delay.detach().long()), lif=lif)
    empty = current.new_zeros(0, batch, n)
    if state is None:
        v, past, length = current.new_full((batch, n), lif.v0), empty, 0
    else:
        v = state.neuron[0].to(current.dtype).contiguous()  # a state may be a slice or a view
        past = state.spikes.to(current.dtype).contiguous()
        length = kept_history(past, current.shape[0], history_length(delay, 1.0))
    into = (torch.empty_like(v), empty, current.new_empty(length, batch, n))
    spikes, v, _, history = layer.run(current, v, empty, past, mask, into)
    return spikes if state is None else (spikes, RecurrentState((v,), history))


@torch.no_grad()
def ring_recurrence(
    current: Tensor,
    weight: Tensor,
    delay: Tensor,
    width: Tensor | float,
    neuron: nn.Module,
    mask: Tensor | None = None,
    state: RecurrentState | None = None,
) -> Tensor | tuple[Tensor, RecurrentState]:
    """Path ``ring``: integer-delay inference, spikes ``(T, B, N)``, no autograd.

    ``delay`` ``(N,)`` or ``(N, N)`` holds integers (eval mode rounds them) and ``width`` is 1
    (σ = 0): each spike lands exactly ``1 + d`` steps later, read from the window of past spikes
    (:class:`DelayedSynapses`, at most the history and ``2T`` frames), O(B·N) per step plus the
    GEMM. ``neuron`` is the built-in
    :class:`~delrec.neurons.LIF`, ``mask`` ``(B, N)`` or None. From a ``state``
    (:class:`~delrec.engine.state.RecurrentState`) the window starts with its spike history and
    the membrane with its ``v``; the result is then ``(spikes, final state)``.
    """
    steps, batch, n = current.shape
    lif = LIFMap.of(neuron.p)
    history = state.spikes if state is not None else current.new_zeros(0, batch, n)
    lags = (1 + delay.detach().long()).expand(n, n)
    # a lag beyond the history and the chunk reads nothing: capped, so the window stays short
    synapses = DelayedSynapses(weight * lif.gain, lags, horizon=history.shape[0] + steps)
    reach = synapses.max_lag
    window = current.new_zeros(reach + steps, batch, n)  # spikes; row reach + t: step t
    past = history[max(0, history.shape[0] - reach) :]
    window[reach - past.shape[0] : reach] = past
    v = current.new_full((batch, n), lif.v0) if state is None else state.neuron[0].to(current.dtype)
    drive = lif.drive(current)
    spikes = current.new_empty(steps, batch, n, dtype=torch.bool)
    membrane = current.new_empty(batch, n)
    for t in range(steps):
        u = synapses.at(window, reach + t)[0]
        u = drive[t] + (u if mask is None else mask * u)
        h = torch.add(u, v, alpha=lif.leak, out=membrane)
        v = lif.fire_and_reset(h, spikes[t])
        window[reach + t] = spikes[t]
    spikes = spikes.to(current.dtype)
    if state is None:
        return spikes
    length = kept_history(history, steps, history_length(delay, 1.0))
    return spikes, RecurrentState((v.clone(),), next_history(history, spikes, length))
