"""The fast recurrence: hand-written forward/backward over the whole sequence (DESIGN §4).

For the built-in LIF neuron this computes exactly what :func:`reference_recurrence` computes
(same spikes, same gradients, including the kink convention of ``triangle_kernel``), but:

* **axonal / shared delays** — the delayed trace ``z_j[t] = Σ_k κ_j(k) s_j[t-k]`` is read from
  running sums ``P0[m] = Σ_{u<m} s[u]`` and ``P1[m] = Σ_{u<m} u·s[u]`` (exact integers held
  in float64) at three boundaries per neuron, whatever σ and L are: O(B·N) per step, then
  one GEMM ``z @ Wᵀ``. The backward is a reverse-time loop whose adjoint trace uses the same
  running-sum formula on future adjoints; weight, delay and spread gradients are formed after
  the loop, batched over time, from box sums of the spikes. Saved for backward: the spikes
  (bool), the pre-spike membrane and the trace, O(T·B·N) bytes, independent of the delay range.
* **synaptic delays** — each synapse has its own lag, so the recurrent input is one GEMM of
  the window of the last spikes (only the lags inside some kernel's support) with the
  lag-stacked weighted kernel: O(B·N²·lags) per step, but no per-step activation storage;
  the kernel gradient is one GEMM per lag after the loop, and autograd of ``triangle_kernel``
  carries it to ``W``, ``d`` and the spread.
* **integer delays, no gradient** (eval mode): a ring buffer of the last L spikes,
  O(B·N) per step plus the GEMM (:func:`integer_recurrence`).

Units: time in steps; ``current``/``spikes`` are time-major ``(T, B, N)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from delrec.delays import triangle_kernel
from delrec.neurons import LIF, LIFParameters

_CHUNK_ELEMENTS = 1 << 22  # float64 elements per batched post-loop chunk (32 MiB)


def supports(neuron) -> bool:
    """True if the fast engine runs ``neuron``: exactly our built-in :class:`LIF` (not subclasses)."""
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
    def of(cls, p: LIFParameters) -> "_LIF":
        v_rest = 0.0 if p.soft_reset else p.v_reset
        return cls(1.0 - 1.0 / p.tau, 1.0 / p.tau if p.decay_input else 1.0, v_rest / p.tau, v_rest, p)

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

    def adjoint_factors(self, spikes: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(ψ'(h - θ), leak·dv/dh_total)`` for all steps: ``gh[t] = gs[t]·ψ' + gh[t+1]·M[t]``."""
        p = self.p
        psi = p.surrogate.derivative(h - p.v_threshold)
        s = spikes.to(h.dtype)
        dv_dh = torch.ones_like(h) if p.soft_reset else 1.0 - s
        if not p.detach_reset:
            dv_ds = torch.full_like(h, -p.v_threshold) if p.soft_reset else p.v_reset - h
            dv_dh = dv_dh + dv_ds * psi
        return psi, self.leak * dv_dh


# --------------------------------------------------------------------------- axonal plan
class _AxonalPlan:
    """Boundaries and recursion coefficients of the axonal kernels (DESIGN §4).

    For neuron ``j`` with centre ``c = 1 + d`` and half-width ``w`` the lags with non-zero weight
    form a rising box ``[a1, b1] = [max(1, ⌈c-w⌉), max(0, ⌊c⌋)]`` where ``w²κ(k) = α_r + (k-a1)``
    and a falling box ``[b1+1, b2]``, ``b2 = max(⌊c+w⌋, b1)``, where ``w²κ(k) = α_f + (b2-k)``
    (``α_r = w-c+a1``, ``α_f = w+c-b2``, both in ``[0, 1]``). Shifting the boxes by one step
    changes the running sums ``A, F`` (spike counts in the boxes) and ``Ar, Fr`` (their ramps)
    by the spikes at only three lags ``e = (a1, b1+1, b2+1)``; hence, with ``Y = w²z`` and
    ``D = A - F``,

        Y[t] = Y[t-1] + D[t-1] + Σ_q γ_q s[t - e_q],     D[t] = D[t-1] + Σ_q (1, -2, 1)_q s[t - e_q]

    with ``γ = (α_r, α_f - α_r + (b2-b1) - (b1-a1+1) - 1, 1 - α_f)``: O(1) per neuron and step
    whatever σ and L are (the second difference of a triangle has three taps). The adjoint trace
    ``ζ[t] = Σ_k κ(k) g[t+k]`` is the same recursion run backwards in time over ``g[t + e_q]``.
    Both run in float64 (rounding drift O(T²·ε)).

    Gradient boxes follow autograd of ``triangle_kernel`` at the kinks: ``∂κ(k)/∂c`` is
    ``+1/w²`` on ``(c, c+w]``, ``-1/w²`` on ``[c-w, c)`` and 0 at ``k = c``; ``∂κ/∂w`` is
    ``1/w² - 2κ/w`` on the closed support ``[a1, b2]``. Their box sums are read from exact spike
    counts ``P0[m] = Σ_{u<m} s[u]`` at lags ``o = (b2, b1, a1-1, max(⌈c⌉, 1)-1)``.

    Per-step tensors are neuron-major ``(N, B)`` so that every read is a contiguous row.
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
        self.box_offsets = torch.stack([b2, b1, a1 - 1, e2], dim=1).long()  # (N, 4)
        self.tap_lags = torch.stack([a1, b1 + 1, b2 + 1], dim=1).long()  # (N, 3)
        c64, w64, a1, b1, b2 = centre.double(), w.double(), a1.double(), b1.double(), b2.double()
        self.inv_w2 = 1.0 / (w64 * w64)
        alpha_r, alpha_f = w64 - c64 + a1, w64 + c64 - b2
        gamma = torch.stack([alpha_r, alpha_f - alpha_r + (b2 - b1) - (b1 - a1 + 1) - 1, 1 - alpha_f], 1)
        second = torch.tensor([1.0, -2.0, 1.0], dtype=torch.float64).expand(n, 3)
        # (N, 2, 3, 1): increments of (z, D/w²) per tapped spike
        self.tap_coef = (torch.stack([gamma, second], 1) * self.inv_w2.view(n, 1, 1)).unsqueeze(-1)

    def tap_rows(self, sign: int) -> Tensor:
        """``(T, 3N)`` rows to read at each step from a ``((T+1)·N, B)`` history: forward
        (``sign = -1``) reads time ``t - e`` at slot ``t - e + 1`` (slot 0 is zero); reverse
        (``sign = +1``) reads time ``t + e`` at slot ``t + e`` (slot T is zero)."""
        n, steps = self.size, self.steps
        t = torch.arange(steps).view(steps, 1, 1)
        slots = (t - self.tap_lags + 1).clamp(min=0) if sign < 0 else (t + self.tap_lags).clamp(max=steps)
        return (slots * n + torch.arange(n).view(n, 1)).view(steps, 3 * n)

    def spike_boxes(self, counts: Tensor, t0: int, t1: int) -> tuple[Tensor, Tensor]:
        """For steps ``t0 … t1-1``, from ``counts`` ``((T+1)·N, B)`` (row ``m·N + n`` = P0[m]):
        ``w²·∂z/∂c`` (spikes on ``(c, c+w]`` minus on ``[c-w, c)``) and the closed-support count
        ``Σ_{|k-c|≤w} s[t-k]``, each ``(t1-t0, N, B)``."""
        n, steps = self.size, t1 - t0
        t = torch.arange(t0, t1).view(steps, 1, 1)
        rows = (t - self.box_offsets).clamp(min=0) * n + torch.arange(n).view(1, n, 1)
        p0 = counts.index_select(0, rows.view(-1)).view(steps, n, 4, -1)
        fall_minus_rise = p0[:, :, 1] - p0[:, :, 0] - p0[:, :, 2] + p0[:, :, 3]
        return fall_minus_rise, p0[:, :, 2] - p0[:, :, 0]


def _swap(x: Tensor) -> Tensor:
    """``(…, B, N)`` ↔ ``(…, N, B)``, contiguous."""
    return x.transpose(-1, -2).contiguous()


# --------------------------------------------------------------------------- axonal function
class _AxonalRecurrence(torch.autograd.Function):
    """Spikes ``(T, B, N)`` of a LIF layer with axonal delays; gradients by a reverse loop.

    Saved for backward: spikes (bool), pre-spike membrane and delayed trace, ``(T, N, B)`` each.
    """

    @staticmethod
    def forward(ctx, current, weight, delay, width, mask, lif: _LIF):
        steps, batch, n = current.shape
        dtype = current.dtype
        plan = _AxonalPlan(delay, width, steps)
        rows = plan.tap_rows(-1)
        drive = _swap(lif.drive(current))  # (T, N, B)
        mask_nb = None if mask is None else _swap(mask)
        weight_in = weight * lif.gain
        history = torch.empty(steps + 1, n, batch, dtype=torch.bool)  # slot t+1: spikes of step t
        history[0] = False
        taps_of = history.view(-1, batch)
        membrane = torch.empty(steps, n, batch, dtype=dtype)
        trace = torch.empty(steps, n, batch, dtype=dtype)
        state = torch.zeros(n, 2, batch, dtype=torch.float64)  # (z, D/w²)
        z64, d64 = state[:, 0], state[:, 1]
        v = torch.full((n, batch), lif.v0, dtype=dtype)
        for t in range(steps):
            taps = taps_of.index_select(0, rows[t]).view(n, 1, 3, batch)
            z64 += d64
            state += (taps * plan.tap_coef).sum(2)
            z = trace[t].copy_(z64)
            if mask_nb is None:
                u = torch.addmm(drive[t], weight_in, z)
            else:
                u = torch.addcmul(drive[t], mask_nb, torch.mm(weight_in, z))
            h = torch.add(u, v, alpha=lif.leak, out=membrane[t])
            v = lif.fire_and_reset(h, history[t + 1])
        ctx.lif = lif
        spikes = history[1:]
        ctx.save_for_backward(spikes, membrane, trace, weight, delay, width, mask_nb)
        return _swap(spikes).to(dtype)

    @staticmethod
    def backward(ctx, grad_spikes):
        spikes, membrane, trace, weight, delay, width, mask = ctx.saved_tensors
        lif: _LIF = ctx.lif
        steps, n, batch = membrane.shape
        plan = _AxonalPlan(delay, width, steps)
        rows = plan.tap_rows(+1)
        weight_in_t = (weight * lif.gain).t()
        psi, carry = lif.adjoint_factors(spikes, membrane)
        external = psi * _swap(grad_spikes)
        grad_h = torch.empty_like(membrane)
        future = torch.empty(steps + 1, n, batch, dtype=membrane.dtype)  # slot t: gz[t]; slot T: 0
        future[steps] = 0.0
        taps_of = future.view(-1, batch)
        state = torch.zeros(n, 2, batch, dtype=torch.float64)  # (ζ, D/w²) of the adjoint
        zeta, d64 = state[:, 0], state[:, 1]
        gh = torch.zeros(n, batch, dtype=membrane.dtype)
        for t in range(steps - 1, -1, -1):
            taps = taps_of.index_select(0, rows[t]).view(n, 1, 3, batch)
            zeta += d64
            state += (taps * plan.tap_coef).sum(2)
            gh = torch.addcmul(torch.addcmul(external[t], zeta, psi[t]), gh, carry[t], out=grad_h[t])
            torch.mm(weight_in_t, gh if mask is None else gh * mask, out=future[t])
        del psi, carry, external, state
        grad_z = future[:steps]

        need_c, need_w, need_d, need_s = ctx.needs_input_grad[:4]
        grad_current = _swap(grad_h * lif.gain) if need_c else None
        grad_weight = grad_delay = grad_width = None
        if need_w:
            grad_r = grad_h if mask is None else grad_h * mask
            grad_weight = lif.gain * (grad_r.transpose(0, 1).reshape(n, -1)
                                      @ trace.transpose(0, 1).reshape(n, -1).t())
        if need_d or need_s:
            counts = torch.zeros(steps + 1, n, batch, dtype=membrane.dtype)  # exact spike counts P0
            torch.cumsum(spikes, 0, out=counts[1:])
            counts = counts.view(-1, batch)
            by_delay = torch.zeros(n, dtype=torch.float64)   # Σ gz · w²∂z/∂c
            by_support = torch.zeros(n, dtype=torch.float64)  # Σ gz · Σ_{|k-c|≤w} s[t-k]
            chunk = max(1, _CHUNK_ELEMENTS // (4 * batch * n))
            for t0 in range(0, steps, chunk):
                t1 = min(steps, t0 + chunk)
                fall_minus_rise, closed = plan.spike_boxes(counts, t0, t1)
                by_delay += (grad_z[t0:t1] * fall_minus_rise).sum(2).sum(0)
                by_support += (grad_z[t0:t1] * closed).sum(2).sum(0)
            if need_d:
                grad_delay = (by_delay * plan.inv_w2).to(delay.dtype)
            if need_s:  # ∂z/∂w = (closed-support count)/w² - 2z/w
                by_trace = (grad_z * trace).sum(2).sum(0).double()
                grad_width = (by_support * plan.inv_w2 - 2.0 * by_trace / width.double()).to(width.dtype)
        return grad_current, grad_weight, grad_delay, grad_width, None, None


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
        window = torch.zeros(batch, kmax + steps, n, dtype=dtype)  # spike at time u in slot kmax + u
        spikes = torch.empty(steps, batch, n, dtype=torch.bool)
        membrane = torch.empty_like(current)
        v = torch.full((batch, n), lif.v0, dtype=dtype)
        for t in range(steps):
            past = window[:, t:t + lags].reshape(batch, lags * n)
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
        psi, carry = lif.adjoint_factors(spikes, membrane)
        external = grad_spikes * psi
        recurrent = torch.zeros(batch, kmax + steps, n, dtype=membrane.dtype)  # adjoint of window
        grad_h = torch.empty_like(membrane)
        gh = None
        for t in range(steps - 1, -1, -1):
            if gh is None:
                gh = grad_h[t].copy_(external[t])
            else:
                gh = torch.addcmul(torch.addcmul(external[t], recurrent[:, kmax + t], psi[t]), gh,
                                   carry[t], out=grad_h[t])
            g = gh if mask is None else gh * mask
            recurrent[:, t:t + lags].view(batch, lags * n).addmm_(g, stacked_t)
        grad_current = grad_h * lif.gain if ctx.needs_input_grad[0] else None
        grad_kernel = None
        if ctx.needs_input_grad[1]:
            grad_r = (grad_h if mask is None else grad_h * mask) * lif.gain
            s = spikes.to(membrane.dtype)
            grad_kernel = torch.zeros_like(kernel)
            for l in range(lags):
                k = kmin + l
                if k < steps:
                    grad_kernel[:, :, l] = grad_r[k:].reshape(-1, n).t() @ s[:steps - k].reshape(-1, n)
        return grad_current, grad_kernel, None, None, None


# --------------------------------------------------------------------------- public API
def _width_vector(width: Tensor | float, like: Tensor, n: int) -> Tensor:
    width = torch.as_tensor(width, dtype=like.dtype)
    return width.expand(n) if width.dim() == 0 else width


def synaptic_support(delay: Tensor, width: Tensor) -> tuple[int, int]:
    """Smallest and largest lag in the closed support ``|k - (1+d)| ≤ w`` of any synapse (≥ 1)."""
    centre = 1.0 + delay.detach()
    w = width.detach()
    kmin = max(1, int((centre - w).ceil().min()))
    kmax = max(kmin, int((centre + w).floor().max()))
    return kmin, kmax


def fast_recurrence(current: Tensor, weight: Tensor, delay: Tensor, width: Tensor | float,
                    params: LIFParameters, mask: Tensor | None = None) -> Tensor:
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
    kmin, kmax = synaptic_support(delay, width)
    kernel = weight.unsqueeze(-1) * triangle_kernel(delay, width.expand(n, n), kmax + 1)[..., kmin:]
    return _SynapticRecurrence.apply(current, kernel, kmin, mask, lif)


@torch.no_grad()
def integer_recurrence(current: Tensor, weight: Tensor, delay: Tensor, params: LIFParameters,
                       mask: Tensor | None = None) -> Tensor:
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
    spikes = torch.empty(steps, batch, n, dtype=torch.bool)
    v = torch.full((batch, n), lif.v0, dtype=dtype)
    membrane = torch.empty(batch, n, dtype=dtype)
    if delay.dim() == 1:
        weight_t = (weight * lif.gain).t()
        ring = torch.zeros(batch, slots * n, dtype=dtype)  # spike at time u in slot u mod L
        phase = torch.arange(slots).view(slots, 1)
        read = ((phase - lag) % slots) * n + torch.arange(n)  # (L, N): where s[t - lag] sits
        for t in range(steps):
            slot = t % slots
            u = torch.mm(ring.index_select(1, read[slot]), weight_t)
            u = drive[t] + (u if mask is None else mask * u)
            h = torch.add(u, v, alpha=lif.leak, out=membrane)
            v = lif.fire_and_reset(h, spikes[t])
            ring[:, slot * n:(slot + 1) * n] = spikes[t]
        return spikes.to(dtype)
    kmin, kmax = int(lag.min()), int(lag.max())
    lags = kmax - kmin + 1
    taps = torch.arange(kmax, kmin - 1, -1).view(1, 1, lags)  # window order: oldest first
    stacked = ((weight * lif.gain).unsqueeze(-1) * (lag.unsqueeze(-1) == taps)).permute(2, 1, 0)
    stacked = stacked.reshape(lags * n, n)
    ring = torch.zeros(batch, 2 * slots, n, dtype=dtype)  # each spike frame stored twice
    for t in range(steps):
        slot = t % slots  # frames t-L … t-1 sit in slots slot … slot+L-1
        past = ring[:, slot + slots - kmax: slot + slots - kmin + 1].reshape(batch, lags * n)
        u = torch.mm(past, stacked)
        u = drive[t] + (u if mask is None else mask * u)
        h = torch.add(u, v, alpha=lif.leak, out=membrane)
        v = lif.fire_and_reset(h, spikes[t])
        ring[:, slot] = spikes[t]
        ring[:, slot + slots] = spikes[t]
    return spikes.to(dtype)
