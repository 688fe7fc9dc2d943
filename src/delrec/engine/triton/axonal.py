"""The axonal/shared recurrence in Triton: the C++ engine's time loops, one program per tile of
batch rows.

Batch rows are independent, so each program runs the whole time loop for its ``BLOCK_B`` rows,
the recurrent product against ``W`` included, with no synchronisation between programs. A
step is two sweeps over blocks of neurons, each closed by a barrier of the program's threads
(the next sweep reads what other threads of the program wrote):

* forward: (1) the trace recursion of every neuron (three tapped past spikes, float64 state,
  the box sums ``E``/``K`` when delays/spreads learn; docs/design.md, 'Running sums'), which
  writes ``z[t]``; (2) per block of postsynaptic neurons, ``z[t] Wᵀ`` (a loop over blocks of
  presynaptic neurons, so any ``N`` runs), then charge, fire, reset;
* backward, in reverse time: (1) the adjoint recursion over the future ``∂L/∂z`` and the LIF
  adjoint, which writes ``∂L/∂h[t]``; (2) per block of presynaptic neurons,
  ``∂L/∂z[t] = (m ⊙ ∂L/∂h[t]) W`` and its products with ``E``, ``K`` and ``z`` summed per
  neuron (float64) for the delay and spread gradients.

Everything lives in global memory in the layer's time-major layout ``(T, B, N)``, except two
neuron-major buffers, the spike history ``(T, N, B)`` uint8 that the forward's taps read and
the backward's ``∂L/∂z`` ``(T, N, B)`` (a tap or an adjoint reads one neuron's batch rows
together), the float64 recursion states ``(2, B, N)`` and the per-program partial sums. The
membrane ``h`` is saved; ``v[t-1]`` is recomputed from it. What the recursion means:
:class:`delrec.engine.axonal._AxonalPlan`.

:func:`forward_loop` and :func:`backward_loop` return what the C++ loops return, with the box
sums batch-major ``(T+1, B, N)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from delrec.engine.axonal import TimeLoops, run_loops
from delrec.engine.triton.lif import (
    LEAK,
    SURROGATE_PARAM,
    SURROGATE_SCALE,
    THRESHOLD,
    V0,
    V_RESET,
    adjoint_step,
    after_spike,
    constants,
    dtype_of,
    matmul,
    psi_or_placeholder,
    recurrent_tiles,
    surrogate_slope,
)


@triton.jit(do_not_specialize=["steps", "batch", "n"])
def _forward_kernel(
    drive_ptr,  # (T, B, N): gain·c + offset
    weight_ptr,  # (N, N): gain·W, row = postsynaptic
    mask_ptr,  # (B, N) recurrent dropout mask (read when HAS_MASK)
    lags_ptr,  # (N, 4) int32: the tap lags (a1, b1+1, b2+1, e2+1)
    coef_ptr,  # (2, N, 3) float64: increments of z and D/w² per tapped spike
    const_ptr,  # (8,) float64: the LIF constants (lif.constants)
    state_ptr,  # (2, B, N) float64, zero: z and D/w²
    history_ptr,  # (T, N, B) uint8 out: the spikes neuron-major, what the taps read
    spikes_ptr,  # (T, B, N) out
    membrane_ptr,  # (T, B, N) out: h
    trace_ptr,  # (T, B, N) out: z
    slope_ptr,  # (T+1, B, N) int8/int16, slot 0 zero: E[t] in slot t+1 (when NEED_SLOPE)
    support_ptr,  # (T+1, B, N) likewise: K[t] (when NEED_SUPPORT)
    steps,
    batch,
    n,
    DTYPE: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NEED_SLOPE: tl.constexpr,
    NEED_SUPPORT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    leak = tl.load(const_ptr + LEAK).to(DTYPE)
    v0 = tl.load(const_ptr + V0).to(DTYPE)
    threshold = tl.load(const_ptr + THRESHOLD).to(DTYPE)
    v_reset = tl.load(const_ptr + V_RESET).to(DTYPE)
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = rows < batch
    frame = batch.to(tl.int64) * n  # elements per step
    for t in range(steps):
        now = frame * t
        # (1) the trace recursion of every neuron
        for n0 in range(0, n, BLOCK_R):
            cols = n0 + tl.arange(0, BLOCK_R)
            col_ok = cols < n
            ok = row_ok[:, None] & col_ok[None, :]
            at = rows[:, None] * n + cols[None, :]
            tap = cols[None, :] * batch + rows[:, None]  # in a (N, B) frame of the history
            # spikes at the three tapped lags (before step 0: none), float64
            lag = lags_ptr + cols * 4
            src0 = t - tl.load(lag + 0, mask=col_ok, other=1)
            src1 = t - tl.load(lag + 1, mask=col_ok, other=1)
            src2 = t - tl.load(lag + 2, mask=col_ok, other=1)
            s0 = tl.load(history_ptr + src0[None, :] * frame + tap, mask=ok & (src0 >= 0)[None, :])
            s1 = tl.load(history_ptr + src1[None, :] * frame + tap, mask=ok & (src1 >= 0)[None, :])
            s2 = tl.load(history_ptr + src2[None, :] * frame + tap, mask=ok & (src2 >= 0)[None, :])
            s0, s1, s2 = s0.to(tl.float64), s1.to(tl.float64), s2.to(tl.float64)
            inc = coef_ptr + cols * 3  # increments of z; of D/w² at + 3n
            y = tl.load(state_ptr + at, mask=ok, other=0.0)
            d = tl.load(state_ptr + frame + at, mask=ok, other=0.0)
            y += d
            y += (
                s0 * tl.load(inc + 0, mask=col_ok, other=0.0)[None, :]
                + s1 * tl.load(inc + 1, mask=col_ok, other=0.0)[None, :]
                + s2 * tl.load(inc + 2, mask=col_ok, other=0.0)[None, :]
            )
            d += (
                s0 * tl.load(inc + 3 * n + 0, mask=col_ok, other=0.0)[None, :]
                + s1 * tl.load(inc + 3 * n + 1, mask=col_ok, other=0.0)[None, :]
                + s2 * tl.load(inc + 3 * n + 2, mask=col_ok, other=0.0)[None, :]
            )
            tl.store(state_ptr + at, y, mask=ok)
            tl.store(state_ptr + frame + at, d, mask=ok)
            tl.store(trace_ptr + now + at, y.to(DTYPE), mask=ok)
            if NEED_SLOPE:  # E += -s0 + s1 - s2 + s3
                src3 = t - tl.load(lag + 3, mask=col_ok, other=1)
                s3 = tl.load(
                    history_ptr + src3[None, :] * frame + tap, mask=ok & (src3 >= 0)[None, :]
                )
                s3 = s3.to(tl.float64)
                e = tl.load(slope_ptr + now + at, mask=ok, other=0)
                step = (s1 + s3 - s0 - s2).to(slope_ptr.dtype.element_ty)
                tl.store(slope_ptr + now + frame + at, e + step, mask=ok)
            if NEED_SUPPORT:  # K += s0 - s2
                k = tl.load(support_ptr + now + at, mask=ok, other=0)
                step = (s0 - s2).to(support_ptr.dtype.element_ty)
                tl.store(support_ptr + now + frame + at, k + step, mask=ok)
        tl.debug_barrier()
        # (2) per block of postsynaptic neurons: u = c + m ⊙ z Wᵀ, charge, fire, reset
        for n0 in range(0, n, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < n
            ok = row_ok[:, None] & col_ok[None, :]
            at = rows[:, None] * n + cols[None, :]
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=DTYPE)
            for k0 in range(0, n, BLOCK_K):
                inner = k0 + tl.arange(0, BLOCK_K)
                inner_ok = inner < n
                z = tl.load(
                    trace_ptr + now + rows[:, None] * n + inner[None, :],
                    mask=row_ok[:, None] & inner_ok[None, :],
                    other=0.0,
                )
                w_t = tl.load(  # Wᵀ block (inner, cols)
                    weight_ptr + cols[None, :] * n + inner[:, None],
                    mask=inner_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                acc = matmul(z, w_t, acc, PRECISION)
            if HAS_MASK:
                acc = tl.load(mask_ptr + at, mask=ok, other=0.0) * acc
            h_before = tl.load(membrane_ptr + now - frame + at, mask=ok & (t > 0), other=0.0)
            v = after_spike(h_before, h_before >= threshold, threshold, v_reset, SOFT_RESET)
            v = tl.where(t > 0, v, v0)
            h = (tl.load(drive_ptr + now + at, mask=ok, other=0.0) + acc) + leak * v
            spiked = h >= threshold
            tl.store(membrane_ptr + now + at, h, mask=ok)
            tl.store(spikes_ptr + now + at, spiked.to(DTYPE), mask=ok)
            tap = cols[None, :] * batch + rows[:, None]
            tl.store(history_ptr + now + tap, spiked.to(tl.uint8), mask=ok)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["steps", "batch", "n"])
def _backward_kernel(
    grad_spikes_ptr,  # (T, B, N): ∂L/∂s from outside
    membrane_ptr,  # (T, B, N): h
    psi_ptr,  # (T, B, N): ψ'(h - θ) (read when SURROGATE == 0)
    weight_ptr,  # (N, N): gain·W
    mask_ptr,  # (B, N) (read when HAS_MASK)
    lags_ptr,  # (N, 4) int32
    coef_ptr,  # (2, N, 3) float64
    const_ptr,  # (8,) float64
    trace_ptr,  # (T, B, N): z (read when NEED_SUPPORT)
    slope_ptr,  # (T+1, B, N): E (read when NEED_SLOPE)
    support_ptr,  # (T+1, B, N): K (read when NEED_SUPPORT)
    state_ptr,  # (2, B, N) float64, zero: ζ and its D/w²
    grad_h_ptr,  # (T, B, N) out: ∂L/∂h
    grad_z_ptr,  # (T, N, B) out: ∂L/∂z neuron-major, what the taps read
    sums_ptr,  # (programs, 3, N) float64, zero: Σ ∂L/∂z·E, Σ ∂L/∂z·K, Σ ∂L/∂z·z per program
    steps,
    batch,
    n,
    DTYPE: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NEED_SLOPE: tl.constexpr,
    NEED_SUPPORT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    leak = tl.load(const_ptr + LEAK).to(DTYPE)
    threshold = tl.load(const_ptr + THRESHOLD).to(DTYPE)
    v_reset = tl.load(const_ptr + V_RESET).to(DTYPE)
    param = tl.load(const_ptr + SURROGATE_PARAM).to(DTYPE)
    scale = tl.load(const_ptr + SURROGATE_SCALE).to(DTYPE)
    program = tl.program_id(0)
    rows = (program * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = rows < batch
    frame = batch.to(tl.int64) * n
    sums = sums_ptr + program.to(tl.int64) * 3 * n
    for step in range(steps):
        t = steps - 1 - step
        now = frame * t
        # (1) the adjoint recursion ζ[t] = Σ_k κ(k) ∂L/∂z[t+k], then the LIF adjoint
        for n0 in range(0, n, BLOCK_R):
            cols = n0 + tl.arange(0, BLOCK_R)
            col_ok = cols < n
            ok = row_ok[:, None] & col_ok[None, :]
            at = rows[:, None] * n + cols[None, :]
            tap = cols[None, :] * batch + rows[:, None]  # in a (N, B) frame of ∂L/∂z
            # the adjoints at the three tapped lags (from step T on: none), float64
            lag = lags_ptr + cols * 4
            src0 = t + tl.load(lag + 0, mask=col_ok, other=1)
            src1 = t + tl.load(lag + 1, mask=col_ok, other=1)
            src2 = t + tl.load(lag + 2, mask=col_ok, other=1)
            g0 = tl.load(
                grad_z_ptr + src0[None, :] * frame + tap, mask=ok & (src0 < steps)[None, :]
            )
            g1 = tl.load(
                grad_z_ptr + src1[None, :] * frame + tap, mask=ok & (src1 < steps)[None, :]
            )
            g2 = tl.load(
                grad_z_ptr + src2[None, :] * frame + tap, mask=ok & (src2 < steps)[None, :]
            )
            g0, g1, g2 = g0.to(tl.float64), g1.to(tl.float64), g2.to(tl.float64)
            inc = coef_ptr + cols * 3
            y = tl.load(state_ptr + at, mask=ok, other=0.0)
            d = tl.load(state_ptr + frame + at, mask=ok, other=0.0)
            y += d
            y += (
                g0 * tl.load(inc + 0, mask=col_ok, other=0.0)[None, :]
                + g1 * tl.load(inc + 1, mask=col_ok, other=0.0)[None, :]
                + g2 * tl.load(inc + 2, mask=col_ok, other=0.0)[None, :]
            )
            d += (
                g0 * tl.load(inc + 3 * n + 0, mask=col_ok, other=0.0)[None, :]
                + g1 * tl.load(inc + 3 * n + 1, mask=col_ok, other=0.0)[None, :]
                + g2 * tl.load(inc + 3 * n + 2, mask=col_ok, other=0.0)[None, :]
            )
            tl.store(state_ptr + at, y, mask=ok)
            tl.store(state_ptr + frame + at, d, mask=ok)
            h = tl.load(membrane_ptr + now + at, mask=ok, other=0.0)
            grad_s = tl.load(grad_spikes_ptr + now + at, mask=ok, other=0.0) + y.to(DTYPE)
            grad_h_next = tl.load(
                grad_h_ptr + now + frame + at, mask=ok & (t + 1 < steps), other=0.0
            )
            psi = surrogate_slope(h - threshold, psi_ptr + now + at, ok, param, scale, SURROGATE)
            g = adjoint_step(
                grad_s, grad_h_next, h, psi, leak, threshold, v_reset, SOFT_RESET, DETACH_RESET
            )
            tl.store(grad_h_ptr + now + at, g, mask=ok)
        tl.debug_barrier()
        # (2) per block of presynaptic neurons: ∂L/∂z[t] = (m ⊙ ∂L/∂h[t]) W, and the sums
        for n0 in range(0, n, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < n
            ok = row_ok[:, None] & col_ok[None, :]
            at = rows[:, None] * n + cols[None, :]
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=DTYPE)
            for k0 in range(0, n, BLOCK_K):
                inner = k0 + tl.arange(0, BLOCK_K)
                inner_ok = inner < n
                inner_at = rows[:, None] * n + inner[None, :]
                inner_mask = row_ok[:, None] & inner_ok[None, :]
                g = tl.load(grad_h_ptr + now + inner_at, mask=inner_mask, other=0.0)
                if HAS_MASK:
                    g = g * tl.load(mask_ptr + inner_at, mask=inner_mask, other=0.0)
                w = tl.load(  # W block (inner = postsynaptic, cols = presynaptic)
                    weight_ptr + inner[:, None] * n + cols[None, :],
                    mask=inner_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                acc = matmul(g, w, acc, PRECISION)
            tl.store(grad_z_ptr + now + cols[None, :] * batch + rows[:, None], acc, mask=ok)
            grad_z = acc.to(tl.float64)
            if NEED_SLOPE:
                e = tl.load(slope_ptr + now + frame + at, mask=ok, other=0).to(tl.float64)
                part = tl.load(sums + cols, mask=col_ok, other=0.0)
                tl.store(sums + cols, part + tl.sum(grad_z * e, axis=0), mask=col_ok)
            if NEED_SUPPORT:
                k = tl.load(support_ptr + now + frame + at, mask=ok, other=0).to(tl.float64)
                part = tl.load(sums + n + cols, mask=col_ok, other=0.0)
                tl.store(sums + n + cols, part + tl.sum(grad_z * k, axis=0), mask=col_ok)
                z = tl.load(trace_ptr + now + at, mask=ok, other=0.0).to(tl.float64)
                part = tl.load(sums + 2 * n + cols, mask=col_ok, other=0.0)
                tl.store(sums + 2 * n + cols, part + tl.sum(grad_z * z, axis=0), mask=col_ok)
        tl.debug_barrier()


# --------------------------------------------------------------------------- host side
def _plan_tensors(plan):
    """The plan's lags as int32 and its increments, on the plan's device."""
    return plan.lags.to(torch.int32).contiguous(), plan.native_coef.contiguous()


def forward_loop(current, weight, mask, lif, plan, need_d: bool, need_s: bool):
    """The forward time loop on the GPU. Returns spikes, membrane and trace ``(T, B, N)`` and the
    box sums ``E``, ``K`` ``(T+1, B, N)`` (slot ``t+1`` holds step ``t``; None when not
    needed)."""
    steps, batch, n = current.shape
    tiles = recurrent_tiles(n, current.dtype, wide=True)
    drive = lif.drive(current).contiguous()
    spikes, membrane, trace = (torch.empty_like(drive) for _ in range(3))
    slope, support = (
        current.new_empty((steps + 1, batch, n) if need else (1,), dtype=plan.count_dtype)
        for need in (need_d, need_s)
    )
    for box, need in ((slope, need_d), (support, need_s)):
        if need:
            box[0].zero_()
    lags, coef = _plan_tensors(plan)
    state = current.new_zeros(2, batch, n, dtype=torch.float64)
    history = current.new_empty(steps, n, batch, dtype=torch.uint8)
    p = lif.p
    _forward_kernel[(triton.cdiv(batch, tiles.batch),)](
        drive,
        (weight * lif.gain).contiguous(),
        drive if mask is None else mask.contiguous(),
        lags,
        coef,
        constants(lif, current.device),
        state,
        history,
        spikes,
        membrane,
        trace,
        slope,
        support,
        steps,
        batch,
        n,
        DTYPE=dtype_of(drive),
        SOFT_RESET=p.soft_reset,
        HAS_MASK=mask is not None,
        NEED_SLOPE=need_d,
        NEED_SUPPORT=need_s,
        BLOCK_B=tiles.batch,
        BLOCK_R=tiles.recursion,
        BLOCK_N=tiles.neurons,
        BLOCK_K=tiles.inner,
        PRECISION=tiles.precision,
        num_warps=tiles.warps,
    )
    return spikes, membrane, trace, slope if need_d else None, support if need_s else None


def backward_loop(grad_spikes, membrane, trace, slope, support, weight_in, mask, lif, plan):
    """The reverse time loop on the GPU on what :func:`forward_loop` saved: ``∂L/∂h``
    ``(T, B, N)`` and the per-neuron sums ``Σ ∂L/∂z·E``, ``Σ ∂L/∂z·K``, ``Σ ∂L/∂z·z`` (float64,
    None when not needed)."""
    steps, batch, n = membrane.shape
    tiles = recurrent_tiles(n, membrane.dtype, wide=True)
    programs = triton.cdiv(batch, tiles.batch)
    p = lif.p
    code, psi = psi_or_placeholder(lif, membrane)
    lags, coef = _plan_tensors(plan)
    grad_h = torch.empty_like(membrane)
    grad_z = membrane.new_empty(steps, n, batch)
    sums = membrane.new_zeros(programs, 3, n, dtype=torch.float64)
    state = membrane.new_zeros(2, batch, n, dtype=torch.float64)
    _backward_kernel[(programs,)](
        grad_spikes.contiguous(),
        membrane,
        psi,
        weight_in.contiguous(),
        membrane if mask is None else mask.contiguous(),
        lags,
        coef,
        constants(lif, membrane.device),
        trace,
        membrane if slope is None else slope,
        membrane if support is None else support,
        state,
        grad_h,
        grad_z,
        sums,
        steps,
        batch,
        n,
        DTYPE=dtype_of(membrane),
        SOFT_RESET=p.soft_reset,
        DETACH_RESET=p.detach_reset,
        SURROGATE=code,
        HAS_MASK=mask is not None,
        NEED_SLOPE=slope is not None,
        NEED_SUPPORT=support is not None,
        BLOCK_B=tiles.batch,
        BLOCK_R=tiles.recursion,
        BLOCK_N=tiles.neurons,
        BLOCK_K=tiles.inner,
        PRECISION=tiles.precision,
        num_warps=tiles.warps,
    )
    by_slope, by_support, by_trace = sums.sum(0)
    return (
        grad_h,
        by_slope if slope is not None else None,
        *((by_support, by_trace) if support is not None else (None, None)),
        {},
    )


LOOPS = TimeLoops(forward_loop, backward_loop)


def recurrence(current, weight, delay, width, neuron, mask=None, state=None):
    """Path ``triton-axonal``: spikes ``(T, B, N)`` of a recurrent LIF layer with axonal delays
    ``(N,)``, the time loops in Triton, differentiable in every input (the arguments of
    :func:`delrec.engine.axonal.cpp_recurrence`, a ``state`` too)."""
    return run_loops(LOOPS, current, weight, delay, width, neuron, mask, state)
