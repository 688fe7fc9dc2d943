"""Synaptic delays in Triton: the lag-stacked formulation, one program per tile of batch rows.

With per-synapse delays the recurrent input is ``r_i[t] = Σ_l Σ_j K_ijl s_j[t - kmin - l]``,
``K_ijl = W_ij κ_ij(kmin + l)`` over the lags ``kmin … kmax`` that hold every kernel's closed
support. Each step the forward multiplies the past spikes at every lag by that lag's slice of
``K`` (a loop over lags and blocks of presynaptic neurons per block of postsynaptic neurons),
then charges, fires and resets; the backward, in reverse time, gathers the future adjoints
``m ⊙ ∂L/∂h[t + kmin + l]`` the same way (through ``Kᵀ``) and runs the LIF adjoint. One barrier
of the program's threads per step. O(B·N²·L) per step: simple and exact, not the slot engine
of the CPU (a follow-up). The kernel's gradient is one GEMM per lag after the loop, and
autograd of ``triangle_kernel`` carries it to ``W``, ``d`` and the spread. Saved for backward:
the spikes and the membrane.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from delrec.engine.autograd import RECURRENT, first_order
from delrec.engine.lif import LIFMap
from delrec.engine.synaptic import lag_kernel_grad, lag_stacked_kernel
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


@triton.jit(do_not_specialize=["steps", "batch", "n", "kmin", "lags"])
def _forward_kernel(
    drive_ptr,  # (T, B, N): gain·c + offset
    kernel_ptr,  # (L, N, N): gain·K, [l, j, i] (presynaptic j, postsynaptic i)
    mask_ptr,  # (B, N) (read when HAS_MASK)
    const_ptr,  # (8,) float64: the LIF constants
    spikes_ptr,  # (T, B, N) out
    membrane_ptr,  # (T, B, N) out: h
    steps,
    batch,
    n,
    kmin,
    lags,
    DTYPE: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_B: tl.constexpr,
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
    frame = batch.to(tl.int64) * n
    square = n.to(tl.int64) * n
    for t in range(steps):
        now = frame * t
        for n0 in range(0, n, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < n
            ok = row_ok[:, None] & col_ok[None, :]
            at = rows[:, None] * n + cols[None, :]
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=DTYPE)
            for lag in range(lags):
                source = t - kmin - lag  # the spikes of this lag (none before step 0)
                for k0 in range(0, n, BLOCK_K):
                    inner = k0 + tl.arange(0, BLOCK_K)
                    inner_ok = inner < n
                    past = tl.load(
                        spikes_ptr + frame * source + rows[:, None] * n + inner[None, :],
                        mask=(row_ok[:, None] & inner_ok[None, :]) & (source >= 0),
                        other=0.0,
                    )
                    k = tl.load(
                        kernel_ptr + square * lag + inner[:, None] * n + cols[None, :],
                        mask=inner_ok[:, None] & col_ok[None, :],
                        other=0.0,
                    )
                    acc = matmul(past, k, acc, PRECISION)
            if HAS_MASK:
                acc = tl.load(mask_ptr + at, mask=ok, other=0.0) * acc
            h_before = tl.load(membrane_ptr + now - frame + at, mask=ok & (t > 0), other=0.0)
            v = after_spike(h_before, h_before >= threshold, threshold, v_reset, SOFT_RESET)
            v = tl.where(t > 0, v, v0)
            h = (tl.load(drive_ptr + now + at, mask=ok, other=0.0) + acc) + leak * v
            tl.store(membrane_ptr + now + at, h, mask=ok)
            tl.store(spikes_ptr + now + at, (h >= threshold).to(DTYPE), mask=ok)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["steps", "batch", "n", "kmin", "lags"])
def _backward_kernel(
    grad_spikes_ptr,  # (T, B, N)
    membrane_ptr,  # (T, B, N): h
    psi_ptr,  # (T, B, N): ψ'(h - θ) (read when SURROGATE == 0)
    kernel_ptr,  # (L, N, N): gain·K, [l, i, j] (postsynaptic i, presynaptic j)
    mask_ptr,  # (B, N) (read when HAS_MASK)
    const_ptr,  # (8,) float64
    grad_h_ptr,  # (T, B, N) out: ∂L/∂h
    steps,
    batch,
    n,
    kmin,
    lags,
    DTYPE: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    leak = tl.load(const_ptr + LEAK).to(DTYPE)
    threshold = tl.load(const_ptr + THRESHOLD).to(DTYPE)
    v_reset = tl.load(const_ptr + V_RESET).to(DTYPE)
    param = tl.load(const_ptr + SURROGATE_PARAM).to(DTYPE)
    scale = tl.load(const_ptr + SURROGATE_SCALE).to(DTYPE)
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = rows < batch
    frame = batch.to(tl.int64) * n
    square = n.to(tl.int64) * n
    for step in range(steps):
        t = steps - 1 - step
        now = frame * t
        for n0 in range(0, n, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)  # presynaptic j
            col_ok = cols < n
            ok = row_ok[:, None] & col_ok[None, :]
            at = rows[:, None] * n + cols[None, :]
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=DTYPE)  # ∂L/∂s[t] through the synapses
            for lag in range(lags):
                future = t + kmin + lag  # the adjoints this lag reaches (none from step T on)
                for k0 in range(0, n, BLOCK_K):
                    inner = k0 + tl.arange(0, BLOCK_K)  # postsynaptic i
                    inner_ok = inner < n
                    inner_at = rows[:, None] * n + inner[None, :]
                    inner_mask = (row_ok[:, None] & inner_ok[None, :]) & (future < steps)
                    g = tl.load(grad_h_ptr + frame * future + inner_at, mask=inner_mask, other=0.0)
                    if HAS_MASK:
                        g = g * tl.load(mask_ptr + inner_at, mask=inner_mask, other=0.0)
                    k = tl.load(
                        kernel_ptr + square * lag + inner[:, None] * n + cols[None, :],
                        mask=inner_ok[:, None] & col_ok[None, :],
                        other=0.0,
                    )
                    acc = matmul(g, k, acc, PRECISION)
            h = tl.load(membrane_ptr + now + at, mask=ok, other=0.0)
            grad_s = tl.load(grad_spikes_ptr + now + at, mask=ok, other=0.0) + acc
            grad_h_next = tl.load(
                grad_h_ptr + now + frame + at, mask=ok & (t + 1 < steps), other=0.0
            )
            psi = surrogate_slope(h - threshold, psi_ptr + now + at, ok, param, scale, SURROGATE)
            g = adjoint_step(
                grad_s, grad_h_next, h, psi, leak, threshold, v_reset, SOFT_RESET, DETACH_RESET
            )
            tl.store(grad_h_ptr + now + at, g, mask=ok)
        tl.debug_barrier()


def _launch_common(tiles, batch):
    return (triton.cdiv(batch, tiles.batch),), dict(
        BLOCK_B=tiles.batch,
        BLOCK_N=tiles.neurons,
        BLOCK_K=tiles.inner,
        PRECISION=tiles.precision,
        num_warps=tiles.warps,
    )


class _TritonLagStacked(torch.autograd.Function):
    """Spikes ``(T, B, N)`` from the lag-stacked weighted kernel ``K (N, N, L)`` (row =
    postsynaptic), lags ``kmin … kmin + L - 1``; gradients for the current and ``K``."""

    @staticmethod
    def forward(ctx, current, kernel, kmin: int, mask, lif):
        steps, batch, n = current.shape
        tiles = recurrent_tiles(n, current.dtype)
        grid, blocks = _launch_common(tiles, batch)
        drive = lif.drive(current).contiguous()
        spikes, membrane = torch.empty_like(drive), torch.empty_like(drive)
        _forward_kernel[grid](
            drive,
            (kernel.detach() * lif.gain).permute(2, 1, 0).contiguous(),
            drive if mask is None else mask.contiguous(),
            constants(lif, current.device),
            spikes,
            membrane,
            steps,
            batch,
            n,
            kmin,
            kernel.shape[-1],
            DTYPE=dtype_of(drive),
            SOFT_RESET=lif.p.soft_reset,
            HAS_MASK=mask is not None,
            **blocks,
        )
        ctx.lif, ctx.kmin = lif, kmin
        ctx.save_for_backward(spikes, membrane, kernel, mask)
        return spikes

    @staticmethod
    @first_order(*RECURRENT)
    def backward(ctx, grad_spikes):
        spikes, membrane, kernel, mask = ctx.saved_tensors
        lif, kmin = ctx.lif, ctx.kmin
        steps, batch, n = membrane.shape
        lags = kernel.shape[-1]
        tiles = recurrent_tiles(n, membrane.dtype)
        grid, blocks = _launch_common(tiles, batch)
        p = lif.p
        code, psi = psi_or_placeholder(lif, membrane)
        grad_h = torch.empty_like(membrane)
        _backward_kernel[grid](
            grad_spikes.contiguous(),
            membrane,
            psi,
            (kernel.detach() * lif.gain).permute(2, 0, 1).contiguous(),
            membrane if mask is None else mask.contiguous(),
            constants(lif, membrane.device),
            grad_h,
            steps,
            batch,
            n,
            kmin,
            lags,
            DTYPE=dtype_of(membrane),
            SOFT_RESET=p.soft_reset,
            DETACH_RESET=p.detach_reset,
            SURROGATE=code,
            HAS_MASK=mask is not None,
            **blocks,
        )
        grad_current = grad_h * lif.gain if ctx.needs_input_grad[0] else None
        grad_kernel = None
        if ctx.needs_input_grad[1]:
            grad_r = (grad_h if mask is None else grad_h * mask) * lif.gain
            grad_kernel = lag_kernel_grad(grad_r, spikes, kernel, kmin)
        return grad_current, grad_kernel, None, None, None


def recurrence(current, weight, delay, width, neuron, mask=None):
    """Path ``triton-synaptic``: spikes ``(T, B, N)`` of a recurrent LIF layer with per-synapse
    delays ``(N, N)``, the time loops in Triton, differentiable in every input (the arguments
    of :func:`delrec.engine.synaptic.torch_recurrence`)."""
    kernel, kmin = lag_stacked_kernel(weight, delay, width)
    return _TritonLagStacked.apply(current, kernel, kmin, mask, LIFMap.of(neuron.p))
