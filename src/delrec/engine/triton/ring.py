"""Integer-delay inference in Triton (eval mode: delays rounded, σ = 0, no autograd).

Each spike lands exactly ``1 + d`` steps later, so the recurrent input reads one past spike
per synapse: ``r_i[t] = Σ_j W_ij s_j[t - 1 - d_j]`` (axonal, ``d`` per presynaptic neuron) or
``s_j[t - 1 - d_ij]`` (synaptic, per synapse). The spikes written so far are the ring buffer:
with axonal delays a neuron-major copy as bytes ``(T, N, B)``, so that one delayed spike of a
neuron is read for the program's rows at once; with synaptic delays the spike output
``(T, B, N)`` itself, gathered synapse by synapse. One program per tile of batch rows runs the
time loop, and per block of postsynaptic neurons gathers the delayed spikes of every
presynaptic block, multiplies them by ``Wᵀ`` and updates the neurons; one barrier of the
program's threads per step. O(B·N) reads per step besides the product (axonal), whatever the
delays.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from delrec.engine.lif import LIFMap
from delrec.engine.triton.lif import (
    INTERPRETED,
    LEAK,
    THRESHOLD,
    V0,
    V_RESET,
    after_spike,
    constants,
    dtype_of,
    matmul,
    recurrent_tiles,
)


@triton.jit(do_not_specialize=["steps", "batch", "n"])
def _ring_kernel(
    drive_ptr,  # (T, B, N): gain·c + offset
    weight_ptr,  # (N, N): gain·W, row = postsynaptic
    mask_ptr,  # (B, N) (read when HAS_MASK)
    lags_ptr,  # int32 lags 1 + d: (N,) axonal, (N, N) synaptic (row = postsynaptic)
    const_ptr,  # (8,) float64: the LIF constants
    history_ptr,  # (T, N, B) uint8 out: the spikes neuron-major, what the axonal gathers read
    spikes_ptr,  # (T, B, N) out
    membrane_ptr,  # (T, B, N) out: h (v[t-1] is recomputed from it)
    steps,
    batch,
    n,
    DTYPE: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SYNAPTIC: tl.constexpr,
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
    for t in range(steps):
        now = frame * t
        for n0 in range(0, n, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < n
            ok = row_ok[:, None] & col_ok[None, :]
            at = rows[:, None] * n + cols[None, :]
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=DTYPE)
            for k0 in range(0, n, BLOCK_K):
                inner = k0 + tl.arange(0, BLOCK_K)
                inner_ok = inner < n
                w_ok = inner_ok[:, None] & col_ok[None, :]
                w_t = tl.load(weight_ptr + cols[None, :] * n + inner[:, None], mask=w_ok, other=0.0)
                if SYNAPTIC:  # s_j[t - lag_ij] for (row, j, i): a gather per synapse
                    lag = tl.load(lags_ptr + cols[None, :] * n + inner[:, None], mask=w_ok, other=1)
                    source = t - lag  # (inner, cols)
                    past = tl.load(
                        spikes_ptr
                        + source[None, :, :] * frame
                        + rows[:, None, None] * n
                        + inner[None, :, None],
                        mask=row_ok[:, None, None] & (w_ok & (source >= 0))[None, :, :],
                        other=0.0,
                    )
                    acc += tl.sum(past * w_t[None, :, :], axis=1)
                else:  # s_j[t - lag_j] for (row, j), then the product
                    source = t - tl.load(lags_ptr + inner, mask=inner_ok, other=1)
                    past = tl.load(
                        history_ptr
                        + source[None, :] * frame
                        + inner[None, :] * batch
                        + rows[:, None],
                        mask=row_ok[:, None] & (inner_ok & (source >= 0))[None, :],
                        other=0,
                    ).to(DTYPE)
                    acc = matmul(past, w_t, acc, PRECISION)
            if HAS_MASK:
                acc = tl.load(mask_ptr + at, mask=ok, other=0.0) * acc
            h_before = tl.load(membrane_ptr + now - frame + at, mask=ok & (t > 0), other=0.0)
            v = after_spike(h_before, h_before >= threshold, threshold, v_reset, SOFT_RESET)
            v = tl.where(t > 0, v, v0)
            h = (tl.load(drive_ptr + now + at, mask=ok, other=0.0) + acc) + leak * v
            spiked = h >= threshold
            tl.store(membrane_ptr + now + at, h, mask=ok)
            tl.store(spikes_ptr + now + at, spiked.to(DTYPE), mask=ok)
            if not SYNAPTIC:  # the axonal gathers' neuron-major copy
                tap = cols[None, :] * batch + rows[:, None]
                tl.store(history_ptr + now + tap, spiked.to(tl.uint8), mask=ok)
        tl.debug_barrier()


def synaptic_inner(tiles) -> int:
    """Inner block of the per-synapse gather: its ``(rows, inner, neurons)`` block lives in
    registers, so it is narrow on the GPU."""
    return tiles.inner if INTERPRETED else 8


@torch.no_grad()
def recurrence(current, weight, delay, width, neuron, mask=None):
    """Integer-delay inference: spikes ``(T, B, N)`` of a recurrent LIF layer, no autograd
    (the arguments of an engine path; ``width`` is 1, σ = 0).

    ``current``: ``(T, B, N)``; ``weight``: ``(N, N)`` (row = postsynaptic); ``delay``: integer
    steps, ``(N,)`` per presynaptic neuron or ``(N, N)`` per synapse; ``neuron``: the built-in
    :class:`~delrec.neurons.LIF`; ``mask``: recurrent dropout ``(B, N)`` or None.
    """
    steps, batch, n = current.shape
    lif = LIFMap.of(neuron.p)
    tiles = recurrent_tiles(n, current.dtype)
    if delay.dim() == 2:
        tiles = dataclasses.replace(tiles, inner=synaptic_inner(tiles))
    drive = lif.drive(current).contiguous()
    spikes, membrane = torch.empty_like(drive), torch.empty_like(drive)
    lags = (1 + delay.detach().long()).to(torch.int32).contiguous()
    _ring_kernel[(triton.cdiv(batch, tiles.batch),)](
        drive,
        (weight.detach() * lif.gain).contiguous(),
        drive if mask is None else mask.contiguous(),
        lags,
        constants(lif, current.device),
        current.new_empty(steps if delay.dim() == 1 else 0, n, batch, dtype=torch.uint8),
        spikes,
        membrane,
        steps,
        batch,
        n,
        DTYPE=dtype_of(drive),
        SOFT_RESET=lif.p.soft_reset,
        HAS_MASK=mask is not None,
        SYNAPTIC=delay.dim() == 2,
        BLOCK_B=tiles.batch,
        BLOCK_N=tiles.neurons,
        BLOCK_K=tiles.inner,
        PRECISION=tiles.precision,
        num_warps=tiles.warps,
    )
    return spikes
