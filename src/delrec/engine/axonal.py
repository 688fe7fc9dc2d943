"""Axonal and shared delays: a hand-written forward/backward over the whole sequence.

For the built-in LIF neuron this computes exactly what the reference loop computes (same
spikes, same gradients, including the kink convention of ``triangle_kernel``), but the delayed
trace ``z_j[t] = Σ_k κ_j(k) s_j[t-k]`` comes from the running sums (docs/design.md#running-sums)
kept in recursive form: the second difference of a triangle has three taps
(:func:`delrec.engine.lif.triangle_taps`), so each step reads three past spikes per neuron and
updates a float64 state, O(B·N) whatever σ and L are; then one GEMM ``z Wᵀ``. The backward is
a reverse-time loop running the same recursion on the future adjoints; the weight gradient is
a GEMM over the steps (``cpp-axonal`` adds it a batch of steps at a time, docs/engine.md), and
the delay and spread gradients are sums of the adjoint times
integer box sums of the spikes recorded during the forward. Saved for backward: pre-spike
membrane (the spikes are ``h ≥ θ``) and trace (and the int8 box sums when delays/spreads
learn), O(T·B·N) bytes, independent of the delay range.

Three engine paths run it, each with its own time loops (:class:`TimeLoops`): ``cpp-axonal``
(:func:`cpp_recurrence`, the time loops in ``csrc/axonal.cpp``, built by
:mod:`delrec.engine.native`), ``torch-axonal`` (:func:`torch_recurrence`, the same loops in
PyTorch ops, any device) and ``triton-axonal`` (:mod:`delrec.engine.triton.axonal`, CUDA).

Units: time in steps; ``current``/``spikes`` are time-major ``(T, B, N)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import ModuleType

import torch
from torch import Tensor, nn

from delrec.engine import native
from delrec.engine.autograd import RECURRENT, first_order
from delrec.engine.dropout import MaskDraw
from delrec.engine.dropout import native as native_mask
from delrec.engine.lif import LIFMap, triangle_taps, width_vector
from delrec.engine.state import RecurrentState, empty_batch_safe, run_lif


# --------------------------------------------------------------------------- axonal plan
class _AxonalPlan:
    """Tap lags and recursion coefficients of the axonal kernels, one trace per neuron.

    The trace taps and increments are those of :func:`delrec.engine.lif.triangle_taps`. The
    adjoint ``ζ[t] = Σ_k κ(k) g[t+k]`` is the same recursion backwards in time over
    ``g[t+e_q]``. The gradients follow autograd of ``triangle_kernel`` at the kinks: ``∂κ(k)/∂c``
    is ``ε(k)/w²`` with ``ε = +1`` on ``(c, c+w]``, ``-1`` on ``[c-w, c)`` and 0 at ``k = c``, and
    ``∂κ/∂w = [|k-c| ≤ w]/w² - 2κ/w``. The box sums ``E[t] = Σ_k ε(k) s[t-k]`` and
    ``K[t] = Σ_{k=a1}^{b2} s[t-k]`` are exact integer recursions with taps at
    ``(a1, b1+1, b2+1, e2+1)``, ``e2 = max(⌈c⌉, 1) - 1`` (the last lag of the rising box of ε):
    ``E += -s₀ + s₁ - s₂ + s₃`` and ``K += s₀ - s₂``; then ``∂L/∂c = Σ g·E / w²``.
    """

    def __init__(self, delay: Tensor, width: Tensor, steps: int):
        centre = 1.0 + delay.detach()  # in the parameter dtype, like triangle_kernel
        w = width.detach()
        self.size = delay.shape[0]
        self.steps = steps
        lags, increments = triangle_taps(centre, w)  # (N, 3), (N, 2, 3)
        e2 = centre.ceil().clamp(min=1) - 1
        self.lags = torch.cat([lags, (e2 + 1).long().unsqueeze(1)], 1)  # (N, 4)
        w64 = w.double()
        self.inv_w2 = 1.0 / (w64 * w64)
        # (2, 3, N, 1): increments of (z, D/w²) per tapped spike (or adjoint)
        self.trace_coef = increments.permute(1, 2, 0).unsqueeze(-1).contiguous()
        # spikes are 0/1: increments per pattern c = s₀ + 2s₁ + 4s₂ of the three taps, (N, 8)
        codes = torch.arange(8, device=delay.device)
        bits = torch.stack([(codes >> q) & 1 for q in range(3)]).double()  # (3, 8)
        self.z_table, self.d_table = torch.einsum(
            "rqn,qc->rnc", self.trace_coef[..., 0], bits
        ).unbind(0)
        self.native_coef = increments.transpose(0, 1).contiguous()  # (2, N, 3)
        # the gradient statistics are small integers: |ε-sum| ≤ w + 1, closed count ≤ 2w + 2
        self.count_dtype = torch.int8 if 2 * float(w.max()) + 2 <= 127 else torch.int16

    def tap_rows(self, taps: int, sign: int) -> Tensor:
        """``(T, taps·N)`` rows (tap-major) to read at each step from a ``((T+1)·N, B)`` history:
        forward (``sign = -1``) reads time ``t - e`` at slot ``t - e + 1`` (slot 0 is zero);
        reverse (``sign = +1``) reads time ``t + e`` at slot ``t + e`` (slot T is zero)."""
        n, steps = self.size, self.steps
        t = torch.arange(steps, device=self.lags.device).view(steps, 1, 1)
        lags = self.lags[:, :taps].t()  # (taps, N)
        slots = (t - lags + 1).clamp(min=0) if sign < 0 else (t + lags).clamp(max=steps)
        return (slots * n + torch.arange(n, device=self.lags.device)).reshape(steps, taps * n)


# --------------------------------------------------------------------------- axonal function
@dataclass(frozen=True)
class TimeLoops:
    """The two time loops of a path.

    ``forward(current, weight, mask, lif, plan, need_d, need_s)`` returns spikes, membrane and
    trace ``(T, B, N)`` and the box sums ``E``, ``K`` ``(T+1, …)`` (None when not needed, in the
    loops' own layout); a forward that drops its input or its spikes itself also takes
    ``input_dropout=`` or ``output_dropout=`` (and returns the dropped spikes), and so does the
    backward after it;
    ``backward(grad_spikes, membrane, trace, slope, support, weight_in, mask, lif, plan)``
    returns ``∂L/∂h`` ``(T, B, N)`` and the float64 sums ``Σ ∂L/∂z·E``, ``Σ ∂L/∂z·K``,
    ``Σ ∂L/∂z·z`` ``(N,)`` (None when not needed), and a dict of what the loop computed besides
    (``"weight"``: ``Σ (∂L/∂h ⊙ mask)ᵀ z`` ``(N, N)``, from a loop with ``weight_in_loop``,
    given ``need_weight=True``; ``"current"``: ``∂L/∂current``, given ``input_dropout=`` after a
    forward that dropped its input); the caller computes what is missing. A loop that returns
    ``"current"`` returns None for ``∂L/∂h``.
    """

    forward: Callable
    backward: Callable
    weight_in_loop: bool = False


class _AxonalRecurrence(torch.autograd.Function):
    """Spikes ``(T, B, N)`` of a LIF layer with axonal delays, and its membrane after the last
    step ``(B, N)`` (no gradient); gradients by a reverse loop.

    ``loops`` run the time loops (in C++, PyTorch ops or Triton); all compute the same thing.
    Saved for backward: the pre-spike membrane (the spikes are ``h ≥ θ``) and the delayed
    trace, ``(T, B, N)`` each, and the integer box sums when delays/spreads learn — nothing
    that grows with the delay range. ``input_dropout``: ``loops.forward`` and
    ``loops.backward`` (which must take it) drop the current with this mask and return the
    gradient of the current itself, the mask applied in the reverse loop; ``output_dropout``:
    they return the spikes dropped with this mask, and take the gradient of the dropped spikes.
    """

    @staticmethod
    def forward(
        ctx,
        current,
        weight,
        delay,
        width,
        mask,
        lif: LIFMap,
        loops: TimeLoops,
        input_dropout: MaskDraw | None = None,
        output_dropout: MaskDraw | None = None,
    ):
        need_d, need_s = ctx.needs_input_grad[2:4]
        plan = _AxonalPlan(delay, width, current.shape[0])
        dropping = {
            name: draw
            for name, draw in (("input_dropout", input_dropout), ("output_dropout", output_dropout))
            if draw is not None
        }
        spikes, membrane, trace, slope, support = loops.forward(
            current, weight, mask, lif, plan, need_d, need_s, **dropping
        )
        ctx.lif, ctx.loops, ctx.dropping = lif, loops, dropping
        ctx.save_for_backward(membrane, trace, slope, support, weight, delay, width, mask)
        # the last step's spikes themselves (the returned ones may be dropped): h ≥ θ, compared
        # in the membrane's dtype as the loops compare them
        v_last = lif.reset(membrane[-1], membrane[-1] >= lif.p.v_threshold)
        ctx.mark_non_differentiable(v_last)
        return spikes, v_last

    @staticmethod
    @first_order(*RECURRENT)
    def backward(ctx, grad_spikes, _grad_v_last):
        membrane, trace, slope, support, weight, delay, width, mask = ctx.saved_tensors
        lif: LIFMap = ctx.lif
        n = weight.shape[0]
        need_c, need_w, need_d, need_s = ctx.needs_input_grad[:4]
        plan = _AxonalPlan(delay, width, trace.shape[0])
        options = dict(ctx.dropping)
        if ctx.loops.weight_in_loop:
            options["need_weight"] = need_w
        grad_h, by_slope, by_support, by_trace, extras = ctx.loops.backward(
            grad_spikes.contiguous(),
            membrane,
            trace,
            slope,
            support,
            weight * lif.gain,
            mask,
            lif,
            plan,
            **options,
        )

        grad_current = None
        if need_c and "current" in extras:
            grad_current = extras["current"]
        elif need_c:
            grad_current = grad_h if lif.gain == 1.0 else grad_h * lif.gain
        grad_weight = grad_delay = grad_width = None
        if need_w and "weight" in extras:
            grad_weight = lif.gain * extras["weight"]
        elif need_w:
            grad_r = grad_h if mask is None else grad_h * mask
            grad_weight = lif.gain * (grad_r.reshape(-1, n).t() @ trace.reshape(-1, n))
        if need_d:  # ∂z/∂c = E/w²
            grad_delay = (by_slope * plan.inv_w2).to(delay.dtype)
        if need_s:  # ∂z/∂w = K/w² - 2z/w
            grad_width = (by_support * plan.inv_w2 - 2.0 * by_trace / width.double()).to(
                width.dtype
            )
        return grad_current, grad_weight, grad_delay, grad_width, None, None, None, None, None


def _native_forward(
    kernels: ModuleType,
    current,
    weight,
    mask,
    lif: LIFMap,
    plan: _AxonalPlan,
    need_d: bool,
    need_s: bool,
    input_dropout: MaskDraw | None = None,
    output_dropout: MaskDraw | None = None,
):
    """The forward time loop in C++. Returns spikes, membrane and trace ``(T, B, N)`` and the
    neuron-major box sums ``(T+1, N, B)`` (None when not needed). ``input_dropout``: the loop
    drops the current with this mask (the neuron's drive must be the current itself);
    ``output_dropout``: it returns the spikes dropped with this mask."""
    steps, batch, n = current.shape
    spikes, trace, membrane = (current.new_empty(steps, batch, n) for _ in range(3))  # contiguous
    history = current.new_empty(steps + 1, n, batch, dtype=torch.bool)  # the taps' spikes
    slope, support = (
        current.new_empty((steps + 1, n, batch) if need else (0,), dtype=plan.count_dtype)
        for need in (need_d, need_s)
    )
    p = lif.p
    kernels.forward(
        lif.drive(current).contiguous(),
        (weight * lif.gain).contiguous(),
        mask,
        plan.lags,
        plan.native_coef,
        lif.leak,
        lif.v0,
        p.v_threshold,
        p.v_reset or 0.0,
        p.soft_reset,
        native_mask(input_dropout, current.dtype),
        native_mask(output_dropout, current.dtype),
        spikes,
        history,
        membrane,
        trace,
        slope,
        support,
    )
    return spikes, membrane, trace, slope if need_d else None, support if need_s else None


def _native_backward(
    kernels: ModuleType,
    grad_spikes,
    membrane,
    trace,
    slope,
    support,
    weight_in,
    mask,
    lif: LIFMap,
    plan: _AxonalPlan,
    input_dropout: MaskDraw | None = None,
    output_dropout: MaskDraw | None = None,
    need_weight: bool = True,
):
    """The reverse time loop in C++ on what :func:`_native_forward` saved: ``∂L/∂h``
    ``(T, B, N)`` and the per-neuron sums ``Σ ∂L/∂z·E``, ``Σ ∂L/∂z·K``, ``Σ ∂L/∂z·z`` (the
    last as the equal ``Σ s·ζ``, csrc/axonal.cpp: adjoint_block) (float64,
    None when not needed) behind the delay and spread gradients, and the extras the loop
    computes while ``∂L/∂h[t]`` is in cache: the weight gradient ``Σ (∂L/∂h ⊙ mask)ᵀ z``
    ``(N, N)`` (given ``need_weight``), and with ``input_dropout`` ``∂L/∂current = ∂L/∂h ⊙`` its
    mask (the drive is the current), in which case ``∂L/∂h`` itself is not written (None).
    ``output_dropout``: ``grad_spikes`` is the gradient of the spikes dropped with this mask."""
    p = lif.p
    code, param, psi = lif.native_slope(membrane)  # any other surrogate: ψ' precomputed
    empty = plan.lags.new_empty(0, dtype=plan.count_dtype)
    n = trace.shape[-1]
    grad_weight = trace.new_empty((n, n) if need_weight else (0,))
    dropping = input_dropout is not None
    grad_current = torch.empty_like(trace) if dropping else trace.new_empty(0)
    grad_h = trace.new_empty(0) if dropping else torch.empty_like(trace)
    sums = torch.zeros(3, plan.size, dtype=torch.float64)
    kernels.backward(
        grad_spikes,
        membrane,
        psi.contiguous(),
        weight_in.contiguous(),
        mask,
        plan.lags,
        plan.native_coef,
        lif.leak,
        p.v_threshold,
        p.v_reset or 0.0,
        p.soft_reset,
        p.detach_reset,
        code,
        param,
        empty if slope is None else slope,
        empty if support is None else support,
        native_mask(input_dropout, trace.dtype),
        native_mask(output_dropout, trace.dtype),
        trace,
        grad_h,
        grad_weight,
        grad_current,
        sums,
    )
    by_slope, by_support, by_trace = sums
    extras = {"weight": grad_weight} if need_weight else {}
    if dropping:
        extras["current"] = grad_current
    return (
        None if dropping else grad_h,
        by_slope if slope is not None else None,
        *((by_support, by_trace) if support is not None else (None, None)),
        extras,
    )


def _forward_loop(
    current, weight, mask, lif: LIFMap, plan: _AxonalPlan, need_d: bool, need_s: bool
):
    """The forward time loop in PyTorch ops: what :func:`_native_forward` returns."""
    steps, batch, n = current.shape
    rows = plan.tap_rows(4 if need_d else 3, -1)
    drive = lif.drive(current)
    weight_in_t = (weight * lif.gain).t()
    history = current.new_empty(steps + 1, n, batch, dtype=torch.bool)  # slot t+1: spikes of step t
    history[0] = False
    taps_of = history.view(-1, batch)
    membrane = torch.empty_like(current)
    trace = torch.empty_like(current)
    # slot t+1: E[t] = w²·∂z[t]/∂c and K[t] (closed-support spike count), exact integers
    slope = current.new_zeros(steps + 1, n, batch, dtype=plan.count_dtype) if need_d else None
    support = current.new_zeros(steps + 1, n, batch, dtype=plan.count_dtype) if need_s else None
    state = current.new_zeros(2, n, batch, dtype=torch.float64)  # (z, D/w²)
    v = current.new_full((batch, n), lif.v0)
    for t in range(steps):
        taps = taps_of.index_select(0, rows[t]).view(-1, n, batch)
        bits = taps.view(torch.int8)
        pattern = torch.add(bits[0], bits[1], alpha=2).add_(bits[2], alpha=4).long()
        state[0] += state[1]
        state[0] += plan.z_table.gather(1, pattern)
        state[1] += plan.d_table.gather(1, pattern)
        z = trace[t].t().copy_(state[0]).t()
        if mask is None:
            u = torch.addmm(drive[t], z, weight_in_t)
        else:
            u = torch.addcmul(drive[t], mask, torch.mm(z, weight_in_t))
        h = torch.add(u, v, alpha=lif.leak, out=membrane[t])
        v = lif.fire_and_reset(h, history[t + 1].t())
        if need_d:
            torch.sub(slope[t], bits[0], out=slope[t + 1]).add_(bits[1]).sub_(bits[2]).add_(bits[3])
        if need_s:
            torch.add(support[t], bits[0], out=support[t + 1]).sub_(bits[2])
    spikes = history[1:].transpose(1, 2).to(current.dtype, memory_format=torch.contiguous_format)
    return spikes, membrane, trace, slope, support


def _backward_loop(
    grad_spikes, membrane, trace, slope, support, weight_in, mask, lif: LIFMap, plan: _AxonalPlan
):
    """The reverse time loop in PyTorch ops; same outputs as :func:`_native_backward`."""
    steps, batch, n = membrane.shape
    rows = plan.tap_rows(3, +1)
    future = membrane.new_empty(steps + 1, n, batch)  # slot t: ∂L/∂z[t]; slot T: 0
    future[steps] = 0.0
    taps_of = future.view(-1, batch)
    grad_h = torch.empty_like(membrane)
    zeta = membrane.new_empty(n, batch)
    grad_s = membrane.new_empty(batch, n)
    state = membrane.new_zeros(2, n, batch, dtype=torch.float64)  # (ζ, D/w²) of the adjoint
    gh = membrane.new_zeros(batch, n)
    for t in range(steps - 1, -1, -1):
        taps = taps_of.index_select(0, rows[t]).view(3, n, batch)
        state[0] += state[1]
        state += (taps * plan.trace_coef).sum(1)
        torch.add(grad_spikes[t], zeta.copy_(state[0]).t(), out=grad_s)
        spiked = membrane[t] >= lif.p.v_threshold
        gh = lif.adjoint_step(grad_s, gh, membrane[t], spiked, out=grad_h[t])
        torch.mm(weight_in.t(), (gh if mask is None else gh * mask).t(), out=future[t])
    grad_z = future[:steps]  # (T, N, B)
    by_slope = by_support = by_trace = None
    if slope is not None:
        by_slope = (grad_z * slope[1:]).sum((0, 2), dtype=torch.float64)
    if support is not None:
        by_support = (grad_z * support[1:]).sum((0, 2), dtype=torch.float64)
        by_trace = torch.einsum("tnb,tbn->n", grad_z.double(), trace.double())
    return grad_h, by_slope, by_support, by_trace, {}


# --------------------------------------------------------------------------- engine paths
@empty_batch_safe
def cpp_recurrence(
    current: Tensor,
    weight: Tensor,
    delay: Tensor,
    width: Tensor | float,
    neuron: nn.Module,
    mask: Tensor | None = None,
    state: RecurrentState | None = None,
    input_dropout: MaskDraw | None = None,
    output_dropout: MaskDraw | None = None,
):
    """Path ``cpp-axonal``: spikes ``(T, B, N)`` of a recurrent LIF layer with delays ``(N,)``
    per presynaptic neuron, the time loops in C++ (CPU tensors), differentiable in every input.

    ``current``: feedforward current ``(T, B, N)``; ``weight``: ``(N, N)`` (row =
    postsynaptic); ``delay``: steps, ``(N,)``; ``width``: kernel half-width in steps, a number
    or ``(N,)``; ``neuron``: the built-in :class:`~delrec.neurons.LIF`; ``mask``: recurrent
    dropout ``(B, N)`` fixed over time, or None. Same result as the reference loop with
    ``triangle_kernel``. With a ``state`` (:class:`~delrec.engine.state.RecurrentState`) it
    starts from it and returns ``(spikes, final state)``. ``input_dropout``: per-element
    dropout of ``current`` (:mod:`delrec.engine.dropout`), drawn inside the forward loop, from
    rest and when the neuron's drive is the current itself (``LIFMap.drives_directly``); the
    backward loop draws it again and returns the gradient of ``current`` itself, the mask
    applied.
    ``output_dropout``: per-element dropout of the spikes, drawn inside both loops, from rest:
    the layer returns the dropped spikes (the recurrence runs on the spikes themselves).
    """
    kernels = native.load("axonal")
    if kernels is None:
        raise RuntimeError(native.unavailable("axonal"))
    if input_dropout is not None and (state is not None or not LIFMap.of(neuron.p).drives_directly):
        raise ValueError(
            "input_dropout is drawn in the loop only from rest and when the neuron's drive is "
            "the current itself (gain 1, offset 0): drop the current in front instead "
            "(delrec.engine.fused.dropped)"
        )
    if output_dropout is not None and state is not None:
        raise ValueError(
            "output_dropout is drawn in the loop only from rest: drop the spikes behind the layer "
            "instead (delrec.engine.fused.dropped)"
        )
    loops = TimeLoops(
        partial(_native_forward, kernels), partial(_native_backward, kernels), weight_in_loop=True
    )
    return run_loops(
        loops, current, weight, delay, width, neuron, mask, state, input_dropout, output_dropout
    )


def torch_recurrence(
    current: Tensor,
    weight: Tensor,
    delay: Tensor,
    width: Tensor | float,
    neuron: nn.Module,
    mask: Tensor | None = None,
    state: RecurrentState | None = None,
):
    """Path ``torch-axonal``: what :func:`cpp_recurrence` computes, the time loops in PyTorch
    ops (any device)."""
    return run_loops(TORCH_LOOPS, current, weight, delay, width, neuron, mask, state)


TORCH_LOOPS = TimeLoops(_forward_loop, _backward_loop)


def run_loops(
    loops: TimeLoops,
    current: Tensor,
    weight: Tensor,
    delay: Tensor,
    width: Tensor | float,
    neuron: nn.Module,
    mask: Tensor | None = None,
    state: RecurrentState | None = None,
    input_dropout: MaskDraw | None = None,
    output_dropout: MaskDraw | None = None,
):
    """The differentiable recurrence (arguments of :func:`cpp_recurrence`) on ``loops``, from
    rest or from ``state`` (:func:`delrec.engine.state.run_lif`); ``input_dropout`` and
    ``output_dropout`` only for loops that draw them themselves, from rest."""
    width = width_vector(width, delay, weight.shape[0])
    lif = LIFMap.of(neuron.p)

    def run(current: Tensor) -> tuple[Tensor, Tensor]:
        return _AxonalRecurrence.apply(
            current, weight, delay, width, mask, lif, loops, input_dropout, output_dropout
        )

    return run_lif(run, current, weight, delay, width, lif, mask, state)
