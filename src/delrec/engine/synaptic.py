"""Synaptic delays without a GEMM per lag: each synapse reads one row of a few shared rings.

For per-synapse delays (``delay (N, N)``, row = postsynaptic ``i``, column = presynaptic ``j``)
the kernel ``κ_c(k) = max(0, w - |k - c|)/w²`` (``c = 1 + d_ij``, half-width ``w_j``) is, for
every integer lag ``k``, piecewise linear in the centre ``c``: exactly linear between kinks
(where ``c``, ``c - w`` or ``c + w`` is an integer) with slope ``ε(k)/w²``, and translating the
centre by one step translates the trace by one step in time, up to a lag-0 term that exists
only for ``c ≤ w`` (docs/design.md#synaptic-delays-by-shifted-reads). So the synapses
of neuron ``j`` fall into at most four **classes** (the pattern of ``c`` translated into
``(w, w + 1]``) and **levels** ``m = ⌈c - w⌉ - 1``; a synapse of class ``p`` at level ``m``
sees

    z_ij[t] = Z_{G_p+m}[t] + (c - G_p - m)/w² · E_{G_p+m}[t],

and every level of a class is one row of the class's **ring**, indexed by diagonal ``t - m``:
one triangle and ε-box recursion per class enters its lowest used level ``m_a``, a chain of
lag-0 terms carries each row up to level 0 (at most ``⌈w⌉`` stages, in the layer's dtype on
the ring's rows; the entry's state is float64), and from level 0 on a row never changes
(levels above ``w`` are pure time shifts). A step costs two
multiply-adds of length ``B`` per synapse plus O(classes·w·B) per neuron, whatever the delay
range. The slot ``(p, m)`` groups the synapses reading the same level. A centre on a kink gets
the pattern the reference's autograd convention gives it (``|x|' = 0`` at 0, the clamp passes
the gradient at 0): the left interval for ``c - w`` integer, the right one for ``c + w``
integer, a class of its own for ``c`` integer.

Gradients (``ḡ_i[t] = ∂L/∂h_i[t]·m_i``, ``γ`` = the LIF input gain), from per-synapse sums
``D0 = Σ_t,b ḡ_i Z`` and ``D1 = Σ_t,b ḡ_i E`` of a second sweep over the classes:

    ∂L/∂W_ij = γ (D0 + (c - G_p - m)/w² · D1)        ∂L/∂d_ij = γ W_ij D1 / w²
    ∂L/∂w_j  = Σ_t,s K_s·x_s / w² - (2/w) Σ_i W_ij ∂L/∂W_ij

with ``x_s = γ Σ_{i ∈ s} W_ij ḡ_i`` (the adjoint of the slot's ``Z``) and ``K_s`` the spike count
over its closed support. The backward adds the slot sums into an adjoint ring per class (row
``t - m``), feeds the chain's lag-0 terms back to the spikes one step earlier and injects each
class's entry row at its taps into one float64 adjoint recursion per neuron. Saved for
backward: spike history (bool) and membrane, ``T·B·N`` each, plus the plan (``O(N²)``); the
rings of each pass hold ``O(N·classes·levels·B)`` values, bounded by the delay range, never
``T·L``.

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

from delrec.delays import kernel_support, triangle_kernel
from delrec.engine import native
from delrec.engine.autograd import RECURRENT, first_order
from delrec.engine.lif import LIFMap, triangle_taps, width_vector
from delrec.engine.state import RecurrentState, empty_batch_safe, run_lif

# the C++ plan takes kernels with max|1 + d| + max w below this many steps (csrc/synaptic.cpp:
# plan), short of MAX_DELAY: engine selection passes longer ones to torch-synaptic
CPP_REACH = 30000.0


class _SlotPlan:
    """Classes, levels and slots of every presynaptic neuron and what each synapse reads.

    From the C++ ``plan`` (module docstring). Per synapse ``(i, j)``: ``slot_of (N, N)`` (int32)
    and ``offset = (c - G_p - m)/w²`` (float64, ``(N, N)``). Per class (grouped by neuron,
    ``class_start (N+1,)``): its slots (``slot_start (C+1,)``, ``slot_level (S,)``), its levels
    ``(m_a, m_b, m_top)`` (``levels (C, 3)``: entry, top chain stage, highest), the taps of its
    entry recursion at the centre ``entry`` (the least centre at level ``m_a``): triangle
    ``z_lags (C, 3)``, ``z_coef (C, 6)`` (increments of z and of its slope,
    :func:`delrec.engine.lif.triangle_taps`), ε-boxes
    ``e_lags (C, 4)`` = ``(lo, e+1, f, hi+1)`` with signs ``(-, +, +, -)``, closed support
    ``support (C, 2)``, and its chain stages (``chain_start (C+1,)``, ``chain (stages, 3)``: the
    lag-0 values ``(a, e, χ)`` of the level below each stage). Per slot its members
    (``member_start (S+1,)``, ``member`` = postsynaptic ``i``, int32, and ``order``, the row-major
    synapse index of each member). Rings have ``depth`` rows per class (levels ``lowest`` …
    ``lowest + depth - 1``); ``reach`` exceeds every tap lag; ``width`` is ``w`` per neuron,
    ``(N,)`` float64.
    """

    def __init__(self, delay: Tensor, width: Tensor, kernels: ModuleType):
        n = delay.shape[0]
        centre = (1.0 + delay.detach()).double()  # in the parameter dtype, like triangle_kernel
        w = width.detach().double().expand(n).contiguous()
        (
            self.class_start,
            self.slot_start,
            self.slot_level,
            self.levels,
            entry,
            entry_pattern,
            self.chain_start,
            self.chain,
            self.member_start,
            self.member,
            self.order,
            self.slot_of,
            offset,
        ) = kernels.plan(centre.contiguous(), w)
        self.width = w
        self.offset = offset  # (c - G_p - m)/w², (N, N): b = gain·W·offset
        owner = torch.repeat_interleave(torch.arange(n), self.class_start.diff())
        self.z_lags, increments = triangle_taps(entry, w[owner])
        self.z_coef = increments.view(-1, 6)
        lo, hi, rises, falls = entry_pattern.unbind(1)
        self.e_lags = torch.stack([lo, rises + 1, falls, hi + 1], 1).contiguous()
        self.support = torch.stack([lo, hi], 1).contiguous()
        self.reach = int(max(self.z_lags.max(), self.e_lags.max())) + 1
        self.lowest = int(self.levels[:, 0].min())
        self.depth = int(self.levels[:, 2].max()) - self.lowest + 1

    def native(self) -> tuple[list[Tensor], int, int]:
        """The plan tensors in the order the C++ functions take them, the ring depth and the
        lowest level."""
        tensors = [
            self.class_start,
            self.slot_start,
            self.slot_level,
            self.levels,
            self.z_lags,
            self.z_coef,
            self.e_lags,
            self.support,
            self.chain_start,
            self.chain,
            self.member_start,
            self.member,
        ]
        return tensors, self.depth, self.lowest


class _SynapticSlots(torch.autograd.Function):
    """Spikes ``(T, B, N)`` of a LIF layer with per-synapse delays, by slot traces (module doc),
    and its membrane after the last step ``(B, N)`` (no gradient)."""

    @staticmethod
    def forward(ctx, current, weight, delay, width, mask, lif: LIFMap, kernels):
        steps, batch, n = current.shape
        plan = _SlotPlan(delay, width, kernels)
        weight_in = weight.detach().to(current.dtype).contiguous()  # the sums' a = gain·W
        spikes = current.new_empty(steps, batch, n)  # contiguous, whatever current's strides
        history = current.new_empty(n, steps + 1, batch, dtype=torch.bool)  # frame t+1: step t
        membrane = current.new_empty(steps, batch, n)
        p = lif.p
        kernels.forward(
            lif.drive(current).contiguous(),
            weight_in,
            plan.offset,
            lif.gain,
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
        ctx.lif, ctx.plan, ctx.kernels = lif, plan, kernels
        ctx.dtypes = weight.dtype, delay.dtype
        ctx.save_for_backward(history, membrane, weight_in, mask)
        v_last = lif.reset(membrane[-1], spikes[-1].bool())
        ctx.mark_non_differentiable(v_last)
        return spikes, v_last

    @staticmethod
    @first_order(*RECURRENT)
    def backward(ctx, grad_spikes, _grad_v_last):
        history, membrane, weight_in, mask = ctx.saved_tensors
        lif: LIFMap = ctx.lif
        plan: _SlotPlan = ctx.plan
        p = lif.p
        steps, batch, n = membrane.shape
        need_c, need_w, need_d, need_s = ctx.needs_input_grad[:4]
        code, param, psi = lif.native_slope(membrane)  # any other surrogate: ψ' precomputed
        # P[m] = spikes before step m, (N, T+1, B): closed-support counts K_s for the spread
        counts = history.cumsum(1, dtype=torch.int32) if need_s else None
        grad_current = torch.empty(steps, batch, n, dtype=membrane.dtype)
        lanes = 64 // membrane.element_size()  # batch rows padded to whole cache lines
        span = ctx.kernels.span  # the backward sums far slots in blocks of `span` steps
        # ∂L/∂h · m, (N, T', B'): T' whole blocks (the kernels zero the padding)
        adjoint = membrane.new_empty(n, -(-steps // span) * span, -(-batch // lanes) * lanes)
        by_support = torch.zeros(n, dtype=torch.float64)
        ctx.kernels.backward(
            grad_spikes.contiguous(),
            history,
            membrane,
            psi,
            weight_in,
            plan.offset,
            lif.gain,
            plan.order,
            mask,
            counts,
            *plan.native(),
            lif.leak,
            p.v_threshold,
            p.v_reset or 0.0,
            p.soft_reset,
            p.detach_reset,
            code,
            param,
            plan.reach,
            grad_current,
            adjoint,
            by_support,
        )
        grad_weight = grad_delay = grad_width = None
        if need_w or need_d or need_s:
            by_weight = torch.empty(n, n, dtype=torch.float64)  # ∂L/∂W
            by_delay = torch.empty(n, n, dtype=torch.float64)  # ∂L/∂d
            weighted = torch.empty(n, dtype=torch.float64)  # Σ_i W_ij ∂L/∂W_ij
            ctx.kernels.gradients(
                history,
                adjoint,
                batch,
                *plan.native(),
                weight_in,
                plan.offset,
                plan.width,
                lif.gain,
                by_weight,
                by_delay,
                weighted,
            )
            weight_dtype, delay_dtype = ctx.dtypes
            if need_w:
                grad_weight = by_weight.to(weight_dtype)
            if need_d:
                grad_delay = by_delay.to(delay_dtype)
            if need_s:
                w = plan.width
                grad_width = (by_support / (w * w) - 2.0 / w * weighted).to(weight_dtype)
        grad_current = grad_current if need_c else None
        return grad_current, grad_weight, grad_delay, grad_width, None, None, None


@empty_batch_safe
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
    delays ``(N, N)``, by shifted reads of class rings in C++ (CPU tensors).

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
def lag_stacked_kernel(weight: Tensor, delay: Tensor, width: Tensor | float) -> tuple[Tensor, int]:
    """The weighted kernel ``W_ij κ_ij(k)`` of every synapse over the lags ``kmin … kmax`` that
    hold every kernel's closed support, ``(N, N, L)`` (row = postsynaptic), and ``kmin``:
    what the lag-stacked paths (``torch-synaptic``, ``triton-synaptic``) run on."""
    n = weight.shape[0]
    width = width_vector(width, delay, n)
    kmin, kmax = kernel_support(delay, width)
    kernel = triangle_kernel(delay, width.expand(n, n), kmax + 1)[..., kmin:]
    return weight.unsqueeze(-1) * kernel, kmin


def lag_kernel_grad(grad_r: Tensor, spikes: Tensor, kernel: Tensor, kmin: int) -> Tensor:
    """The gradient of the lag-stacked kernel ``(N, N, L)``, one GEMM per lag
    ``k = kmin + l``: ``Σ_t,b ∂L/∂r_i[t] s_j[t - k]``; ``grad_r``: the gradient of the
    recurrent input ``(T, B, N)``; ``spikes``: ``(T, B, N)``."""
    steps, n = grad_r.shape[0], grad_r.shape[-1]
    spikes = spikes.to(grad_r.dtype)
    grad_kernel = torch.zeros_like(kernel)
    for lag in range(kernel.shape[-1]):
        k = kmin + lag
        if k < steps:
            grad_kernel[:, :, lag] = grad_r[k:].reshape(-1, n).t() @ spikes[: steps - k].reshape(
                -1, n
            )
    return grad_kernel


class _LagStacked(torch.autograd.Function):
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
    @first_order(*RECURRENT)
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
            grad_kernel = lag_kernel_grad(grad_r, spikes, kernel, kmin)
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
    kernel, kmin = lag_stacked_kernel(weight, delay, width)
    lif = LIFMap.of(neuron.p)

    def run(current: Tensor) -> tuple[Tensor, Tensor]:
        return _LagStacked.apply(current, kernel, kmin, mask, lif)

    return run_lif(run, current, weight, delay, width, lif, mask, state)
