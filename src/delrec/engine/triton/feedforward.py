"""Feedforward LIF layers and the leaky-integrator readout in Triton, forward and backward.

Without recurrence every neuron of every sample is independent: one program per block of
``(b, n)`` elements runs the whole time loop with the state in registers, reading the input
and writing the output once per step (coalesced rows of the ``(T, B, N)`` layout). Saved for
the backward of a LIF layer: its membrane ``h`` (the spikes are ``h ≥ θ``); the backward runs
the LIF adjoint in reverse time. The readout ``v[t] = leak·v[t-1] + gain·u[t]`` needs nothing
saved: its adjoint is the same recursion backwards.

The four loops are plain functions of tensors (:func:`lif_forward`, :func:`lif_backward`,
:func:`leaky_forward`, :func:`leaky_backward`) for any autograd wrapper; :func:`lif_sequence`
and :func:`leaky_sequence` are differentiable versions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from delrec.engine.triton.lif import (
    GAIN,
    LEAK,
    OFFSET,
    PSI_TENSOR,
    SURROGATE_PARAM,
    SURROGATE_SCALE,
    THRESHOLD,
    V0,
    V_RESET,
    adjoint_step,
    after_spike,
    constants,
    dtype_of,
    elementwise_tiles,
    surrogate_code,
    surrogate_slope,
)


@triton.jit(do_not_specialize=["steps", "size"])
def _lif_forward_kernel(
    current_ptr,  # (T, B, N)
    const_ptr,  # (8,) float64: the LIF constants
    spikes_ptr,  # (T, B, N) out
    membrane_ptr,  # (T, B, N) out: h
    steps,
    size,  # B·N
    DTYPE: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    leak = tl.load(const_ptr + LEAK).to(DTYPE)
    gain = tl.load(const_ptr + GAIN).to(DTYPE)
    offset = tl.load(const_ptr + OFFSET).to(DTYPE)
    threshold = tl.load(const_ptr + THRESHOLD).to(DTYPE)
    v_reset = tl.load(const_ptr + V_RESET).to(DTYPE)
    at = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = at < size
    v = tl.zeros((BLOCK,), dtype=DTYPE) + tl.load(const_ptr + V0).to(DTYPE)
    for t in range(steps):
        now = size.to(tl.int64) * t + at
        h = (tl.load(current_ptr + now, mask=ok, other=0.0) * gain + offset) + leak * v
        spiked = h >= threshold
        tl.store(membrane_ptr + now, h, mask=ok)
        tl.store(spikes_ptr + now, spiked.to(DTYPE), mask=ok)
        v = after_spike(h, spiked, threshold, v_reset, SOFT_RESET)


@triton.jit(do_not_specialize=["steps", "size"])
def _lif_backward_kernel(
    grad_spikes_ptr,  # (T, B, N)
    membrane_ptr,  # (T, B, N): h
    psi_ptr,  # (T, B, N): ψ'(h - θ) (read when SURROGATE == 0)
    const_ptr,  # (8,) float64
    grad_current_ptr,  # (T, B, N) out
    steps,
    size,
    DTYPE: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    leak = tl.load(const_ptr + LEAK).to(DTYPE)
    gain = tl.load(const_ptr + GAIN).to(DTYPE)
    threshold = tl.load(const_ptr + THRESHOLD).to(DTYPE)
    v_reset = tl.load(const_ptr + V_RESET).to(DTYPE)
    param = tl.load(const_ptr + SURROGATE_PARAM).to(DTYPE)
    scale = tl.load(const_ptr + SURROGATE_SCALE).to(DTYPE)
    at = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = at < size
    grad_h = tl.zeros((BLOCK,), dtype=DTYPE)  # ∂L/∂h[t+1]
    for step in range(steps):
        now = size.to(tl.int64) * (steps - 1 - step) + at
        h = tl.load(membrane_ptr + now, mask=ok, other=0.0)
        grad_s = tl.load(grad_spikes_ptr + now, mask=ok, other=0.0)
        psi = surrogate_slope(h - threshold, psi_ptr + now, ok, param, scale, SURROGATE)
        grad_h = adjoint_step(
            grad_s, grad_h, h, psi, leak, threshold, v_reset, SOFT_RESET, DETACH_RESET
        )
        tl.store(grad_current_ptr + now, grad_h * gain, mask=ok)


@triton.jit(do_not_specialize=["steps", "size"])
def _leaky_kernel(
    input_ptr,  # (T, B, K): u (forward) or ∂L/∂v (backward)
    output_ptr,  # (T, B, K): v (forward) or ∂L/∂u (backward)
    scalars_ptr,  # (2,) float64: leak, gain
    steps,
    size,  # B·K
    DTYPE: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Forward: ``v[t] = leak·v[t-1] + gain·u[t]``. Reverse (the adjoint):
    ``g[t] = ∂L/∂v[t] + leak·g[t+1]``, ``∂L/∂u[t] = gain·g[t]``."""
    leak = tl.load(scalars_ptr).to(DTYPE)
    gain = tl.load(scalars_ptr + 1).to(DTYPE)
    at = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = at < size
    state = tl.zeros((BLOCK,), dtype=DTYPE)
    for step in range(steps):
        if REVERSE:
            now = size.to(tl.int64) * (steps - 1 - step) + at
            state = tl.load(input_ptr + now, mask=ok, other=0.0) + leak * state
            tl.store(output_ptr + now, gain * state, mask=ok)
        else:
            now = size.to(tl.int64) * step + at
            state = leak * state + gain * tl.load(input_ptr + now, mask=ok, other=0.0)
            tl.store(output_ptr + now, state, mask=ok)


def _grid(size: int):
    block = elementwise_tiles()
    return (triton.cdiv(size, block),), block


def lif_forward(current, lif):
    """Spikes and membrane ``h`` ``(T, B, N)`` of a feedforward LIF layer (no recurrence).

    current: input ``(T, B, N)``; lif: the engine's LIF map (leak, gain, offset, v0 and the
    :class:`~delrec.neurons.LIFParameters` ``p``)."""
    current = current.contiguous()
    steps, size = current.shape[0], current[0].numel()
    spikes, membrane = torch.empty_like(current), torch.empty_like(current)
    grid, block = _grid(size)
    _lif_forward_kernel[grid](
        current,
        constants(lif, current.device),
        spikes,
        membrane,
        steps,
        size,
        DTYPE=dtype_of(current),
        SOFT_RESET=lif.p.soft_reset,
        BLOCK=block,
    )
    return spikes, membrane


def lif_backward(grad_spikes, membrane, lif):
    """``∂L/∂current`` ``(T, B, N)`` of a feedforward LIF layer from ``∂L/∂spikes`` and the
    membrane :func:`lif_forward` returned."""
    p = lif.p
    code = surrogate_code(p)
    psi = (
        p.surrogate.derivative(membrane - p.v_threshold).contiguous()
        if code == PSI_TENSOR
        else membrane
    )
    steps, size = membrane.shape[0], membrane[0].numel()
    grad_current = torch.empty_like(membrane)
    grid, block = _grid(size)
    _lif_backward_kernel[grid](
        grad_spikes.contiguous(),
        membrane,
        psi,
        constants(lif, membrane.device),
        grad_current,
        steps,
        size,
        DTYPE=dtype_of(membrane),
        SOFT_RESET=p.soft_reset,
        DETACH_RESET=p.detach_reset,
        SURROGATE=code,
        BLOCK=block,
    )
    return grad_current


def _leaky(x, leak: float, gain: float, reverse: bool):
    x = x.contiguous()
    out = torch.empty_like(x)
    steps, size = x.shape[0], x[0].numel()
    grid, block = _grid(size)
    # leak and gain go through a float64 tensor so that float64 runs see them exactly
    scalars = torch.tensor([leak, gain], dtype=torch.float64, device=x.device)
    _leaky_kernel[grid](
        x, out, scalars, steps, size, DTYPE=dtype_of(x), REVERSE=reverse, BLOCK=block
    )
    return out


def leaky_forward(current, leak: float, gain: float):
    """Membrane ``v`` ``(T, B, K)`` of a leaky integrator ``v[t] = leak·v[t-1] + gain·u[t]``
    from ``v[-1] = 0`` (:class:`~delrec.neurons.LeakyIntegrator`: ``leak = 1 - 1/τ``, ``gain``
    ``1/τ`` with decay_input, else 1)."""
    return _leaky(current, leak, gain, reverse=False)


def leaky_backward(grad_membrane, leak: float, gain: float):
    """``∂L/∂u`` ``(T, B, K)`` of :func:`leaky_forward` from ``∂L/∂v``."""
    return _leaky(grad_membrane, leak, gain, reverse=True)


# --------------------------------------------------------------------------- autograd
class _LIFSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, current, lif):
        spikes, membrane = lif_forward(current, lif)
        ctx.lif = lif
        ctx.save_for_backward(membrane)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        (membrane,) = ctx.saved_tensors
        return lif_backward(grad_spikes, membrane, ctx.lif), None


class _LeakySequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, current, leak: float, gain: float):
        ctx.leak, ctx.gain = leak, gain
        return leaky_forward(current, leak, gain)

    @staticmethod
    def backward(ctx, grad_membrane):
        return leaky_backward(grad_membrane, ctx.leak, ctx.gain), None, None


def lif_sequence(current, lif):
    """Spikes ``(T, B, N)`` of a feedforward LIF layer, differentiable in ``current``."""
    return _LIFSequence.apply(current, lif)


def leaky_sequence(current, leak: float, gain: float):
    """Membrane ``(T, B, K)`` of a leaky integrator, differentiable in ``current``."""
    return _LeakySequence.apply(current, leak, gain)
