"""The fast recurrence: hand-written forward/backward over the whole sequence (DESIGN §4).

For the built-in LIF neuron this computes exactly what :func:`reference_recurrence` computes
(same spikes, same gradients, including the kink convention of ``triangle_kernel``), but:

* **axonal / shared delays** — the delayed trace ``z_j[t] = Σ_k κ_j(k) s_j[t-k]`` is read from
  running sums ``P0[m] = Σ_{u<m} s[u]`` and ``P1[m] = Σ_{u<m} u·s[u]`` (exact integers held
  in float64) at three boundaries per neuron, whatever σ and L are: O(B·N) per step, then
  one GEMM ``z @ Wᵀ``. The backward is a reverse-time loop whose adjoint trace uses the same
  running-sum formula on future adjoints; weight, delay and spread gradients are formed after
  the loop, batched over time, from box sums of the spikes. Saved for backward: the spikes
  (bool) and the pre-spike membrane, O(T·B·N) bytes, independent of the delay range.
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

_TAU = (1.0, -2.0, 1.0)  # weights of the three running-sum boundaries (fall end, centre, rise start)
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
        return torch.where(spikes_out, self.p.v_reset, h)

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
    """Box boundaries and running-sum coefficients of the axonal kernels (DESIGN §4).

    For neuron ``j`` with centre ``c = 1 + d`` and half-width ``w`` the lags with non-zero weight
    are the rising part ``[a1, b1] = [max(1, ⌈c-w⌉), max(0, ⌊c⌋)]`` and the falling part
    ``[b1+1, b2]``, ``b2 = max(⌊c+w⌋, b1)``. With ``m_q = t - o_q`` and offsets
    ``o = (b2, b1, a1-1)`` the trace is

        w²·z[t] = Σ_q β_q P0[m_q] + τ_q (t·P0[m_q] - P1[m_q]),  β = (-(w+c), 2c, w-c), τ = (1,-2,1)

    and the reverse adjoint ``w²·ζ[t] = Σ_k κ(k) g[t+k]`` is the mirror image with reverse
    running sums ``R0[n] = Σ_{v≥n} g[v]``, ``R1[n] = Σ_{v≥n} v·g[v]`` at ``n_q = t + o_q + 1``:

        w²·ζ[t] = Σ_q (β_q - t·τ_q) R0[n_q] + τ_q R1[n_q].

    Gradient boxes follow autograd of ``triangle_kernel`` at the kinks: ``∂κ(k)/∂c`` is
    ``+1/w²`` on ``(c, c+w]``, ``-1/w²`` on ``[c-w, c)`` and 0 at ``k = c``, so the rising box
    of the derivative ends at ``e2 = max(⌈c⌉, 1) - 1`` (fourth offset); ``∂κ/∂w`` is
    ``1/w² - 2κ/w`` on the closed support ``[a1, b2]``.
    """

    def __init__(self, delay: Tensor, width: Tensor, steps: int):
        centre = 1.0 + delay.detach()  # in the parameter dtype, like triangle_kernel
        w = width.detach()
        b1 = centre.floor().clamp(min=0)
        a1 = (centre - w).ceil().clamp(min=1)
        b2 = torch.maximum((centre + w).floor(), b1)
        e2 = centre.ceil().clamp(min=1) - 1
        self.offsets = torch.stack([b2, b1, a1 - 1, e2]).long()  # (4, N), all >= 0
        self.pad = int(self.offsets.max()) + 1
        n = delay.shape[0]
        self.size = n
        c64, w64 = centre.double(), w.double()
        self.width = w64
        self.inv_w2 = 1.0 / (w64 * w64)
        beta = torch.stack([-(w64 + c64), 2.0 * c64, w64 - c64]) * self.inv_w2  # (3, N)
        tau = torch.tensor(_TAU, dtype=torch.float64).view(3, 1) * self.inv_w2  # (3, N)
        t = torch.arange(steps, dtype=torch.float64).view(steps, 1, 1)
        # per-step coefficients on (P0, P1) at the three boundaries: (T, 3, 1, 2, N)
        self.forward_coef = torch.stack([beta + t * tau, (-tau).expand(steps, 3, n)], dim=2).unsqueeze(2)
        self.reverse_coef = torch.stack([beta - t * tau, tau.expand(steps, 3, n)], dim=2).unsqueeze(2)
        self.forward_index = (self.pad - self.offsets[:3]).view(1, 3, 1, 1, n) + t.long().view(steps, 1, 1, 1, 1)
        self.reverse_index = (self.offsets[:3] + 1).view(1, 3, 1, 1, n) + t.long().view(steps, 1, 1, 1, 1)

    def history(self, batch: int, steps: int) -> Tensor:
        """Zeroed running sums ``(pad + steps + 1, B, 2, N)`` float64; slot ``pad + m`` holds ``P[m]``."""
        return torch.zeros(self.pad + steps + 1, batch, 2, self.size, dtype=torch.float64)

    def prefix_sums(self, spikes: Tensor) -> Tensor:
        """Running sums ``(P0, P1)`` of all spikes ``(T, B, N)``, laid out as :meth:`history`."""
        steps = spikes.shape[0]
        s = spikes.double()
        t = torch.arange(steps, dtype=torch.float64).view(steps, 1, 1)
        history = self.history(spikes.shape[1], steps)
        history[self.pad + 1:, :, 0] = s.cumsum(0)
        history[self.pad + 1:, :, 1] = (s * t).cumsum(0)
        return history

    def traces(self, history: Tensor, t0: int, t1: int) -> tuple[Tensor, Tensor, Tensor]:
        """For steps ``t0 … t1-1``: the trace ``z``, ``∂z/∂c`` and the closed-support count
        ``Σ_{|k-c|≤w} s[t-k]``, each ``(t1-t0, B, N)`` float64."""
        batch = history.shape[1]
        steps = t1 - t0
        t = torch.arange(t0, t1).view(steps, 1, 1, 1)
        index = (self.pad - self.offsets).view(1, 4, 1, self.size) + t  # (steps, 4, 1, N)
        p0 = history[:, :, 0].gather(0, index.reshape(steps * 4, 1, self.size).expand(-1, batch, -1))
        p0 = p0.view(steps, 4, batch, self.size)
        p1 = history[:, :, 1].gather(0, index[:, :3].reshape(steps * 3, 1, self.size).expand(-1, batch, -1))
        p1 = p1.view(steps, 3, batch, self.size)
        coef = self.forward_coef[t0:t1].squeeze(2)  # (steps, 3, 2, N)
        z = (p0[:, :3] * coef[:, :, 0].unsqueeze(2) + p1 * coef[:, :, 1].unsqueeze(2)).sum(1)
        dz_dc = (p0[:, 1] - p0[:, 0] - p0[:, 2] + p0[:, 3]) * self.inv_w2
        closed = p0[:, 2] - p0[:, 0]
        return z, dz_dc, closed


# --------------------------------------------------------------------------- axonal function
class _AxonalRecurrence(torch.autograd.Function):
    """Spikes ``(T, B, N)`` of a LIF layer with axonal delays; gradients by a reverse loop."""

    @staticmethod
    def forward(ctx, current, weight, delay, width, mask, lif: _LIF):
        steps, batch, n = current.shape
        dtype = current.dtype
        plan = _AxonalPlan(delay, width, steps)
        drive = lif.drive(current)
        weight_t = (weight * lif.gain).t()
        history = plan.history(batch, steps)
        spikes = torch.empty(steps, batch, n, dtype=torch.bool)
        membrane = torch.empty_like(current)
        ones_t = torch.stack([torch.ones(steps, dtype=torch.float64),
                              torch.arange(steps, dtype=torch.float64)], dim=1).view(steps, 1, 2, 1)
        v = torch.full((batch, n), lif.v0, dtype=dtype)
        pad = plan.pad
        for t in range(steps):
            taps = history.gather(0, plan.forward_index[t].expand(3, batch, 2, n))
            z = (taps * plan.forward_coef[t]).sum((0, 2)).to(dtype)
            if mask is None:
                u = torch.addmm(drive[t], z, weight_t)
            else:
                u = torch.addcmul(drive[t], mask, torch.mm(z, weight_t))
            h = torch.add(u, v, alpha=lif.leak, out=membrane[t])
            v = lif.fire_and_reset(h, spikes[t])
            torch.addcmul(history[pad + t], spikes[t].unsqueeze(1).to(torch.float64), ones_t[t],
                          out=history[pad + t + 1])
        ctx.lif = lif
        ctx.save_for_backward(spikes, membrane, weight, delay, width, mask)
        return spikes.to(dtype)

    @staticmethod
    def backward(ctx, grad_spikes):
        spikes, membrane, weight, delay, width, mask = ctx.saved_tensors
        lif: _LIF = ctx.lif
        steps, batch, n = membrane.shape
        dtype = membrane.dtype
        plan = _AxonalPlan(delay, width, steps)
        weight_in = weight * lif.gain
        psi, carry = lif.adjoint_factors(spikes, membrane)
        external = grad_spikes * psi
        # reverse running sums of the trace adjoint gz, slot n holds (R0[n], R1[n])
        future = torch.zeros(steps + plan.pad + 1, batch, 2, n, dtype=torch.float64)
        ones_t = torch.stack([torch.ones(steps, dtype=torch.float64),
                              torch.arange(steps, dtype=torch.float64)], dim=1).view(steps, 1, 2, 1)
        grad_h = torch.empty_like(membrane)
        grad_z = torch.empty_like(membrane)
        gh = None
        for t in range(steps - 1, -1, -1):
            if gh is None:
                gh = grad_h[t].copy_(external[t])
            else:
                taps = future.gather(0, plan.reverse_index[t].expand(3, batch, 2, n))
                zeta = (taps * plan.reverse_coef[t]).sum((0, 2)).to(dtype)
                gh = torch.addcmul(torch.addcmul(external[t], zeta, psi[t]), gh, carry[t], out=grad_h[t])
            g = gh if mask is None else gh * mask
            torch.mm(g, weight_in, out=grad_z[t])
            torch.addcmul(future[t + 1], grad_z[t].unsqueeze(1).to(torch.float64), ones_t[t], out=future[t])
        del future, psi, carry, external

        grad_current = grad_h * lif.gain if ctx.needs_input_grad[0] else None
        grad_r = grad_h if mask is None else grad_h * mask
        need_w, need_d, need_s = ctx.needs_input_grad[1:4]
        grad_weight = torch.zeros_like(weight) if need_w else None
        grad_delay = torch.zeros(n, dtype=torch.float64) if need_d else None
        grad_width = torch.zeros(n, dtype=torch.float64) if need_s else None
        if need_w or need_d or need_s:
            history = plan.prefix_sums(spikes)
            chunk = max(1, _CHUNK_ELEMENTS // (8 * batch * n))
            for t0 in range(0, steps, chunk):
                t1 = min(steps, t0 + chunk)
                z, dz_dc, closed = plan.traces(history, t0, t1)
                if need_w:
                    grad_weight += grad_r[t0:t1].reshape(-1, n).t() @ z.to(dtype).reshape(-1, n)
                gz = grad_z[t0:t1].double()
                if need_d:
                    grad_delay += (gz * dz_dc).sum((0, 1))
                if need_s:
                    grad_width += (gz * (closed * plan.inv_w2 - 2.0 * z / plan.width)).sum((0, 1))
            if need_w:
                grad_weight *= lif.gain
        return (grad_current, grad_weight,
                grad_delay.to(delay.dtype) if need_d else None,
                grad_width.to(width.dtype) if need_s else None, None, None)


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
