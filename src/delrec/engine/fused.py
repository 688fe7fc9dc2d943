"""The network around the delays, fused: feedforward LIF layers, the leaky-integrator readout,
dropout and BatchNorm over time, each one compiled loop forward and one backward.

The reference for all of them is the step-by-step autograd of :mod:`delrec.neurons` (and
``nn.BatchNorm1d``, a multiplication by the mask); the fused paths compute the same:

* :func:`lif_layer`: a non-recurrent LIF layer ``current (T, B, N) → spikes (T, B, N)``, the
  neuron as every engine computes it (``h = leak·v + gain·u + offset``, fire, reset; the
  surrogate's ψ' in the backward), optionally with a dropout mask on its input or its output
  drawn inside the loop. Saved for backward: the pre-spike membrane (the spikes are ``h ≥ θ``;
  the masks are drawn again), ``T·B·N`` numbers.
* :func:`integrate`: the leaky-integrator readout, ``v[t] = leak·v[t-1] + gain·u[t]``; saves
  nothing.
* :func:`dropped`: ``x ⊙ mask`` with the mask of :mod:`delrec.engine.dropout` drawn in the
  loop, forward and backward; saves nothing. :func:`dropout_mask`: the mask itself.
* :func:`batch_norm`: BatchNorm with the statistics of all ``T·B`` frames, the bias of the
  linear map in front folded into its statistics; saves its input and two numbers per channel.
* :func:`linear`: ``F.linear`` of spikes, the forward and the weight gradient over the non-zero
  inputs only (on the CPU, where the input is sparse enough); saves the non-zeros.

They run the C++ loops of ``csrc/fused.cpp`` (built by :mod:`delrec.engine.native`) on CPU
tensors and the Triton kernels of :mod:`delrec.engine.triton.fused` (the same functions) on
CUDA tensors: whatever :func:`kernels_for` finds for the device; the network's feedforward
engine (:func:`delrec.models.set_feedforward_engine`) chooses between them and the reference
once per forward. Other devices register their kernels in :data:`KERNELS` under their device
type, with the signatures of the C++ functions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.profiler import record_function

from delrec.engine import native
from delrec.engine import triton as gpu
from delrec.engine.autograd import first_order
from delrec.engine.dropout import MaskDraw, reference_mask
from delrec.engine.dropout import native as native_mask
from delrec.engine.lif import LIFMap
from delrec.neurons import LIFParameters

NETWORK_ENGINES = ("fused", "reference")  # the choices of the network's feedforward engine
NETWORK = (
    "the fused network engine (LIF layers, readout, BatchNorm)",
    "run the network's feedforward layers by autograd, "
    "delrec.models.set_feedforward_engine(network, 'reference'), and its DelRec layers with "
    "engine='reference'",
)


def _triton_kernels(device_type: str):
    """Loader of the Triton kernels (:mod:`delrec.engine.triton.fused`, the interface of the
    C++ module) for tensors of ``device_type``, or ``None`` where they don't run
    (:func:`delrec.engine.triton.runs_on`: compiled on CUDA with ``triton``; on the CPU only
    under Triton's interpreter when offered, as a dry run of the GPU benchmark does)."""

    def load():
        if not gpu.runs_on(torch.device(device_type)):
            return None
        from delrec.engine.triton import fused as kernels

        return kernels

    return load


# device type -> loader of the kernel module: the C++ one on the CPU (or, in a dry run of the
# GPU benchmark without it, the interpreted Triton one), the Triton one on CUDA
KERNELS = {
    "cpu": lambda: native.load("fused") or _triton_kernels("cpu")(),
    "cuda": _triton_kernels("cuda"),
}


def kernels_for(device: torch.device):
    """The fused kernels for tensors on ``device``, or ``None`` (then the reference runs)."""
    loader = KERNELS.get(device.type)
    return loader() if loader is not None else None


def _kernels(device: torch.device):
    """:func:`kernels_for`, or an error that says what to do instead."""
    kernels = kernels_for(device)
    if kernels is None:
        raise RuntimeError(
            f"no fused kernels for {device} tensors (DELREC_NATIVE=0, a failed build, or another "
            "device): run the reference, set_feedforward_engine(network, 'reference')"
        )
    return kernels


# --------------------------------------------------------------------------- LIF layer
class _LIFLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, current, lif: LIFMap, mask_in, mask_out, kernels):
        p = lif.p
        current = current.contiguous()
        spikes, membrane = torch.empty_like(current), torch.empty_like(current)
        dtype = current.dtype
        kernels.lif_forward(
            current,
            lif.leak,
            lif.gain,
            lif.offset,
            lif.v0,
            p.v_threshold,
            p.v_reset or 0.0,
            p.soft_reset,
            native_mask(mask_in, dtype),
            native_mask(mask_out, dtype),
            spikes,
            membrane,
        )
        ctx.save_for_backward(membrane)
        ctx.lif, ctx.masks, ctx.kernels = lif, (mask_in, mask_out), kernels
        return spikes

    @staticmethod
    @first_order(*NETWORK)
    def backward(ctx, grad_spikes):
        (membrane,) = ctx.saved_tensors
        lif: LIFMap = ctx.lif
        p = lif.p
        code, param, psi = lif.native_slope(membrane)
        grad_current = torch.empty_like(membrane)
        mask_in, mask_out = ctx.masks
        dtype = membrane.dtype
        ctx.kernels.lif_backward(
            grad_spikes.contiguous(),
            membrane,
            psi.contiguous(),
            lif.leak,
            lif.gain,
            p.v_threshold,
            p.v_reset or 0.0,
            p.soft_reset,
            p.detach_reset,
            code,
            param,
            native_mask(mask_in, dtype),
            native_mask(mask_out, dtype),
            grad_current,
        )
        return grad_current, None, None, None, None


@torch.compiler.disable  # torch.compile runs it as it is (delrec.engine docstring)
def lif_layer(
    current: Tensor,
    params: LIFParameters,
    mask_in: MaskDraw | None = None,
    mask_out: MaskDraw | None = None,
) -> Tensor:
    """Spikes ``(T, B, N)`` of a feedforward LIF layer driven by ``current`` ``(T, B, N)`` from
    the zero state (``v = v_reset``, 0 for a soft reset), differentiable in ``current``.

    ``mask_in``: dropout on the current (``u = c ⊙ m``); ``mask_out``: dropout on the spikes.
    Same as :class:`delrec.neurons.LIF` on ``c ⊙ m_in``, times ``m_out``.
    """
    return _LIFLayer.apply(current, LIFMap.of(params), mask_in, mask_out, _kernels(current.device))


# --------------------------------------------------------------------------- readout
class _Integrator(torch.autograd.Function):
    @staticmethod
    def forward(ctx, current, initial, leak: float, gain: float, kernels):
        current = current.contiguous()
        out = torch.empty_like(current)
        kernels.integrator_forward(current, leak, gain, initial.contiguous(), out)
        ctx.constants, ctx.kernels = (leak, gain), kernels
        return out

    @staticmethod
    @first_order(*NETWORK)
    def backward(ctx, grad_out):
        leak, gain = ctx.constants
        grad_current = torch.empty_like(grad_out, memory_format=torch.contiguous_format)
        ctx.kernels.integrator_backward(grad_out.contiguous(), leak, gain, grad_current)
        # ∂L/∂v[-1] = leak·a[0], and ∂L/∂u[0] = gain·a[0]
        grad_initial = grad_current[0] * (leak / gain) if ctx.needs_input_grad[1] else None
        return grad_current, grad_initial, None, None, None


@torch.compiler.disable  # torch.compile runs it as it is (delrec.engine docstring)
def integrate(
    current: Tensor, tau: float, decay_input: bool, initial: Tensor | None = None
) -> Tensor:
    """Membrane sequence ``(T, B, K)`` of leaky integrators (:class:`delrec.neurons.
    LeakyIntegrator`: ``v[t] = (1 - 1/τ)·v[t-1] + u[t]``, ``u[t]/τ`` with ``decay_input``),
    from the membrane ``initial`` ``(B, K)`` (default: at rest, 0)."""
    lif = LIFMap.of(LIFParameters(tau=tau, v_reset=None, decay_input=decay_input))
    if initial is None:
        initial = current.new_zeros(current.shape[1:])
    return _Integrator.apply(current, initial, lif.leak, lif.gain, _kernels(current.device))


# --------------------------------------------------------------------------- dropout
def _times_mask(x: Tensor, draw: MaskDraw, kernels) -> Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    kernels.dropout(x, out, draw.native(x.dtype))
    return out


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, draw: MaskDraw, kernels):
        ctx.draw, ctx.kernels = draw, kernels
        return _times_mask(x, draw, kernels)

    @staticmethod
    def backward(ctx, grad_out):  # x ⊙ m again: differentiable any number of times
        return _Dropout.apply(grad_out, ctx.draw, ctx.kernels), None, None


@torch.compiler.disable  # torch.compile runs it as it is (delrec.engine docstring)
def dropped(x: Tensor, draw: MaskDraw) -> Tensor:
    """``x ⊙ mask`` for a ``(T, B, N)`` tensor, differentiable: where there are kernels for
    ``x``'s device the mask is drawn in their loop both ways, else materialised (the same
    values)."""
    kernels = kernels_for(x.device)
    if kernels is None:
        return x * reference_mask(tuple(x.shape), draw, x.dtype, x.device)
    return _Dropout.apply(x, draw, kernels)


@torch.compiler.disable  # torch.compile runs it as it is (delrec.engine docstring)
def dropout_mask(shape: tuple[int, int, int], draw: MaskDraw, dtype=torch.float32, device=None):
    """The mask of a ``(T, B, N)`` tensor (``1/keep`` where kept, 0 where dropped), drawn by the
    kernels where there are some for ``device``, else by PyTorch ops: the same values."""
    kernels = kernels_for(torch.device(device or "cpu"))
    if kernels is None:
        return reference_mask(shape, draw, dtype, device)
    out = torch.empty(shape, dtype=dtype, device=device)
    kernels.dropout(None, out, draw.native(dtype))
    return out


# --------------------------------------------------------------------------- spike products
# where the spike products pay (docs/speed.md#spike-products, benchmarks/bench_spike_products.py)
MIN_OUTPUTS = 64  # narrower maps (a readout) gain nothing: one block of outputs per input
MIN_ROWS = 1024  # T·B frames; fewer (a streamed step) cost less than the path's fixed overhead
MAX_DENSITY = 0.15  # share of non-zero inputs; the dense product is faster from ~20 % on


class _SpikeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, compressed, kernels):  # x (M, I), compressed by rows
        out = x.new_empty(x.shape[0], weight.shape[0])
        bias = None if bias is None else bias.contiguous()
        kernels.sparse_linear(*compressed, weight.t().contiguous(), bias, out)
        ctx.save_for_backward(weight, *compressed)
        ctx.kernels, ctx.has_bias = kernels, bias is not None
        return out

    @staticmethod
    @first_order(*NETWORK)
    def backward(ctx, grad_out):
        weight, *compressed = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None  # dense: not sparse
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight_t = grad_out.new_empty(weight.shape[1], weight.shape[0])
            ctx.kernels.sparse_weight_grad(*compressed, grad_out, grad_weight_t)
            grad_weight = grad_weight_t.t().contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(0)
        return grad_x, grad_weight, grad_bias, None, None


@torch.compiler.disable  # torch.compile runs it as it is (delrec.engine docstring)
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` ``(..., I)``, weight ``(O, I)``: on CPU tensors
    with at least :data:`MIN_OUTPUTS` outputs, :data:`MIN_ROWS` rows (``x.numel() / I``) and at
    most :data:`MAX_DENSITY` non-zero inputs (spikes), the product and the weight gradient run
    over the non-zeros only (the input gradient is the dense ``grad·W``); elsewhere
    ``F.linear`` itself. Same values up to rounding; differentiable once."""
    kernels = native.load("fused") if x.device.type == "cpu" else None
    outputs, inputs = weight.shape
    fits = x.shape[-1] == inputs and x.dtype == weight.dtype  # else F.linear's error says what
    rows = x.numel() // max(inputs, 1)
    if kernels is None or not fits or outputs < MIN_OUTPUTS or rows < MIN_ROWS:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, inputs).contiguous()
    with record_function("delrec::nonzero_rows"):  # a profiled region, as ATen's operators
        compressed = kernels.nonzero_rows(flat, int(MAX_DENSITY * flat.numel()))
    if not compressed:  # too many non-zeros
        return F.linear(x, weight, bias)
    out = _SpikeLinear.apply(flat, weight, bias, compressed, kernels)
    return out.view(*x.shape[:-1], outputs)


# --------------------------------------------------------------------------- BatchNorm
class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, bias, shift, eps: float, kernels):
        y = y.contiguous()
        out = torch.empty_like(y)
        n = y.shape[-1]
        mean, var = (y.new_empty(n, dtype=torch.float64) for _ in range(2))
        kernels.batch_norm_forward(y, weight, bias, eps, out, mean, var)
        invstd = (var + eps).rsqrt()
        ctx.save_for_backward(y, mean, invstd, weight)
        ctx.kernels, ctx.shifted = kernels, shift is not None
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @first_order(*NETWORK)
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        y, mean, invstd, weight = ctx.saved_tensors
        grad = grad_out.contiguous()
        grad_y = torch.empty_like(y)
        sums = y.new_empty(3, y.shape[-1], dtype=torch.float64)
        ctx.kernels.batch_norm_backward(grad, y, mean, invstd, weight, grad_y, sums)
        grad_weight = (sums[1] * invstd).to(weight.dtype)
        grad_bias = sums[0].to(weight.dtype)
        grad_shift = sums[2].to(weight.dtype) if ctx.shifted else None
        return grad_y, grad_weight, grad_bias, grad_shift, None, None


@torch.compiler.disable  # torch.compile runs it as it is (delrec.engine docstring)
def batch_norm(current: Tensor, norm: nn.BatchNorm1d, shift: Tensor | None = None) -> Tensor:
    """``norm`` applied to the ``T·B`` frames of ``c = current + shift`` ``(T, B, N)`` (what
    ``norm(c.flatten(0, 1))`` computes), updating its running statistics in training.

    ``shift`` ``(N,)``: the bias of the linear map in front (the normalisation removes it, so it
    is added to the statistics only, saving a pass; its gradient is ``Σ ∂L/∂c``, zero up to
    rounding). ``norm`` must be an affine ``nn.BatchNorm1d`` that tracks running statistics
    (:func:`fusable_norm`); in eval mode, or with fewer than two frames, the module itself runs.
    """
    if not norm.training or current.shape[0] * current.shape[1] <= 1:
        # eval, or no statistics to take (the module's answer: an error for one frame)
        if shift is not None:
            current = current + shift
        return norm(current.flatten(0, 1)).view_as(current)
    out, mean, var = _BatchNorm.apply(
        current, norm.weight, norm.bias, shift, norm.eps, _kernels(current.device)
    )
    if shift is not None:
        mean = mean + shift.detach().double()
    with torch.no_grad():
        norm.num_batches_tracked.add_(1)
        factor = norm.momentum if norm.momentum is not None else 1 / int(norm.num_batches_tracked)
        frames = current.shape[0] * current.shape[1]
        unbiased = var * (frames / max(frames - 1, 1))
        norm.running_mean.mul_(1 - factor).add_(mean.to(norm.running_mean.dtype), alpha=factor)
        norm.running_var.mul_(1 - factor).add_(unbiased.to(norm.running_var.dtype), alpha=factor)
    return out


def fusable_norm(norm: nn.Module | None) -> bool:
    """True for the BatchNorm that :func:`batch_norm` runs: an affine ``nn.BatchNorm1d`` with
    running statistics (not a subclass, such as the data-parallel whole-batch one)."""
    return type(norm) is nn.BatchNorm1d and norm.affine and norm.track_running_stats
