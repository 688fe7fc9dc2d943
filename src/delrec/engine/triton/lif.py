"""What every Triton kernel shares: the LIF step and its adjoint, the matrix product, the tiles.

The LIF step is the affine charge map of the engine (``h = leak·v + gain·c + offset``, the
feedforward part ``gain·c + offset`` computed by the caller), then fire (``h ≥ θ``) and reset;
its adjoint is the engine's ``adjoint_step``. The constants travel as one float64 tensor
(:func:`constants`) and are cast to the kernel's dtype inside, so a float64 run sees float64
constants (Triton would pass Python floats as float32).

Matrix products inside kernels are float32 products without TF32 rounding (TF32 keeps 10 bits
of each input and would flip spikes): exact fused multiply-adds (``input_precision="ieee"``)
up to N = 512, and from there on, where the product dominates the step, three TF32 tensor-core
products on a split of each input into a high and a low TF32 part (``"tf32x3"``): 21 to 22
bits of each input against float32's 24, the error of a float32 product summed in another
order. In float64 the product is a broadcast multiply and sum (no float64 ``tl.dot`` is assumed
of the hardware).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from delrec.engine.lif import ATAN, PSI_TENSOR, TRIANGLE
from delrec.engine.triton import interpreting


def _patch_interpreter_scalars() -> None:
    """Triton 3.6's interpreter converts a loop bound to ``int`` from a one-element numpy array,
    which numpy ≥ 2.4 refuses (triton-lang/triton#9171, fixed after 3.6): convert the element."""
    import numpy as np

    try:
        int(np.ones(1, dtype=np.int32))
        return  # this numpy still converts
    except TypeError:
        pass
    from triton.runtime import interpreter

    if getattr(interpreter._patch_lang_tensor, "delrec_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.delrec_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor


# whether the kernels of this process are interpreted (decided when they are defined)
INTERPRETED = interpreting()
if INTERPRETED:
    _patch_interpreter_scalars()


# --------------------------------------------------------------------------- constants
# slots of the constants tensor (compile-time constants of the kernels)
LEAK, V0, THRESHOLD, V_RESET, SURROGATE_PARAM, SURROGATE_SCALE, GAIN, OFFSET = (
    tl.constexpr(slot) for slot in range(8)
)


def psi_or_placeholder(lif, membrane: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The surrogate code of the engine's LIF map ``lif`` and the tensor the backward kernels
    read ψ' from: ``ψ'(h - θ)`` for a surrogate they don't know
    (:data:`~delrec.engine.lif.PSI_TENSOR`), else ``membrane`` as an unread placeholder."""
    code, _, psi = lif.native_slope(membrane)
    return code, psi.contiguous() if code == PSI_TENSOR else membrane


def constants(lif, device: torch.device) -> torch.Tensor:
    """The constants of the engine's LIF map ``lif`` (leak, gain, offset, v0 and the
    parameters ``p``) as the kernels read them: :func:`lif_constants`."""
    p = lif.p
    return lif_constants(
        lif.leak,
        lif.v0,
        p.v_threshold,
        p.v_reset or 0.0,
        lif.native_surrogate(),
        lif.gain,
        lif.offset,
        device,
    )


def lif_constants(
    leak: float,
    v0: float,
    threshold: float,
    v_reset: float,
    surrogate: tuple[int, float],
    gain: float,
    offset: float,
    device: torch.device,
) -> torch.Tensor:
    """The LIF constants as the kernels read them, float64 ``(8,)`` on ``device``.
    ``surrogate``: ``(code, param)`` as :meth:`~delrec.engine.lif.LIFMap.native_surrogate`
    gives it. For Triangle(γ) the surrogate's (param, scale) are ``(γ, γ²)``:
    ``ψ' = max(0, γ - |x|)/γ²``; for ATan(α), ``(α/2, πα/2)``: ``ψ' = (α/2)/(1 + (πα/2·x)²)``."""
    code, value = surrogate
    param, scale = 0.0, 1.0
    if code == TRIANGLE:
        param, scale = value, value * value
    elif code == ATAN:
        param, scale = value / 2, math.pi / 2 * value
    values = [leak, v0, threshold, v_reset, param, scale, gain, offset]
    return device_tensor(values, torch.float64, device)


def device_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of ``values`` on ``device``. To a GPU it is copied from pinned memory
    without waiting (a plain copy from pageable memory would synchronise the host with the
    GPU at every kernel launch)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


def dtype_of(t: torch.Tensor):
    """The Triton dtype of a floating tensor (float32 or float64)."""
    if t.dtype == torch.float32:
        return tl.float32
    if t.dtype == torch.float64:
        return tl.float64
    raise TypeError(f"the Triton kernels run float32 or float64 tensors, got {t.dtype}")


# --------------------------------------------------------------------------- tiles
@dataclass(frozen=True)
class Tiles:
    """Block sizes of a kernel launch: batch rows per program, neurons per block of the
    recursion sweep and of the product's output, the product's inner dimension, warps per
    program, and the float32 product's ``tl.dot`` precision."""

    batch: int
    recursion: int
    neurons: int
    inner: int
    warps: int = 8
    precision: str = "ieee"


# Interpreter runs use small blocks so that small test sizes cross every block boundary.
INTERPRETER_TILES = Tiles(batch=16, recursion=32, neurons=32, inner=32, warps=1)


# From this size on the recurrent product dominates a step: it runs on the tensor cores in
# three TF32 parts (module docstring).
SPLIT_TF32_FROM = 513


def recurrent_tiles(n: int, dtype: torch.dtype, wide: bool = False) -> Tiles:
    """Tiles of the recurrent kernels: 16 batch rows per program (the smallest ``tl.dot``, so
    the most programs); the recursion sweeps up to 128 neurons at a time (its loads are
    gathers whose latency a wide block amortises); the product's output blocks hold 64 neurons
    and its inner blocks 32 (the largest that eight warps keep in registers without spilling,
    tests/triton_compile.py). In float64 the product is a broadcast sum whose
    ``(rows, inner, neurons)`` block lives in registers, so its blocks are smaller. ``wide``
    (the axonal kernels): from N = 513 on, output blocks of 256 neurons on 16 warps, the
    fastest of a sweep on an H200 at N = 1024 (212 → 148 ms per training step, docs/gpu.md),
    although the backward then spills a few hundred bytes."""
    if INTERPRETED:
        return INTERPRETER_TILES
    recursion = min(128, triton.next_power_of_2(n))
    if dtype == torch.float64:
        return Tiles(batch=16, recursion=min(recursion, 64), neurons=16, inner=16)
    precision = "tf32x3" if n >= SPLIT_TF32_FROM else "ieee"
    if wide and n >= SPLIT_TF32_FROM:
        return Tiles(
            batch=16, recursion=recursion, neurons=256, inner=32, warps=16, precision=precision
        )
    neurons = 32 if n <= 32 else 64
    return Tiles(batch=16, recursion=recursion, neurons=neurons, inner=32, precision=precision)


def elementwise_tiles() -> int:
    """Elements per program of the readout's time loop (the leaky integrator)."""
    return 64 if INTERPRETED else 256


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def matmul(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b``: a float32 product at ``PRECISION`` ("ieee" or "tf32x3"), or in float64
    a broadcast sum."""
    if a.dtype == tl.float64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def after_spike(h, spiked, threshold, v_reset, SOFT_RESET: tl.constexpr):
    """``v[t]`` from ``h[t]`` and the spike: ``h - θ`` (soft reset) or ``v_reset`` (hard)."""
    if SOFT_RESET:
        v = tl.where(spiked, h - threshold, h)
    else:
        v = tl.where(spiked, v_reset, h)
    return v


@triton.jit
def surrogate_slope(x, psi_ptrs, m, param, scale, SURROGATE: tl.constexpr):
    """``ψ'(x)``: Triangle ``max(0, γ-|x|)/γ²`` (1), ATan ``(α/2)/(1+(πα/2·x)²)`` (2), or read
    from ``psi_ptrs`` (0)."""
    if SURROGATE == 1:
        top = param - tl.abs(x)
        slope = tl.where(top > 0, top, 0.0) / scale
    elif SURROGATE == 2:
        scaled = scale * x
        slope = param / (1.0 + scaled * scaled)
    else:
        slope = tl.load(psi_ptrs, mask=m, other=0.0)
    return slope


@triton.jit
def adjoint_step(
    grad_s,
    grad_h_next,
    h,
    psi,
    leak,
    threshold,
    v_reset,
    SOFT_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr,
):
    """``∂L/∂h[t]`` from ``∂L/∂s[t]`` (every path but the reset) and ``∂L/∂h[t+1]``: with
    ``gv = leak·∂L/∂h[t+1]``, ``ψ'·(gs + gv·∂v/∂s) + gv·∂v/∂h`` (``∂v/∂s`` cut by
    detach_reset)."""
    gv = grad_h_next * leak
    if not DETACH_RESET:
        if SOFT_RESET:
            grad_s += -threshold * gv
        else:
            grad_s += gv * (v_reset - h)
    if not SOFT_RESET:
        gv = tl.where(h >= threshold, 0.0, gv)
    return gv + psi * grad_s
