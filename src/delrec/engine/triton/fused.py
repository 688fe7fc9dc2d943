"""The network around the delays in Triton: the kernels of :mod:`delrec.engine.fused` for CUDA
tensors, with the interface of its C++ module ``csrc/fused.cpp`` (the same functions, arguments
and outputs; registered as ``delrec.engine.fused.KERNELS["cuda"]``).

* :func:`lif_forward`, :func:`lif_backward`: a feedforward LIF layer, with dropout masks on its
  input current and on its spikes drawn inside the loop. Without recurrence every neuron of
  every sample is independent: one program per tile of ``(b, n)`` elements runs the whole time
  loop with the state in registers, reading the input and writing the output once per step
  (coalesced rows of the ``(T, B, N)`` layout). Saved for the backward: the membrane ``h`` (the
  spikes are ``h ≥ θ``); the backward runs the LIF adjoint in reverse time.
* :func:`integrator_forward`, :func:`integrator_backward`: the leaky-integrator readout
  ``v[t] = gain·u[t] + leak·v[t-1]`` (``v[-1] = 0``) and its adjoint, the same recursion
  backwards.
* :func:`dropout`: ``x ⊙ mask``, or the mask alone.
* :func:`batch_norm_forward`, :func:`batch_norm_backward`: BatchNorm over the ``T·B`` frames: a
  pass for the per-channel sums (float64, in fixed chunks of 256 frames, so the same sums on
  every GPU), a pass for the output; the same each way.

Dropout masks are those of :mod:`delrec.engine.dropout`: element ``(t, b, n)``, ``n = 128k +
16j + l``, is kept when half ``j div 4`` of word ``j mod 4`` of Philox4x32-10 with counter
``(16k + l, b + offset, t, 0)`` under the key ``(key mod 2³², key div 2³²)`` is below the
mask's threshold. Triton's ``tl.philox`` is that generator (Random123's multipliers, key
increments and ten rounds, the key split the same way), so the kernels draw the masks that the
C++ loops and the PyTorch ops draw, bit for bit (tests/test_triton_fused.py). The masked
kernels' tiles are whole chunks of 128 neurons of one batch row, shaped ``(chunk, draw j,
lane l)``: each thread holds the eight draws of one lane, one Philox block.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from delrec.engine.lif import PSI_TENSOR
from delrec.engine.triton.lif import (
    GAIN,
    INTERPRETED,
    LEAK,
    OFFSET,
    SURROGATE_PARAM,
    SURROGATE_SCALE,
    THRESHOLD,
    V0,
    V_RESET,
    adjoint_step,
    after_spike,
    device_tensor,
    dtype_of,
    elementwise_tiles,
    lif_constants,
    surrogate_slope,
)

# Tiles: chunks of 128 neurons per program of the LIF and dropout kernels, and their warps (8
# elements, one Philox block, per thread; the interpreter runs the same tiles: fewer, larger
# programs are faster there); frames and channels per block of the BatchNorm kernels (whose
# sums run over chunks of FRAMES frames), smaller under the interpreter so that small test
# sizes cross them.
CHUNKS, CHUNK_WARPS = 4, 2
NORM_FRAMES, NORM_CHANNELS = (16, 32) if INTERPRETED else (16, 64)
FRAMES = 256


# --------------------------------------------------------------------------- masks
@triton.jit
def _chunk_tile(tile, batch, n, CHUNKS: tl.constexpr):
    """Tile ``tile`` of a ``(B, N)`` step: ``CHUNKS`` chunks of 128 consecutive neurons of one
    batch row each, as ``(CHUNKS, 8, 16)`` (chunk, draw, lane). Returns each chunk's batch row
    and its index in that row (``(CHUNKS, 1, 1)``), each element's offset in the step (int64),
    and which elements exist."""
    per_row = tl.cdiv(n, 128)
    chunk = tile * CHUNKS + tl.arange(0, CHUNKS)
    row = (chunk // per_row)[:, None, None]
    k = (chunk % per_row)[:, None, None]
    column = 128 * k + 16 * tl.arange(0, 8)[None, :, None] + tl.arange(0, 16)[None, None, :]
    return row, k, row.to(tl.int64) * n + column, (row < batch) & (column < n)


@triton.jit
def _mask_of(row_ptr, DTYPE: tl.constexpr):
    """One mask of the mask table, whose rows are 4 int64 fields (key, threshold, batch offset,
    1/keep's float64 bits): its key, threshold (uint32), batch offset and the value of a kept
    element (in ``DTYPE``)."""
    key = tl.load(row_ptr)
    threshold = tl.load(row_ptr + 1).to(tl.uint32)
    offset = tl.load(row_ptr + 2)
    kept = tl.load(row_ptr + 3).to(tl.float64, bitcast=True).to(DTYPE)
    return key, threshold, offset, kept


@triton.jit
def _mask_values(key, threshold, offset, kept, row, k, step):
    """The mask's values over a tile of :func:`_chunk_tile` at time ``step``: ``kept`` where
    half ``j div 4`` of word ``j mod 4`` of the Philox block ``(16k + l, row + offset, step, 0)``
    is below ``threshold``, else 0; ``(CHUNKS, 8, 16)``. One block per lane: ``(CHUNKS, 1, 16)``.
    """
    first = (16 * k + tl.arange(0, 16)[None, None, :]).to(tl.uint32)
    zero = first * 0
    w0, w1, w2, w3 = tl.philox(
        key, first, zero + (row + offset).to(tl.uint32), zero + tl.cast(step, tl.uint32), zero
    )
    j = tl.arange(0, 8)[None, :, None]
    word = j % 4
    bits = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
    draws = tl.where(j < 4, bits & 0xFFFF, bits >> 16)
    return tl.where(draws < threshold, kept, 0.0)


@triton.jit(do_not_specialize=["batch", "n", "tiles"])
def _dropout_kernel(
    x_ptr,  # (T, B, N) (read when HAS_X)
    out_ptr,  # (T, B, N) out: x ⊙ mask, or the mask
    mask_ptr,  # (4,) int64: the mask's row of the mask table
    batch,
    n,
    tiles,  # tiles per step
    DTYPE: tl.constexpr,
    HAS_X: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    step = tl.program_id(0) // tiles
    row, k, at, ok = _chunk_tile(tl.program_id(0) % tiles, batch, n, CHUNKS)
    key, threshold, offset, kept = _mask_of(mask_ptr, DTYPE)
    values = _mask_values(key, threshold, offset, kept, row, k, step)
    now = batch.to(tl.int64) * n * step + at
    if HAS_X:
        values = tl.load(x_ptr + now, mask=ok, other=0.0) * values
    tl.store(out_ptr + now, values, mask=ok)


# --------------------------------------------------------------------------- LIF layer
@triton.jit(do_not_specialize=["steps", "batch", "n"])
def _lif_forward_kernel(
    current_ptr,  # (T, B, N)
    const_ptr,  # (8,) float64: the LIF constants
    masks_ptr,  # (2, 4) int64: the mask table (input, output)
    spikes_ptr,  # (T, B, N) out: s ⊙ m_out
    membrane_ptr,  # (T, B, N) out: h
    steps,
    batch,
    n,
    DTYPE: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    MASK_IN: tl.constexpr,
    MASK_OUT: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    """``h = (gain·(c ⊙ m_in) + offset) + leak·v``, ``s = Θ(h - θ)``, out ``s ⊙ m_out``."""
    leak = tl.load(const_ptr + LEAK).to(DTYPE)
    gain = tl.load(const_ptr + GAIN).to(DTYPE)
    offset = tl.load(const_ptr + OFFSET).to(DTYPE)
    threshold = tl.load(const_ptr + THRESHOLD).to(DTYPE)
    v_reset = tl.load(const_ptr + V_RESET).to(DTYPE)
    row, k, at, ok = _chunk_tile(tl.program_id(0), batch, n, CHUNKS)
    key_in, threshold_in, offset_in, kept_in = _mask_of(masks_ptr, DTYPE)
    key_out, threshold_out, offset_out, kept_out = _mask_of(masks_ptr + 4, DTYPE)
    size = batch.to(tl.int64) * n
    v = tl.zeros((CHUNKS, 8, 16), dtype=DTYPE) + tl.load(const_ptr + V0).to(DTYPE)
    for t in range(steps):
        now = size * t + at
        u = tl.load(current_ptr + now, mask=ok, other=0.0)
        if MASK_IN:
            u = u * _mask_values(key_in, threshold_in, offset_in, kept_in, row, k, t)
        h = (u * gain + offset) + leak * v
        spiked = h >= threshold
        tl.store(membrane_ptr + now, h, mask=ok)
        s = spiked.to(DTYPE)
        if MASK_OUT:
            s = s * _mask_values(key_out, threshold_out, offset_out, kept_out, row, k, t)
        tl.store(spikes_ptr + now, s, mask=ok)
        v = after_spike(h, spiked, threshold, v_reset, SOFT_RESET)


@triton.jit(do_not_specialize=["steps", "batch", "n"])
def _lif_backward_kernel(
    grad_out_ptr,  # (T, B, N): ∂L/∂(s ⊙ m_out)
    membrane_ptr,  # (T, B, N): h
    psi_ptr,  # (T, B, N): ψ'(h - θ) (read when SURROGATE == 0)
    const_ptr,  # (8,) float64
    masks_ptr,  # (2, 4) int64
    grad_current_ptr,  # (T, B, N) out
    steps,
    batch,
    n,
    DTYPE: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    MASK_IN: tl.constexpr,
    MASK_OUT: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    """The LIF adjoint in reverse time: ``∂L/∂s = ∂L/∂out ⊙ m_out``,
    ``∂L/∂c = gain·∂L/∂h ⊙ m_in``."""
    leak = tl.load(const_ptr + LEAK).to(DTYPE)
    gain = tl.load(const_ptr + GAIN).to(DTYPE)
    threshold = tl.load(const_ptr + THRESHOLD).to(DTYPE)
    v_reset = tl.load(const_ptr + V_RESET).to(DTYPE)
    param = tl.load(const_ptr + SURROGATE_PARAM).to(DTYPE)
    scale = tl.load(const_ptr + SURROGATE_SCALE).to(DTYPE)
    row, k, at, ok = _chunk_tile(tl.program_id(0), batch, n, CHUNKS)
    key_in, threshold_in, offset_in, kept_in = _mask_of(masks_ptr, DTYPE)
    key_out, threshold_out, offset_out, kept_out = _mask_of(masks_ptr + 4, DTYPE)
    size = batch.to(tl.int64) * n
    grad_h = tl.zeros((CHUNKS, 8, 16), dtype=DTYPE)  # ∂L/∂h[t+1]
    for step in range(steps):
        t = steps - 1 - step
        now = size * t + at
        h = tl.load(membrane_ptr + now, mask=ok, other=0.0)
        grad_s = tl.load(grad_out_ptr + now, mask=ok, other=0.0)
        if MASK_OUT:
            grad_s = grad_s * _mask_values(key_out, threshold_out, offset_out, kept_out, row, k, t)
        psi = surrogate_slope(h - threshold, psi_ptr + now, ok, param, scale, SURROGATE)
        grad_h = adjoint_step(
            grad_s, grad_h, h, psi, leak, threshold, v_reset, SOFT_RESET, DETACH_RESET
        )
        grad_u = grad_h * gain
        if MASK_IN:
            grad_u = grad_u * _mask_values(key_in, threshold_in, offset_in, kept_in, row, k, t)
        tl.store(grad_current_ptr + now, grad_u, mask=ok)


# --------------------------------------------------------------------------- readout
@triton.jit(do_not_specialize=["steps", "size"])
def _leaky_kernel(
    input_ptr,  # (T, B, K): u (forward) or ∂L/∂v (backward)
    output_ptr,  # (T, B, K): v (forward) or ∂L/∂u (backward)
    initial_ptr,  # (B, K): v[-1] (forward) or 0 (backward)
    scalars_ptr,  # (2,) float64: leak, gain
    steps,
    size,  # B·K
    DTYPE: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Forward: ``v[t] = gain·u[t] + leak·v[t-1]`` from ``v[-1]`` = initial. Reverse (the
    adjoint): ``a[t] = ∂L/∂v[t] + leak·a[t+1]``, ``∂L/∂u[t] = gain·a[t]``, from ``a[T] = 0``."""
    leak = tl.load(scalars_ptr).to(DTYPE)
    gain = tl.load(scalars_ptr + 1).to(DTYPE)
    at = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = at < size
    state = tl.load(initial_ptr + at, mask=ok, other=0.0)
    for step in range(steps):
        if REVERSE:
            now = size.to(tl.int64) * (steps - 1 - step) + at
            state = tl.load(input_ptr + now, mask=ok, other=0.0) + leak * state
            tl.store(output_ptr + now, gain * state, mask=ok)
        else:
            now = size.to(tl.int64) * step + at
            u = tl.load(input_ptr + now, mask=ok, other=0.0)
            state = gain * u + leak * state
            tl.store(output_ptr + now, state, mask=ok)


# --------------------------------------------------------------------------- BatchNorm
@triton.jit(do_not_specialize=["frames", "n"])
def _moments_kernel(
    a_ptr,  # (M, N): x (forward) or ∂L/∂y (backward)
    x_ptr,  # (M, N): x (read when CENTRED)
    centre_ptr,  # (N,): the mean in the dtype of x (read when CENTRED)
    partial_ptr,  # (chunks, 2, N) float64 out
    frames,
    n,
    CENTRED: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FRAMES: tl.constexpr,
):
    """Per-channel float64 sums over one chunk of ``FRAMES`` frames: ``Σa`` and ``Σa²``
    (forward), or ``Σa`` and ``Σa·(x - centre)`` (``CENTRED``, the backward)."""
    chunk = tl.program_id(0)
    channel = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    has_channel = channel < n
    if CENTRED:
        centre = tl.load(centre_ptr + channel, mask=has_channel, other=0.0)
    first = tl.zeros((BLOCK_F, BLOCK_N), dtype=tl.float64)
    second = tl.zeros((BLOCK_F, BLOCK_N), dtype=tl.float64)
    for start in range(0, FRAMES, BLOCK_F):
        frame = chunk * FRAMES + start + tl.arange(0, BLOCK_F)
        ok = (frame < frames)[:, None] & has_channel[None, :]
        at = frame.to(tl.int64)[:, None] * n + channel[None, :]
        a = tl.load(a_ptr + at, mask=ok, other=0.0).to(tl.float64)
        first += a
        if CENTRED:
            x = tl.load(x_ptr + at, mask=ok, other=0.0)
            second += a * (x - centre[None, :]).to(tl.float64)
        else:
            second += a * a
    out = partial_ptr + chunk.to(tl.int64) * 2 * n + channel
    tl.store(out, tl.sum(first, 0), mask=has_channel)
    tl.store(out + n, tl.sum(second, 0), mask=has_channel)


@triton.jit(do_not_specialize=["frames", "n"])
def _normalize_kernel(
    x_ptr,  # (M, N)
    grad_ptr,  # (M, N): ∂L/∂y (read when GRAD)
    centre_ptr,  # (N,): the mean in the dtype of x
    coef_ptr,  # (2 or 3, N): p, q (and r when GRAD) in the dtype of x
    out_ptr,  # (M, N) out
    partial_ptr,  # (chunks, N) float64 out (GRAD)
    frames,
    n,
    GRAD: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FRAMES: tl.constexpr,
):
    """Forward: ``y = (x - centre)·p + q``. Backward (``GRAD``): ``∂L/∂x = (p·g + q) +
    r·(x - centre)`` and its float64 sums per channel over the chunk."""
    chunk = tl.program_id(0)
    channel = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    has_channel = channel < n
    centre = tl.load(centre_ptr + channel, mask=has_channel, other=0.0)[None, :]
    p = tl.load(coef_ptr + channel, mask=has_channel, other=0.0)[None, :]
    q = tl.load(coef_ptr + n + channel, mask=has_channel, other=0.0)[None, :]
    if GRAD:
        r = tl.load(coef_ptr + 2 * n + channel, mask=has_channel, other=0.0)[None, :]
        total = tl.zeros((BLOCK_F, BLOCK_N), dtype=tl.float64)
    for start in range(0, FRAMES, BLOCK_F):
        frame = chunk * FRAMES + start + tl.arange(0, BLOCK_F)
        ok = (frame < frames)[:, None] & has_channel[None, :]
        at = frame.to(tl.int64)[:, None] * n + channel[None, :]
        centred = tl.load(x_ptr + at, mask=ok, other=0.0) - centre
        if GRAD:
            y = (p * tl.load(grad_ptr + at, mask=ok, other=0.0) + q) + r * centred
            total += tl.where(ok, y, 0.0).to(tl.float64)
        else:
            y = centred * p + q
        tl.store(out_ptr + at, y, mask=ok)
    if GRAD:
        tl.store(partial_ptr + chunk.to(tl.int64) * n + channel, tl.sum(total, 0), mask=has_channel)


# --------------------------------------------------------------------------- the interface
def _check_sequence(x: torch.Tensor, name: str) -> None:
    if x.dim() != 3 or not x.is_contiguous():
        raise ValueError(
            f"delrec fused kernel: {name} must be a contiguous (T, B, N) tensor, got shape "
            f"{tuple(x.shape)}{'' if x.is_contiguous() else ' (not contiguous)'}"
        )
    if x.shape[0] >= 2**31 or x.shape[1] >= 2**32:
        raise ValueError(f"delrec fused kernel: {name} is too long for 32-bit mask counters")


def _float_bits(value: float) -> int:
    """The bits of ``value`` as a float64, as a signed 64-bit integer."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _mask_table(masks, device: torch.device) -> torch.Tensor:
    """Masks as the C++ kernels take them, ``(active, key, threshold, scale, batch_offset)``, as
    the kernels read them: one int64 row each of key, threshold, batch offset and the bits of
    the value of a kept element (zeros for an inactive mask)."""
    rows = []
    for active, key, threshold, scale, offset in masks:
        if not active:
            rows.append([0, 0, 0, 0])
            continue
        if not 0 <= threshold <= 2**16:  # as philox.h's make_mask: 16-bit draws
            raise ValueError(f"delrec dropout: threshold must be in [0, 2^16], got {threshold}")
        rows.append([key, threshold, offset, _float_bits(scale)])
    return device_tensor(rows, torch.int64, device)


def _chunk_grid(batch: int, n: int) -> int:
    """Tiles of :func:`_chunk_tile` per step."""
    return triton.cdiv(batch * triton.cdiv(n, 128), CHUNKS)


def dropout(x: torch.Tensor | None, out: torch.Tensor, mask) -> None:
    """``out = x ⊙ mask`` (``x`` None: ``out = mask``), on ``(T, B, N)`` sequences."""
    _check_sequence(out, "out")
    if x is not None:
        _check_sequence(x, "x")
        if x.shape != out.shape or x.dtype != out.dtype:
            raise ValueError("delrec dropout: x and out differ in shape or dtype")
    if out.numel() == 0:
        return
    steps, batch, n = out.shape
    tiles = _chunk_grid(batch, n)
    _dropout_kernel[(steps * tiles,)](
        out if x is None else x,
        out,
        _mask_table([mask], out.device),
        batch,
        n,
        tiles,
        DTYPE=dtype_of(out),
        HAS_X=x is not None,
        CHUNKS=CHUNKS,
        num_warps=CHUNK_WARPS,
    )


def lif_forward(
    current,
    leak,
    gain,
    offset,
    v0,
    threshold,
    v_reset,
    soft_reset,
    in_mask,
    out_mask,
    spikes,
    membrane,
) -> None:
    """A feedforward LIF layer: fills ``spikes`` (``s ⊙ m_out``) and ``membrane`` (``h``)
    ``(T, B, N)`` from ``current`` (``c``, ``u = c ⊙ m_in``)."""
    for x, name in ((current, "current"), (spikes, "spikes"), (membrane, "membrane")):
        _check_sequence(x, name)
    if current.numel() == 0:
        return
    steps, batch, n = current.shape
    _lif_forward_kernel[(_chunk_grid(batch, n),)](
        current,
        lif_constants(leak, v0, threshold, v_reset, (0, 0.0), gain, offset, current.device),
        _mask_table([in_mask, out_mask], current.device),
        spikes,
        membrane,
        steps,
        batch,
        n,
        DTYPE=dtype_of(current),
        SOFT_RESET=bool(soft_reset),
        MASK_IN=bool(in_mask[0]),
        MASK_OUT=bool(out_mask[0]),
        CHUNKS=CHUNKS,
        num_warps=CHUNK_WARPS,
    )


def lif_backward(
    grad_out,
    membrane,
    psi,
    leak,
    gain,
    threshold,
    v_reset,
    soft_reset,
    detach_reset,
    surrogate,
    surrogate_param,
    in_mask,
    out_mask,
    grad_current,
) -> None:
    """Fills ``grad_current`` ``(T, B, N)`` with ``∂L/∂c`` of :func:`lif_forward` from
    ``∂L/∂spikes`` and the saved membrane. ``surrogate``: 1 Triangle(γ), 2 ATan(α) with
    ``surrogate_param`` γ or α, 0 any other (ψ'(h - θ) read from ``psi``, ``(T, B, N)``)."""
    for x, name in ((grad_out, "grad_out"), (membrane, "membrane"), (grad_current, "grad")):
        _check_sequence(x, name)
    if surrogate == PSI_TENSOR and (not psi.is_contiguous() or psi.shape != membrane.shape):
        raise ValueError("delrec fused kernel: ψ' must be a contiguous (T, B, N) tensor")
    if membrane.numel() == 0:
        return
    steps, batch, n = membrane.shape
    _lif_backward_kernel[(_chunk_grid(batch, n),)](
        grad_out,
        membrane,
        psi if surrogate == PSI_TENSOR else membrane,
        lif_constants(
            leak, 0.0, threshold, v_reset, (surrogate, surrogate_param), gain, 0.0, membrane.device
        ),
        _mask_table([in_mask, out_mask], membrane.device),
        grad_current,
        steps,
        batch,
        n,
        DTYPE=dtype_of(membrane),
        SOFT_RESET=bool(soft_reset),
        DETACH_RESET=bool(detach_reset),
        SURROGATE=int(surrogate),
        MASK_IN=bool(in_mask[0]),
        MASK_OUT=bool(out_mask[0]),
        CHUNKS=CHUNKS,
        num_warps=CHUNK_WARPS,
    )


def _leaky(x, out, initial, scalars: list[float], reverse: bool) -> None:
    _check_sequence(x, "input")
    _check_sequence(out, "output")
    if x.numel() == 0:
        return
    steps, size = x.shape[0], x[0].numel()
    block = elementwise_tiles()
    _leaky_kernel[(triton.cdiv(size, block),)](
        x,
        out,
        initial.contiguous(),
        # through a float64 tensor, so that float64 runs see the constants exactly
        device_tensor(scalars, torch.float64, x.device),
        steps,
        size,
        DTYPE=dtype_of(x),
        REVERSE=reverse,
        BLOCK=block,
    )


def integrator_forward(current, leak: float, gain: float, initial, out) -> None:
    """Fills ``out`` ``(T, B, K)`` with the membrane of leaky integrators driven by ``current``
    from the membrane ``initial`` ``(B, K)``."""
    _leaky(current, out, initial, [leak, gain], reverse=False)


def integrator_backward(grad_out, leak: float, gain: float, grad_current) -> None:
    """Fills ``grad_current`` ``(T, B, K)`` with ``∂L/∂u`` of :func:`integrator_forward`."""
    rest = grad_out.new_zeros(grad_out.shape[1:])
    _leaky(grad_out, grad_current, rest, [leak, gain], reverse=True)


def _norm_launch(x, grad, centre, coef, out, partial, grad_pass: bool) -> None:
    n = x.shape[-1]
    frames = x.numel() // n
    grid = (triton.cdiv(frames, FRAMES), triton.cdiv(n, NORM_CHANNELS))
    _normalize_kernel[grid](
        x,
        x if grad is None else grad,
        centre,
        coef,
        out,
        partial,
        frames,
        n,
        GRAD=grad_pass,
        BLOCK_F=NORM_FRAMES,
        BLOCK_N=NORM_CHANNELS,
        FRAMES=FRAMES,
    )


def _moments(a, x, centre) -> torch.Tensor:
    """``(2, N)`` float64: ``Σa, Σa²`` over the frames, or ``Σa, Σa·(x - centre)``."""
    n = a.shape[-1]
    frames = a.numel() // n
    chunks = triton.cdiv(frames, FRAMES)
    partial = torch.empty((chunks, 2, n), dtype=torch.float64, device=a.device)
    _moments_kernel[(chunks, triton.cdiv(n, NORM_CHANNELS))](
        a,
        a if x is None else x,
        a if centre is None else centre,
        partial,
        frames,
        n,
        CENTRED=x is not None,
        BLOCK_F=NORM_FRAMES,
        BLOCK_N=NORM_CHANNELS,
        FRAMES=FRAMES,
    )
    return partial.sum(0)


def batch_norm_forward(x, weight, bias, eps: float, out, mean, var) -> None:
    """BatchNorm in training over the ``T·B`` frames of ``x`` ``(T, B, N)``: fills ``out``,
    and the per-channel ``mean`` and biased ``var`` ``(N,)`` (float64)."""
    _check_sequence(x, "x")
    if mean.dtype != torch.float64 or var.dtype != torch.float64:
        raise ValueError("delrec batch norm: mean and var are float64")
    n = x.shape[-1]
    if x.numel() == 0:
        raise ValueError("delrec batch norm: no frames or no channels to normalise")
    frames = x.numel() // n
    sums = _moments(x, None, None)
    torch.div(sums[0], frames, out=mean)
    torch.clamp(sums[1] / frames - mean * mean, min=0.0, out=var)
    scale = weight.double() / (var + eps).sqrt()
    coef = torch.stack([scale.to(x.dtype), bias.to(x.dtype)])
    centre = mean.to(x.dtype)
    _norm_launch(x, None, centre, coef, out, out, grad_pass=False)


def batch_norm_backward(grad, x, mean, invstd, weight, grad_x, sums) -> None:
    """Fills ``grad_x`` and ``sums`` ``(3, N)`` float64 = ``(S1, S2, Σ ∂L/∂x)`` with
    ``S1 = Σ g``, ``S2 = Σ g·(x - mean)``: ``∂L/∂x = γ·invstd·(g - S1/M - (x - mean)·invstd²·
    S2/M)``, ``∂L/∂γ = S2·invstd``, ``∂L/∂β = S1`` (the last row: the gradient of a bias added
    to ``x`` before the normalisation, zero up to rounding)."""
    _check_sequence(grad, "grad")
    _check_sequence(x, "x")
    n = x.shape[-1]
    if sums.dtype != torch.float64 or sums.numel() != 3 * n:
        raise ValueError("delrec batch norm: sums must be (3, N) float64")
    if x.numel() == 0:
        raise ValueError("delrec batch norm: no frames or no channels to normalise")
    frames = x.numel() // n
    centre = mean.to(x.dtype)
    moments = _moments(grad, x, centre)
    a = weight.double() * invstd
    coef = torch.stack(
        [a, -a * moments[0] / frames, -a * invstd * invstd * moments[1] / frames]
    ).to(x.dtype)
    partial = torch.empty((triton.cdiv(frames, FRAMES), n), dtype=torch.float64, device=x.device)
    _norm_launch(x, grad, centre, coef, grad_x, partial, grad_pass=True)
    sums.view(3, n)[:2].copy_(moments)
    sums.view(3, n)[2].copy_(partial.sum(0))
