"""The fast recurrence: hand-written forward/backward over the whole sequence (DESIGN §4).

For the built-in LIF neuron this computes exactly what :func:`reference_recurrence` computes
(same spikes, same gradients, including the kink convention of ``triangle_kernel``), but:

* **axonal / shared delays** — the delayed trace ``z_j[t] = Σ_k κ_j(k) s_j[t-k]`` comes from the
  running sums of DESIGN §4 kept in recursive form: the second difference of a triangle has
  three taps, so each step reads three past spikes per neuron and updates a float64 state,
  O(B·N) whatever σ and L are; then one GEMM ``z Wᵀ``. The backward is a reverse-time loop
  running the same recursion on the future adjoints; the weight gradient is one GEMM over all
  steps, and the delay and spread gradients are sums of the adjoint times integer box sums of
  the spikes recorded during the forward. Saved for backward: pre-spike membrane (the spikes
  are ``h ≥ θ``) and trace (and the int8 box sums when delays/spreads learn), O(T·B·N)
  bytes, independent of the delay range. The time loops run in C++ (``csrc/axonal.cpp``,
  built by :mod:`delrec.engine.native`), or in PyTorch ops where that can't be built.
* **synaptic delays** — by default the slot traces of :mod:`delrec.engine.synaptic` (C++):
  each synapse reads one of a few exact per-neuron traces. Where the C++ kernels can't be
  built, the recurrent input is one GEMM of the window of past spikes (the lags inside some
  kernel's support) with the lag-stacked weighted kernel: O(B·N²·lags) per step, no per-step
  activation storage; the kernel gradient is one GEMM per lag after the loop, and autograd of
  ``triangle_kernel`` carries it to ``W``, ``d`` and the spread.
* **integer delays, no gradient** (eval mode): a ring buffer of the last L spikes,
  O(B·N) per step plus the GEMM (:func:`integer_recurrence`).

Units: time in steps; ``current``/``spikes`` are time-major ``(T, B, N)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from delrec.delays import triangle_kernel
from delrec.engine import native
from delrec.neurons import LIF, ATan, LIFParameters, Triangle


def supports(neuron) -> bool:
    """True if the fast engine runs ``neuron``: exactly the built-in :class:`LIF`, no subclass."""
    return type(neuron) is LIF


# --------------------------------------------------------------------------- LIF as an affine map
@dataclass(frozen=True)
class _LIF:
    """``h = leak·v + gain·u + offset`` (DESIGN §2.1), then fire and reset."""

    leak: float
    gain: float
    offset: float
    v0: float
    p: LIFParameters

    @classmethod
    def of(cls, p: LIFParameters) -> _LIF:
        v_rest = 0.0 if p.soft_reset else p.v_reset
        return cls(
            1.0 - 1.0 / p.tau, 1.0 / p.tau if p.decay_input else 1.0, v_rest / p.tau, v_rest, p
        )

    def drive(self, current: Tensor) -> Tensor:
        """Feedforward part of ``h``: ``gain·c + offset``, ``(T, B, N)``."""
        if self.gain == 1.0 and self.offset == 0.0:
            return current
        return current * self.gain + self.offset

    def fire_and_reset(self, h: Tensor, spikes_out: Tensor) -> Tensor:
        """Writes ``Θ(h - θ)`` into the bool tensor ``spikes_out``; returns ``v[t]``."""
        torch.ge(h, self.p.v_threshold, out=spikes_out)
        if self.p.soft_reset:
            return torch.sub(h, spikes_out.to(h.dtype), alpha=self.p.v_threshold)
        return h.masked_fill(spikes_out, self.p.v_reset)

    def adjoint_step(
        self, grad_s: Tensor, grad_h_next: Tensor, h: Tensor, s: Tensor, out: Tensor
    ) -> Tensor:
        """``∂L/∂h[t]`` into ``out`` from ``∂L/∂s[t]`` (all paths but the reset), ``∂L/∂h[t+1]``.

        With ``gv = leak·∂L/∂h[t+1]`` (the adjoint of ``v[t]``):
        ``∂L/∂h = ψ'(h-θ)·(gs + gv·∂v/∂ŝ) + gv·∂v/∂h``; the ``∂v/∂ŝ`` path is cut by detach_reset.
        """
        p = self.p
        psi = p.surrogate.derivative(h - p.v_threshold)
        gv = grad_h_next * self.leak
        if not p.detach_reset:
            if p.soft_reset:
                grad_s = torch.add(grad_s, gv, alpha=-p.v_threshold)
            else:
                grad_s = torch.addcmul(grad_s, gv, p.v_reset - h)
        if not p.soft_reset:
            gv = torch.where(s, gv.new_zeros(()), gv)
        return torch.addcmul(gv, psi, grad_s, out=out)


# --------------------------------------------------------------------------- axonal plan
class _AxonalPlan:
    """Tap lags and recursion coefficients of the axonal kernels (DESIGN §4).

    For neuron ``j`` with centre ``c = 1 + d`` and half-width ``w`` the lags with non-zero weight
    form a rising box ``[a1, b1] = [max(1, ⌈c-w⌉), max(0, ⌊c⌋)]`` where ``w²κ(k) = α_r + (k-a1)``
    and a falling box ``[b1+1, b2]``, ``b2 = max(⌊c+w⌋, b1)``, where ``w²κ(k) = α_f + (b2-k)``
    (``α_r = w-c+a1``, ``α_f = w+c-b2``, both in ``[0, 1]``). These are the running sums of
    DESIGN §4 (box counts ``A, F`` and ramps) in recursive form: one step shifts each box by one
    lag and changes them by the spikes at three lags ``e = (a1, b1+1, b2+1)`` only (the second
    difference of a triangle has three taps), so with ``Y = w²z`` and ``D = A - F``

        Y[t] = Y[t-1] + D[t-1] + Σ_q γ_q s[t-e_q],     D[t] = D[t-1] + Σ_q (1, -2, 1)_q s[t-e_q],
        γ = (α_r, α_f - α_r + (b2-b1) - (b1-a1+1) - 1, 1 - α_f):

    O(1) per neuron and step whatever σ and L are, in float64 (rounding drift O(T²·ε)).

    The adjoint ``ζ[t] = Σ_k κ(k) g[t+k]`` is the same recursion backwards in time over
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
        b1 = centre.floor().clamp(min=0)
        a1 = (centre - w).ceil().clamp(min=1)
        b2 = torch.maximum((centre + w).floor(), b1)
        e2 = centre.ceil().clamp(min=1) - 1
        self.size = n = delay.shape[0]
        self.steps = steps
        self.lags = torch.stack([a1, b1 + 1, b2 + 1, e2 + 1], dim=1).long()  # (N, 4)
        c64, w64, a1, b1, b2 = centre.double(), w.double(), a1.double(), b1.double(), b2.double()
        self.inv_w2 = 1.0 / (w64 * w64)
        alpha_r, alpha_f = w64 - c64 + a1, w64 + c64 - b2
        gamma = torch.stack(
            [alpha_r, alpha_f - alpha_r + (b2 - b1) - (b1 - a1 + 1) - 1, 1 - alpha_f]
        )
        second = c64.new_tensor([1.0, -2.0, 1.0]).view(3, 1).expand(3, n)
        # (2, 3, N, 1): increments of (z, D/w²) per tapped spike (or adjoint)
        self.trace_coef = (torch.stack([gamma, second]) * self.inv_w2).unsqueeze(-1).contiguous()
        # spikes are 0/1: increments per pattern c = s₀ + 2s₁ + 4s₂ of the three taps, (N, 8)
        codes = torch.arange(8, device=c64.device)
        bits = torch.stack([(codes >> q) & 1 for q in range(3)]).double()  # (3, 8)
        self.z_table, self.d_table = torch.einsum(
            "rqn,qc->rnc", self.trace_coef[..., 0], bits
        ).unbind(0)
        self.native_coef = self.trace_coef[..., 0].transpose(1, 2).contiguous()  # (2, N, 3)
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
class _AxonalRecurrence(torch.autograd.Function):
    """Spikes ``(T, B, N)`` of a LIF layer with axonal delays; gradients by a reverse loop.

    The time loops run in C++ (``csrc/axonal.cpp``) when :mod:`~delrec.engine.native` could
    build it, and otherwise in PyTorch ops; both compute the same thing, with the tap
    recursions neuron-major (the ``B`` values a tap reads are one contiguous row). Saved for
    backward: the pre-spike membrane (the spikes are ``h ≥ θ``) and the delayed trace,
    ``(T, B, N)`` each, and the integer box sums when delays/spreads learn — nothing that grows
    with the delay range.
    """

    @staticmethod
    def forward(ctx, current, weight, delay, width, mask, lif: _LIF, gpu=None):
        need_d, need_s = ctx.needs_input_grad[2:4]
        plan = _AxonalPlan(delay, width, current.shape[0])
        kernels = native.load("axonal") if current.device.type == "cpu" else None
        loop = _forward_loop if kernels is None else _native_forward
        loop = loop if gpu is None else gpu.forward_loop
        spikes, membrane, trace, slope, support = loop(
            current, weight, mask, lif, plan, need_d, need_s
        )
        ctx.lif, ctx.native, ctx.gpu = lif, kernels is not None, gpu
        ctx.save_for_backward(membrane, trace, slope, support, weight, delay, width, mask)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        membrane, trace, slope, support, weight, delay, width, mask = ctx.saved_tensors
        lif: _LIF = ctx.lif
        n = weight.shape[0]
        need_c, need_w, need_d, need_s = ctx.needs_input_grad[:4]
        plan = _AxonalPlan(delay, width, trace.shape[0])
        loop = _native_backward if ctx.native else _backward_loop
        loop = loop if ctx.gpu is None else ctx.gpu.backward_loop
        grad_h, by_slope, by_support, by_trace = loop(
            grad_spikes.contiguous(),
            membrane,
            trace,
            slope,
            support,
            weight * lif.gain,
            mask,
            lif,
            plan,
        )

        grad_current = (grad_h if lif.gain == 1.0 else grad_h * lif.gain) if need_c else None
        grad_weight = grad_delay = grad_width = None
        if need_w:
            grad_r = grad_h if mask is None else grad_h * mask
            grad_weight = lif.gain * (grad_r.reshape(-1, n).t() @ trace.reshape(-1, n))
        if need_d:  # ∂z/∂c = E/w²
            grad_delay = (by_slope * plan.inv_w2).to(delay.dtype)
        if need_s:  # ∂z/∂w = K/w² - 2z/w
            grad_width = (by_support * plan.inv_w2 - 2.0 * by_trace / width.double()).to(
                width.dtype
            )
        return grad_current, grad_weight, grad_delay, grad_width, None, None, None


def _native_forward(
    current, weight, mask, lif: _LIF, plan: _AxonalPlan, need_d: bool, need_s: bool
):
    """The forward time loop in C++. Returns spikes, membrane and trace ``(T, B, N)`` and the
    neuron-major box sums ``(T+1, N, B)`` (None when not needed)."""
    steps, batch, n = current.shape
    spikes, trace, membrane = (current.new_empty(steps, batch, n) for _ in range(3))  # contiguous
    history = current.new_empty(steps + 1, n, batch, dtype=torch.bool)  # the taps' spikes
    slope, support = (
        current.new_empty((steps + 1, n, batch) if need else (0,), dtype=plan.count_dtype)
        for need in (need_d, need_s)
    )
    p = lif.p
    native.load("axonal").forward(
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
        spikes,
        history,
        membrane,
        trace,
        slope,
        support,
    )
    return spikes, membrane, trace, slope if need_d else None, support if need_s else None


def _native_backward(
    grad_spikes, membrane, trace, slope, support, weight_in, mask, lif: _LIF, plan: _AxonalPlan
):
    """The reverse time loop in C++ on what :func:`_native_forward` saved: ``∂L/∂h``
    ``(T, B, N)`` and the per-neuron sums ``Σ ∂L/∂z·E``, ``Σ ∂L/∂z·K``, ``Σ ∂L/∂z·z`` (float64,
    None when not needed) behind the delay and spread gradients."""
    p = lif.p
    surrogate = {Triangle: (1, "gamma"), ATan: (2, "alpha")}.get(type(p.surrogate))
    if surrogate is None:  # any other surrogate: ψ' precomputed by its own code
        code, param = 0, 0.0
        psi = p.surrogate.derivative(membrane - p.v_threshold).contiguous()
    else:
        code, param, psi = surrogate[0], getattr(p.surrogate, surrogate[1]), membrane.new_empty(0)
    empty = plan.lags.new_empty(0, dtype=plan.count_dtype)
    grad_h = torch.empty_like(trace)
    sums = torch.zeros(3, plan.size, dtype=torch.float64)
    native.load("axonal").backward(
        grad_spikes,
        membrane,
        psi,
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
        trace,
        empty if slope is None else slope,
        empty if support is None else support,
        grad_h,
        sums,
    )
    by_slope, by_support, by_trace = sums
    return (
        grad_h,
        by_slope if slope is not None else None,
        *((by_support, by_trace) if support is not None else (None, None)),
    )


def _forward_loop(current, weight, mask, lif: _LIF, plan: _AxonalPlan, need_d: bool, need_s: bool):
    """The forward time loop in PyTorch ops: what :func:`_native_forward` returns, but the
    membrane batch-major ``(T, B, N)``."""
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
    spikes = history[1:].transpose(1, 2).to(current.dtype)
    return spikes, membrane, trace, slope, support


def _backward_loop(
    grad_spikes, membrane, trace, slope, support, weight_in, mask, lif: _LIF, plan: _AxonalPlan
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
    return grad_h, by_slope, by_support, by_trace


# --------------------------------------------------------------------------- synaptic function
class _SynapticRecurrence(torch.autograd.Function):
    """Spikes of a LIF layer with per-synapse delays, from the lag-stacked weighted kernel.

    ``kernel[i, j, l]`` is ``W_ij κ_ij(kmin + l)`` for the lags ``kmin … kmin + nl - 1`` that
    hold every kernel's closed support; its gradient goes back through autograd of
    ``triangle_kernel``.
    """

    @staticmethod
    def forward(ctx, current, kernel, kmin: int, mask, lif: _LIF):
        steps, batch, n = current.shape
        lags = kernel.shape[-1]
        kmax = kmin + lags - 1
        dtype = current.dtype
        # row (l, j) of the stack multiplies the spikes of j at time t - kmax + l
        stacked = (kernel * lif.gain).flip(-1).permute(2, 1, 0).reshape(lags * n, n)
        drive = lif.drive(current)
        window = current.new_zeros(batch, kmax + steps, n)  # spike at time u in slot kmax + u
        spikes = current.new_empty(steps, batch, n, dtype=torch.bool)
        membrane = torch.empty_like(current)
        v = current.new_full((batch, n), lif.v0)
        for t in range(steps):
            past = window[:, t : t + lags].reshape(batch, lags * n)
            if mask is None:
                u = torch.addmm(drive[t], past, stacked)
            else:
                u = torch.addcmul(drive[t], mask, torch.mm(past, stacked))
            h = torch.add(u, v, alpha=lif.leak, out=membrane[t])
            v = lif.fire_and_reset(h, spikes[t])
            window[:, kmax + t] = spikes[t]
        ctx.lif, ctx.kmin = lif, kmin
        ctx.save_for_backward(spikes, membrane, kernel, mask)
        return spikes.to(dtype)

    @staticmethod
    def backward(ctx, grad_spikes):
        spikes, membrane, kernel, mask = ctx.saved_tensors
        lif: _LIF = ctx.lif
        kmin = ctx.kmin
        steps, batch, n = membrane.shape
        lags = kernel.shape[-1]
        kmax = kmin + lags - 1
        stacked_t = (kernel * lif.gain).flip(-1).permute(2, 1, 0).reshape(lags * n, n).t()
        recurrent = membrane.new_zeros(batch, kmax + steps, n)  # adjoint of window
        grad_h = torch.empty_like(membrane)
        gh = membrane.new_zeros(batch, n)
        for t in range(steps - 1, -1, -1):
            gh = lif.adjoint_step(
                grad_spikes[t] + recurrent[:, kmax + t], gh, membrane[t], spikes[t], out=grad_h[t]
            )
            g = gh if mask is None else gh * mask
            recurrent[:, t : t + lags].view(batch, lags * n).addmm_(g, stacked_t)
        grad_current = grad_h * lif.gain if ctx.needs_input_grad[0] else None
        grad_kernel = None
        if ctx.needs_input_grad[1]:
            grad_r = (grad_h if mask is None else grad_h * mask) * lif.gain
            s = spikes.to(membrane.dtype)
            grad_kernel = torch.zeros_like(kernel)
            for lag in range(lags):
                k = kmin + lag
                if k < steps:
                    grad_kernel[:, :, lag] = grad_r[k:].reshape(-1, n).t() @ s[: steps - k].reshape(
                        -1, n
                    )
        return grad_current, grad_kernel, None, None, None


# --------------------------------------------------------------------------- public API
def _width_vector(width: Tensor | float, like: Tensor, n: int) -> Tensor:
    width = torch.as_tensor(width, dtype=like.dtype, device=like.device)
    return width.expand(n) if width.dim() == 0 else width


def synaptic_support(delay: Tensor, width: Tensor) -> tuple[int, int]:
    """Smallest and largest lag in the closed support ``|k - (1+d)| ≤ w`` of any synapse (≥ 1)."""
    centre = 1.0 + delay.detach()
    w = width.detach()
    kmin = max(1, int((centre - w).ceil().min()))
    kmax = max(kmin, int((centre + w).floor().max()))
    return kmin, kmax


def fast_recurrence(
    current: Tensor,
    weight: Tensor,
    delay: Tensor,
    width: Tensor | float,
    params: LIFParameters,
    mask: Tensor | None = None,
) -> Tensor:
    """Spikes ``(T, B, N)`` of a recurrent LIF layer with delays, differentiable in every input.

    current: feedforward current ``(T, B, N)``; weight: ``(N, N)`` (row = postsynaptic);
    delay: steps, ``(N,)`` per presynaptic neuron (axonal) or ``(N, N)`` per synapse;
    width: kernel half-width in steps, a number or ``(N,)`` per presynaptic neuron;
    params: the LIF parameters; mask: recurrent dropout ``(B, N)`` fixed over time, or None.
    Same result as :func:`delrec.engine.reference_recurrence` with ``triangle_kernel``.
    """
    n = weight.shape[0]
    width = _width_vector(width, delay, n)
    lif = _LIF.of(params)
    if delay.dim() == 1:
        return _AxonalRecurrence.apply(current, weight, delay, width, mask, lif)
    from delrec.engine.synaptic import synaptic_recurrence  # it builds on this module

    spikes = synaptic_recurrence(current, weight, delay, width, params, mask)
    if spikes is not None:  # the C++ slot traces ran
        return spikes
    kmin, kmax = synaptic_support(delay, width)
    kernel = weight.unsqueeze(-1) * triangle_kernel(delay, width.expand(n, n), kmax + 1)[..., kmin:]
    return _SynapticRecurrence.apply(current, kernel, kmin, mask, lif)


@torch.no_grad()
def integer_recurrence(
    current: Tensor,
    weight: Tensor,
    delay: Tensor,
    params: LIFParameters,
    mask: Tensor | None = None,
) -> Tensor:
    """Integer-delay inference (σ = 0, delays already rounded): spikes ``(T, B, N)``, no autograd.

    Each spike lands exactly ``1 + d`` steps later. Axonal delays ``(N,)`` read one slot per
    neuron of a ring buffer of the last L spikes (O(B·N) per step, then one GEMM); synaptic
    delays ``(N, N)`` multiply the contiguous window of a doubled ring buffer by the
    lag-stacked weights of the lags in use.
    """
    steps, batch, n = current.shape
    dtype = current.dtype
    lif = _LIF.of(params)
    drive = lif.drive(current)
    lag = 1 + delay.detach().long()
    slots = int(lag.max()) + 1
    spikes = current.new_empty(steps, batch, n, dtype=torch.bool)
    v = current.new_full((batch, n), lif.v0)
    membrane = current.new_empty(batch, n)
    if delay.dim() == 1:
        weight_t = (weight * lif.gain).t()
        ring = current.new_zeros(batch, slots * n)  # spike at time u in slot u mod L
        phase = torch.arange(slots, device=lag.device).view(slots, 1)
        # (L, N): where s[t - lag] sits at phase t mod L
        read = ((phase - lag) % slots) * n + torch.arange(n, device=lag.device)
        for t in range(steps):
            slot = t % slots
            u = torch.mm(ring.index_select(1, read[slot]), weight_t)
            u = drive[t] + (u if mask is None else mask * u)
            h = torch.add(u, v, alpha=lif.leak, out=membrane)
            v = lif.fire_and_reset(h, spikes[t])
            ring[:, slot * n : (slot + 1) * n] = spikes[t]
        return spikes.to(dtype)
    kmin, kmax = int(lag.min()), int(lag.max())
    lags = kmax - kmin + 1
    taps = torch.arange(kmax, kmin - 1, -1, device=lag.device).view(
        1, 1, lags
    )  # window order: oldest first
    stacked = ((weight * lif.gain).unsqueeze(-1) * (lag.unsqueeze(-1) == taps)).permute(2, 1, 0)
    stacked = stacked.reshape(lags * n, n)
    ring = current.new_zeros(batch, 2 * slots, n)  # each spike frame stored twice
    for t in range(steps):
        slot = t % slots  # frames t-L … t-1 sit in slots slot … slot+L-1
        past = ring[:, slot + slots - kmax : slot + slots - kmin + 1].reshape(batch, lags * n)
        u = torch.mm(past, stacked)
        u = drive[t] + (u if mask is None else mask * u)
        h = torch.add(u, v, alpha=lif.leak, out=membrane)
        v = lif.fire_and_reset(h, spikes[t])
        ring[:, slot] = spikes[t]
        ring[:, slot + slots] = spikes[t]
    return spikes.to(dtype)
