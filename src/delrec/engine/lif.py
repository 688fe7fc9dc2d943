"""The LIF neuron and the triangle trace as every engine path computes them.

* :class:`LIFMap`: the built-in LIF step as an affine charge map ``h = leak·v + gain·u +
  offset``, then fire and reset, and its adjoint step (docs/design.md#lif-neuron).
  The C++ kernels compute the same in ``csrc/lif.h``.
* :func:`triangle_taps`: the three-tap recursion of a triangle trace ``z[t] = Σ_k κ(k) s[t-k]``
  (docs/design.md#running-sums), shared by the axonal and synaptic engines.

Units: time in steps; sequences are time-major ``(T, B, N)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from delrec.neurons import LIF, ATan, LIFParameters, Triangle

# surrogate codes of the compiled kernels: ψ' read from a precomputed tensor, Triangle(γ), ATan(α)
PSI_TENSOR, TRIANGLE, ATAN = 0, 1, 2


def is_builtin_lif(neuron) -> bool:
    """True for exactly the built-in :class:`LIF` (a subclass may override ``step``)."""
    return type(neuron) is LIF


@dataclass(frozen=True)
class LIFMap:
    """``h = leak·v + gain·u + offset``, then fire and reset (the LIF step of
    :func:`delrec.neurons.lif_step`, rewritten as an affine map of ``v[t-1]`` and ``u[t]``)."""

    leak: float
    gain: float
    offset: float
    v0: float
    p: LIFParameters

    @classmethod
    def of(cls, p: LIFParameters) -> LIFMap:
        gain = 1.0 / p.tau if p.decay_input else 1.0
        return cls(1.0 - 1.0 / p.tau, gain, p.v_rest / p.tau, p.v_rest, p)

    @property
    def drives_directly(self) -> bool:
        """True when the feedforward part of ``h`` is the current itself (gain 1, offset 0)."""
        return self.gain == 1.0 and self.offset == 0.0

    def drive(self, current: Tensor) -> Tensor:
        """Feedforward part of ``h``: ``gain·c + offset``, ``(T, B, N)``."""
        if self.drives_directly:
            return current
        return current * self.gain + self.offset

    def fire_and_reset(self, h: Tensor, spikes_out: Tensor) -> Tensor:
        """Writes ``Θ(h - θ)`` into the bool tensor ``spikes_out``; returns ``v[t]``."""
        torch.ge(h, self.p.v_threshold, out=spikes_out)
        return self.reset(h, spikes_out)

    def reset(self, h: Tensor, spiked: Tensor) -> Tensor:
        """``v[t]`` from the charge ``h[t]`` and the bool spikes ``spiked`` of that step."""
        if self.p.soft_reset:
            return torch.sub(h, spiked.to(h.dtype), alpha=self.p.v_threshold)
        return h.masked_fill(spiked, self.p.v_reset)

    def adjoint_step(
        self, grad_s: Tensor, grad_h_next: Tensor, h: Tensor, s: Tensor, out: Tensor
    ) -> Tensor:
        """``∂L/∂h[t]`` into ``out`` from ``∂L/∂s[t]`` (all paths but the reset), ``∂L/∂h[t+1]``.

        With ``gv = leak·∂L/∂h[t+1]`` (the adjoint of ``v[t]``):
        ``∂L/∂h = ψ'(h-θ)·(gs + gv·∂v/∂ŝ) + gv·∂v/∂h``; the ``∂v/∂ŝ`` path is cut by detach_reset.
        """
        p = self.p
        psi = p.surrogate.derivative(h - p.v_threshold)
        gv = grad_h_next * self.leak
        if not p.detach_reset:
            if p.soft_reset:
                grad_s = torch.add(grad_s, gv, alpha=-p.v_threshold)
            else:
                grad_s = torch.addcmul(grad_s, gv, p.v_reset - h)
        if not p.soft_reset:
            gv = torch.where(s, gv.new_zeros(()), gv)
        return torch.addcmul(gv, psi, grad_s, out=out)

    def native_surrogate(self) -> tuple[int, float]:
        """The surrogate as the kernels (``csrc/lif.h``, ``triton/lif.py``) compute it:
        ``(TRIANGLE, γ)``, ``(ATAN, α)``, or ``(PSI_TENSOR, 0.0)`` for any other surrogate
        (ψ' then read from a tensor)."""
        surrogate = self.p.surrogate
        if type(surrogate) is Triangle:
            return TRIANGLE, surrogate.gamma
        if type(surrogate) is ATan:
            return ATAN, surrogate.alpha
        return PSI_TENSOR, 0.0

    def native_slope(self, membrane: Tensor) -> tuple[int, float, Tensor]:
        """The surrogate as a kernel's backward takes it: :meth:`native_surrogate` and ψ'(h - θ)
        ``(T, B, N)`` precomputed from the pre-spike ``membrane`` for a surrogate the kernels
        don't know (code 0; an empty tensor otherwise)."""
        code, param = self.native_surrogate()
        if code == PSI_TENSOR:
            return code, param, self.p.surrogate.derivative(membrane - self.p.v_threshold)
        return code, param, membrane.new_empty(0)


def width_vector(width: Tensor | float, like: Tensor, n: int) -> Tensor:
    """The kernel half-width as an ``(N,)`` tensor (one per presynaptic neuron), in the dtype
    and on the device of ``like``."""
    width = torch.as_tensor(width, dtype=like.dtype, device=like.device)
    return width.expand(n) if width.dim() == 0 else width


def triangle_taps(centre: Tensor, width: Tensor) -> tuple[Tensor, Tensor]:
    """Lags ``(M, 3)`` (int64) and increments ``(M, 2, 3)`` (float64) of the three-tap
    recursion of the triangle traces of centres ``c = 1 + d`` and half-widths ``w``, ``(M,)``.

    The lags with non-zero weight form a rising box ``[a1, b1] = [max(1, ⌈c-w⌉), max(0, ⌊c⌋)]``,
    where ``w²κ(k) = α_r + (k-a1)``, and a falling box ``[b1+1, b2]``, ``b2 = max(⌊c+w⌋, b1)``,
    where ``w²κ(k) = α_f + (b2-k)`` (``α_r = w-c+a1``, ``α_f = w+c-b2``, both in ``[0, 1]``).
    One step shifts each box by one lag and changes them by the spikes at three lags
    ``e = (a1, b1+1, b2+1)`` only (the second difference of a triangle has three taps), so with
    ``Y = w²z`` and ``D = A - F`` (the rising minus the falling box count)

        Y[t] = Y[t-1] + D[t-1] + Σ_q γ_q s[t-e_q],     D[t] = D[t-1] + Σ_q (1, -2, 1)_q s[t-e_q],
        γ = (α_r, α_f - α_r + (b2-b1) - (b1-a1+1) - 1, 1 - α_f):

    O(1) per trace and step whatever σ and L are, in float64 (rounding drift O(T²·ε)).
    ``increments[m, 0]`` is ``γ/w²`` (of ``z``), ``increments[m, 1]`` is ``(1, -2, 1)/w²`` (of
    ``D/w²``). The box bounds are taken in the dtype of ``centre`` (as ``triangle_kernel``
    does), the coefficients in float64.
    """
    b1 = centre.floor().clamp(min=0)
    a1 = (centre - width).ceil().clamp(min=1)
    b2 = torch.maximum((centre + width).floor(), b1)
    c64, w64, a1d, b1d, b2d = (x.double() for x in (centre, width, a1, b1, b2))
    inv_w2 = 1.0 / (w64 * w64)
    alpha_r, alpha_f = w64 - c64 + a1d, w64 + c64 - b2d
    middle = alpha_f - alpha_r + (b2d - b1d) - (b1d - a1d + 1) - 1
    gamma = torch.stack([alpha_r, middle, 1 - alpha_f], 1)
    second = c64.new_tensor([1.0, -2.0, 1.0]).expand(c64.shape[0], 3)
    increments = torch.stack([gamma, second], 1) * inv_w2.view(-1, 1, 1)
    return torch.stack([a1, b1 + 1, b2 + 1], 1).long().contiguous(), increments.contiguous()
