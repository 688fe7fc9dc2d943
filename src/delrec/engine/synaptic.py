"""Synaptic delays without a GEMM per lag: each synapse reads one of a few shared traces.

For per-synapse delays (``delay (N, N)``, row = postsynaptic ``i``, column = presynaptic ``j``)
the kernel ``κ_c(k) = max(0, w - |k - c|)/w²`` (``c = 1 + d_ij``, half-width ``w_j``) is, for
every integer lag ``k``, piecewise linear in the centre ``c`` with kinks where ``c``, ``c - w``
or ``c + w`` is an integer. Between two kinks it is exactly linear, with slope ``ε(k)/w²``
(``ε = sign(k - c)`` on the closed support ``|k - c| ≤ w``, 0 elsewhere). So the synapses of
neuron ``j`` fall into a few **slots** — one per pattern of ``(closed support, ε)``, i.e. per
interval between kinks, plus one per integer centre (where ``ε(c) = 0``) — and a synapse of
slot ``s`` with centre ``c`` sees

    z_ij[t] = Σ_k κ_c(k) s_j[t-k] = Z_s[t] + (c - G_s)/w² · E_s[t],

where ``G_s`` is a centre in the slot, ``Z_s[t] = Σ_k κ_{G_s}(k) s_j[t-k]`` and
``E_s[t] = Σ_k ε_s(k) s_j[t-k]`` (an exact integer). Both are O(1) recursions per step
over three and four tapped spikes (the triangle's second difference; the ε-boxes' first
difference), so a step costs O(slots·B) recursion work plus two multiply-adds of length ``B``
per synapse, instead of a GEMM of width ``lags·N``. The slots follow autograd of
:func:`~delrec.delays.triangle_kernel` exactly at the kinks: a centre on a kink sits in the slot
whose pattern the reference convention gives it (``|x|' = 0`` at 0, the clamp passes the
gradient at 0), which is the left interval for ``c - w`` integer, the right one for ``c + w``
integer and a slot of its own for ``c`` integer.

Gradients (``ḡ_i[t] = ∂L/∂h_i[t]·m_i``, ``γ`` = the LIF input gain), from per-synapse sums
``D0 = Σ_t,b ḡ_i Z_s`` and ``D1 = Σ_t,b ḡ_i E_s`` of a second sweep over the traces:

    ∂L/∂W_ij = γ (D0 + (c - G_s)/w² · D1)        ∂L/∂d_ij = γ W_ij D1 / w²
    ∂L/∂w_j  = Σ_t,s K_s·x_s / w² - (2/w) Σ_i W_ij ∂L/∂W_ij

with ``x_s = γ Σ_{i ∈ s} W_ij ḡ_i`` (the adjoint of ``Z_s``) and ``K_s`` the spike count over
the slot's closed support. The adjoint of the spikes is one float64 recursion per neuron fed by
injections of ``x_s`` and of ``e_s = Σ_{i ∈ s} b_ij ḡ_i`` at the slot's taps. Saved for
backward: spike history (bool) and membrane, ``T·B·N`` each, plus the plan (``O(N²)`` and
``O(slots)``); the backward holds ``∂L/∂r`` ``(N, T, B)``, the spike counts and a ring of ``L``
injection rows — nothing of size ``T·L`` per synapse.

Cost per step: about ``6·N²·B`` multiply-adds (forward sums, backward sums, gradient dots; the
axonal engine's three GEMMs are ``3·N²·B``) plus ``O(slots·B)``. The slot count per neuron
grows with the delay range: one or two per step of range when ``w = 1 + σ`` is an integer or a
half-integer, two or three otherwise (kinks below lag 1 don't count).

Time loops are in C++ (``csrc/synaptic.cpp``, built by :mod:`~delrec.engine.native`, run on
``torch.get_num_threads()`` threads): path ``cpp-synaptic``, :func:`cpp_recurrence`. Path
``torch-synaptic`` (:func:`torch_recurrence`, PyTorch ops, any device) computes the recurrent
input as one GEMM of the window of past spikes (the lags inside some kernel's support) with the
lag-stacked weighted kernel: O(B·N²·lags) per step, no per-step activation storage; the kernel
gradient is one GEMM per lag after the loop, and autograd of ``triangle_kernel`` carries it to
``W``, ``d`` and the spread. Units: steps; sequences are time-major ``(T, B, N)``.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor, nn

from delrec.delays import kernel_support as synaptic_support
from delrec.delays import triangle_kernel
from delrec.engine import native
from delrec.engine.lif import LIFMap, triangle_taps, width_vector
from delrec.engine.state import RecurrentState, run_lif


class _SlotPlan:
    """Slots of every presynaptic neuron and what each synapse reads (module docstring).

    Per synapse ``(i, j)``: ``offset = (c - G_s)/w²`` (float64, ``(N, N)``). Per slot, grouped
    by owner ``j`` (``owner_start``, ``(N+1,)``): the triangle taps
    of ``Z_s`` at centre ``G_s`` (``z_lags (S, 3)``, ``z_coef (S, 6)``: increments of z and of
    its slope, as in :func:`delrec.engine.lif.triangle_taps`), the ε-box taps
    ``e_lags (S, 4)`` = ``(lo, e+1, f, hi+1)`` with signs ``(-, +, +, -)`` (ε = -1 on
    ``[lo, e]``, +1 on ``[f, hi]``), the closed support ``support (S, 2) = (lo, hi)``, and the
    members (``member_start (S+1,)``, ``member`` = postsynaptic ``i``, int32, and ``order``, the
    row-major synapse index of each member), and ``slot_of (N, N)`` (int32), the slot each
    synapse reads. ``ring`` exceeds every tap lag. The slots and members come from the C++
    ``plan`` (one pass over the synapses, no sort); the taps from them here.
    """

    def __init__(self, delay: Tensor, width: Tensor, kernels: ModuleType):
        n = delay.shape[0]
        centre = (1.0 + delay.detach()).double()  # in the parameter dtype, like triangle_kernel
        w = width.detach().double()
        (
            self.owner_start,
            self.slot_of,
            first,
            pattern,
            self.member_start,
            self.member,
            self.order,
        ) = kernels.plan(centre.contiguous(), w.expand(n).contiguous())
        lo, hi, rises, falls = pattern.unbind(1)
        self.inv_w2 = 1.0 / (w * w)
        self.offset = (centre - first[self.slot_of.long()]) * self.inv_w2  # (c - G_s)/w², (N, N)
        owner = torch.repeat_interleave(torch.arange(n), self.owner_start.diff())
        self.z_lags, increments = triangle_taps(first, w.expand(n)[owner])
        self.z_coef = increments.view(-1, 6)
        self.e_lags = torch.stack([lo, rises + 1, falls, hi + 1], 1).contiguous()
        self.support = torch.stack([lo, hi], 1).contiguous()
        self.ring = int(max(self.z_lags.max(), self.e_lags.max())) + 1

    def coefficients(self, weight: Tensor, gain: float) -> tuple[Tensor, Tensor]:
        """``a = gain·W`` and ``b = gain·W·(c - G_s)/w²`` of every synapse, ``(N, N)`` each."""
        a = (weight.detach() * gain).contiguous()
        return a, (a.double() * self.offset).to(a.dtype)

    def by_slot(self, per_synapse: Tensor) -> Tensor:
        """An ``(N, N)`` per-synapse tensor flattened in member order (grouped by slot)."""
        return per_synapse.flatten()[self.order].contiguous()

    def native(self) -> tuple[Tensor, ...]:
        """The plan tensors in the order the C++ functions take them."""
        return (
            self.owner_start,
            self.z_lags,
            self.z_coef,
            self.e_lags,
            self.support,
            self.member_start,
            self.member,
        )


class _SynapticSlots(torch.autograd.Function):
    """Spikes ``(T, B, N)`` of a LIF layer with per-synapse delays, by slot traces (module doc),
    and its membrane after the last step ``(B, N)`` (no gradient)."""

    @staticmethod
    def forward(ctx, current, weight, delay, width, mask, lif: LIFMap, kernels):
        steps, batch, n = current.shape
        plan = _SlotPlan(delay, width, kernels)
        a, b = plan.coefficients(weight, lif.gain)
        spikes = current.new_empty(steps, batch, n)  # contiguous, whatever current's strides
        history = current.new_empty(n, steps + 1, batch, dtype=torch.bool)  # frame t+1: step t
        membrane = current.new_empty(steps, n, batch)
        p = lif.p
        kernels.forward(
            lif.drive(current).contiguous(),
            a,
            b,
            plan.slot_of,
            mask,
            *plan.native(),
            lif.leak,
            lif.v0,
            p.v_threshold,
            p.v_reset or 0.0,
            p.soft_reset,
            spikes,
            history,
            membrane,
        )
        ctx.lif, ctx.plan, ctx.kernels, ctx.delay_dtype = lif, plan, kernels, delay.dtype
        ctx.save_for_backward(history, membrane, weight, mask)
        v_last = lif.reset(membrane[-1].t(), spikes[-1].bool()).contiguous()
        ctx.mark_non_differentiable(v_last)
        return spikes, v_last

    @staticmethod
    def backward(ctx, grad_spikes, _grad_v_last):
        history, membrane, weight, mask = ctx.saved_tensors
        lif: LIFMap = ctx.lif
        plan: _SlotPlan = ctx.plan
        p = lif.p
        steps, n, batch = membrane.shape
        need_c, need_w, need_d, need_s = ctx.needs_input_grad[:4]
        a, b = map(plan.by_slot, plan.coefficients(weight, lif.gain))
        psi = p.surrogate.derivative(membrane - p.v_threshold).contiguous()
        # P[m] = spikes before step m, (N, T+1, B): closed-support counts K_s for the spread
        counts = history.cumsum(1, dtype=torch.int32) if need_s else None
        grad_h = torch.empty(steps, batch, n, dtype=membrane.dtype)
        lanes = 64 // membrane.element_size()  # batch rows padded to whole cache lines
        adjoint = membrane.new_zeros(n, steps, -(-batch // lanes) * lanes)  # ∂L/∂h · m
        by_support = torch.zeros(n, dtype=torch.float64)
        ctx.kernels.backward(
            grad_spikes.contiguous(),
            history,
            membrane,
            psi,
            a,
            b,
            mask,
            counts,
            *plan.native(),
            lif.leak,
            p.v_threshold,
            p.v_reset or 0.0,
            p.soft_reset,
            p.detach_reset,
            plan.ring,
            grad_h,
            adjoint,
            by_support,
        )
        grad_current = grad_h * lif.gain if need_c else None
        grad_weight = grad_delay = grad_width = None
        if need_w or need_d or need_s:
            dz = torch.zeros(n, n, dtype=torch.float64)
            de = torch.zeros(n, n, dtype=torch.float64)
            ctx.kernels.gradients(history, adjoint, batch, *plan.native(), dz, de)
            by_weight = lif.gain * (dz + plan.offset * de)  # ∂L/∂W in float64
            if need_w:
                grad_weight = by_weight.to(weight.dtype)
            if need_d:
                grad_delay = (lif.gain * weight.double() * de * plan.inv_w2).to(ctx.delay_dtype)
            if need_s:
                w = 1.0 / plan.inv_w2.sqrt()
                spread = by_support * plan.inv_w2 - 2.0 / w * (weight.double() * by_weight).sum(0)
                grad_width = spread.to(weight.dtype)
        return grad_current, grad_weight, grad_delay, grad_width, None, None, None


def cpp_recurrence(
    current: Tensor,
    weight: Tensor,
    delay: Tensor,
    width: Tensor | float,
    neuron: nn.Module,
    mask: Tensor | None = None,
    state: RecurrentState | None = None,
):
    """Path ``cpp-synaptic``: spikes ``(T, B, N)`` of a recurrent LIF layer with per-synapse
    delays ``(N, N)``, by slot traces in C++ (CPU tensors).

    current ``(T, B, N)``, weight ``(N, N)`` row = postsynaptic, width a number or ``(N,)`` per
    presynaptic neuron, neuron the built-in :class:`~delrec.neurons.LIF`, mask ``(B, N)`` or
    None; differentiable in current, weight, delay and width; same spikes and gradients as the
    reference with ``triangle_kernel``. With a ``state``
    (:class:`~delrec.engine.state.RecurrentState`) it starts from it and returns
    ``(spikes, final state)``.
    """
    kernels = native.load("synaptic")
    if kernels is None:
        raise RuntimeError(native.unavailable("synaptic"))
    width = width_vector(width, delay, weight.shape[0])
    lif = LIFMap.of(neuron.p)

    def run(current: Tensor) -> tuple[Tensor, Tensor]:
        return _SynapticSlots.apply(current, weight, delay, width, mask, lif, kernels)

    return run_lif(run, current, weight, delay, width, lif, mask, state)


# --------------------------------------------------------------------------- lag-GEMM (PyTorch ops)
class _SynapticRecurrence(torch.autograd.Function):
    """Spikes of a LIF layer with per-synapse delays, from the lag-stacked weighted kernel.

    ``kernel[i, j, l]`` is ``W_ij κ_ij(kmin + l)`` for the lags ``kmin … kmin + nl - 1`` that
    hold every kernel's closed support; its gradient goes back through autograd of
    ``triangle_kernel``. Also returns the membrane after the last step ``(B, N)`` (no gradient).
    """

    @staticmethod
    def forward(ctx, current, kernel, kmin: int, mask, lif: LIFMap):
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
        ctx.mark_non_differentiable(v)
        return spikes.to(dtype), v

    @staticmethod
    def backward(ctx, grad_spikes, _grad_v_last):
        spikes, membrane, kernel, mask = ctx.saved_tensors
        lif: LIFMap = ctx.lif
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


def torch_recurrence(
    current: Tensor,
    weight: Tensor,
    delay: Tensor,
    width: Tensor | float,
    neuron: nn.Module,
    mask: Tensor | None = None,
    state: RecurrentState | None = None,
):
    """Path ``torch-synaptic``: what :func:`cpp_recurrence` computes, by the lag-stacked GEMM
    in PyTorch ops (any device)."""
    n = weight.shape[0]
    width = width_vector(width, delay, n)
    kmin, kmax = synaptic_support(delay, width)
    kernel = weight.unsqueeze(-1) * triangle_kernel(delay, width.expand(n, n), kmax + 1)[..., kmin:]
    lif = LIFMap.of(neuron.p)

    def run(current: Tensor) -> tuple[Tensor, Tensor]:
        return _SynapticRecurrence.apply(current, kernel, kmin, mask, lif)

    return run_lif(run, current, weight, delay, width, lif, mask, state)
