"""Delay kernels, spread schedule, initialisations and rounding (docs/design.md#the-delay-kernel).

A spike emitted at step ``t`` arrives ``1 + d`` steps later. A real-valued delay is made
differentiable by spreading the spike over the integer lags ``k`` around ``c = 1 + d`` with a
triangle of half-width ``w``, normalised by ``w²``:

    κ(k) = max(0, w - |k - c|) / w²,    k = 1 … L-1  (lag 0 is never used)

All delays and widths are in time steps. Delays and spreads live in ``[0, MAX_DELAY]``:
:func:`check_delays` and :func:`check_sigma` refuse anything else (infinite, NaN, or so long
that no sequence could reach it) where a value enters, with a message naming it. A network may
set a tighter limit of its own, ``max_delay`` (a chip's longest delay, :func:`check_max_delay`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from delrec import user_warnings

DelayInit = Callable[[tuple[int, ...], torch.Generator | None], Tensor]

MAX_DELAY = 65535.0
"""The longest delay and widest spread delrec accepts, in steps: 2¹⁶ - 1, as long as the
longest sequence its data sets make (65 535 time bins), so a longer delay could never deliver
a spike; it also bounds the memory of every delay kernel and ring buffer."""


def check_delays(delay: Tensor | float, what: str = "delays") -> None:
    """Raise ValueError unless every delay in ``delay`` (steps) is finite and within
    ``±MAX_DELAY``; ``what`` names them in the message. Delays below 0 pass: they occur between
    an optimizer step and the clamp, and training reads them as documented
    (:meth:`delrec.layers.DelRec.delays_and_width`)."""
    delay = torch.as_tensor(delay).detach()
    inside = delay.abs() <= MAX_DELAY  # False for NaN as well
    if not bool(inside.all()):
        bad = delay[~inside].flatten()[0].item()
        raise ValueError(
            f"{what}: a delay of {bad:g} steps is out of range: delays must be finite and at most "
            f"MAX_DELAY = {MAX_DELAY:g} steps (no sequence is longer); give delays in "
            "that range (a delay longer than the sequence never delivers a spike)"
        )


class DelayLimitWarning(UserWarning):
    """Delays outside the range a layer keeps them in: initial delays drawn above its
    ``max_delay`` (clamped to it), delays below 0 in a forward (an optimizer step not followed
    by ``clamp_delays``)."""


def check_max_delay(max_delay, what: str = "max_delay") -> int | None:
    """``max_delay`` if it is a valid delay limit, ``None`` (no limit) as it is; raises
    ValueError naming ``what`` otherwise.

    A delay limit is the longest delay ``d`` a network may have (a chip's limit, integer
    steps, docs/deployment.md#chips-delay-limits): a whole number in ``[0, MAX_DELAY]``.
    """
    if max_delay is None:
        return None
    if isinstance(max_delay, bool) or not isinstance(max_delay, numbers.Integral):
        raise ValueError(
            f"{what} must be a whole number of steps (the longest delay d a chip runs, "
            f"e.g. 62) or null for no limit, got {max_delay!r}"
        )
    if not 0 <= max_delay <= MAX_DELAY:
        raise ValueError(
            f"{what} = {max_delay} steps is out of range: give a limit in [0, {MAX_DELAY:g}] "
            "(0 allows only plain one-step recurrence; MAX_DELAY bounds every delay anyway)"
        )
    return int(max_delay)


def clamp_initial(values: Tensor, max_delay: int | None, what: str, advice: str) -> Tensor:
    """``values`` (initial delays, steps) clamped to at most ``max_delay``; when any was above
    it, a :class:`DelayLimitWarning` says how many, naming ``what`` and giving ``advice``."""
    if max_delay is None:
        return values
    above = int((values > max_delay).sum())
    if above:
        user_warnings.warn(
            f"{what}: {above} of {values.numel()} initial delays were above max_delay = "
            f"{max_delay} steps and start at {max_delay}; {advice}",
            DelayLimitWarning,
        )
    return values.clamp(max=max_delay)


def check_sigma(sigma: float, what: str = "sigma") -> float:
    """``sigma`` as a float if it is a valid spread (``0 ≤ σ ≤ MAX_DELAY`` steps); raises
    ValueError naming it otherwise."""
    value = float(sigma)
    if not 0.0 <= value <= MAX_DELAY:  # False for NaN as well
        raise ValueError(
            f"{what} = {value:g} is not a usable spread: σ must be a finite number of steps in "
            f"[0, {MAX_DELAY:g}] (0: integer delays, the usual schedule starts at 10)"
        )
    return value


def spread_width(sigma: float, spread_logits: Tensor | None = None) -> Tensor | float:
    """Half-width ``w`` of the kernel: ``1 + σ`` (shared) or ``1 + 2σ·sigmoid(p)`` per neuron."""
    if spread_logits is None:
        return 1.0 + sigma
    return 1.0 + 2.0 * sigma * torch.sigmoid(spread_logits)


def kernel_length(max_delay: float, max_width: float) -> int:
    """Number of lags ``L = ceil(1 + max d + max w) + 1`` (lags 0 … L-1) covering every kernel;
    at least 2 (lags 0 and 1), also when a negative delay puts every triangle below lag 1."""
    return max(2, math.ceil(1.0 + max_delay + max_width) + 1)


def triangle_kernel(delay: Tensor, width: Tensor | float, length: int) -> Tensor:
    """Interpolation kernel ``κ`` over lags ``0 … length-1``, shape ``delay.shape + (length,)``.

    ``delay`` (any shape, steps) and ``width`` (broadcastable to it) give the centre ``1 + d``
    and half-width of each triangle; lag 0 is zeroed. Written so that autograd gives the
    reference convention at the kinks (docs/design.md#gradients-at-the-kinks): ``|x|' = 0`` at 0
    and the clamp lets the gradient through where its input is exactly 0.
    """
    width = torch.as_tensor(width, dtype=delay.dtype, device=delay.device)
    lags = torch.arange(length, dtype=delay.dtype, device=delay.device)
    centre = (1.0 + delay).unsqueeze(-1)
    w = width.unsqueeze(-1) if width.dim() > 0 else width
    kernel = (w - (lags - centre).abs()).clamp(min=0) / w**2
    return kernel * (lags > 0)


def kernel_support(delay: Tensor, width: Tensor | float) -> tuple[int, int]:
    """Smallest and largest lag in the closed support ``|k - (1+d)| ≤ w`` of any kernel (≥ 1):
    outside it every kernel weight and its gradient are 0."""
    centre = 1.0 + delay.detach()
    w = torch.as_tensor(width).detach()
    kmin = max(1, int((centre - w).ceil().min()))
    kmax = max(kmin, int((centre + w).floor().max()))
    return kmin, kmax


def recurrent_kernel(delay: Tensor, width: Tensor | float, length: int | None = None) -> Tensor:
    """Kernel ``κ`` of a recurrent layer over the lags ``0 … L-1`` that cover every triangle:
    ``(N, L)`` for delays ``(N,)`` (axonal, shared), ``(N, N, L)`` for delays ``(N, N)``
    (synaptic); ``width`` is a number or ``(N,)``, one per presynaptic neuron. ``length``: only
    the lags ``0 … length-1``."""
    if length is None:
        max_width = float(torch.as_tensor(width).detach().max())
        length = kernel_length(float(delay.detach().max()), max_width)
    if delay.dim() == 2 and torch.is_tensor(width):
        width = width.expand(delay.shape)  # spread is per presynaptic neuron (column)
    return triangle_kernel(delay, width, length)


def spread_schedule(epoch: int, epochs: int, sigma0: float = 10.0, gamma: float = 0.95) -> float:
    """Spread σ at the start of ``epoch`` (0-based) of ``epochs``: ``σ0 · γ^(100 e / E)``."""
    if not epochs > 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if not 0 <= epoch < math.inf:
        raise ValueError(f"epoch must be a number of epochs >= 0, got {epoch}")
    if not 0 <= sigma0 < math.inf:
        raise ValueError(f"sigma0 must be a finite spread >= 0, got {sigma0}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    return sigma0 * gamma ** (100.0 * epoch / epochs)


def integer_delays(delay: Tensor) -> Tensor:
    """Delays rounded to the nearest integer (half to even), clamped at 0: what a chip runs."""
    return delay.detach().round().clamp(min=0)


# --------------------------------------------------------------------------- initialisers
def uniform(low: float, high: float) -> DelayInit:
    """Delays drawn from ``U(low, high)`` steps (SHD: ``U(10, 30)``)."""
    if not 0 <= low <= high <= MAX_DELAY:
        raise ValueError(
            f"uniform delay init needs 0 <= low <= high <= {MAX_DELAY:g} steps (finite), "
            f"got ({low}, {high})"
        )

    def init(shape, generator=None):
        return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)

    init.description = f"uniform({low}, {high})"
    return init


def half_normal(std: float) -> DelayInit:
    """Delays drawn from ``|N(0, std²)|`` steps (SSC, PS-MNIST: std = 12)."""
    if not 0 <= std <= MAX_DELAY / 8:  # draws beyond 8 std have probability < 1e-15
        raise ValueError(
            f"half-normal delay init needs 0 <= std <= {MAX_DELAY / 8:g} steps (finite), so "
            f"that its delays stay below MAX_DELAY = {MAX_DELAY:g} steps; got {std}"
        )

    def init(shape, generator=None):
        return (std * torch.randn(shape, generator=generator, dtype=torch.float64)).abs()

    init.description = f"half_normal({std})"
    return init


def constant(value: float) -> DelayInit:
    """Every delay equal to ``value`` steps (0 gives a vanilla recurrent layer)."""
    if not 0 <= value <= MAX_DELAY:
        raise ValueError(
            f"constant delay init needs 0 <= value <= {MAX_DELAY:g} steps (finite), got {value}"
        )

    def init(shape, generator=None):
        return torch.full(shape, float(value), dtype=torch.float64)

    init.description = f"constant({value})"
    return init


def given(values: Tensor) -> DelayInit:
    """The delays ``values`` themselves, steps: a tensor of the layer's delay shape (a copy)."""
    values = values.detach().to("cpu", torch.float64).clone()  # as every initialiser gives

    def init(shape, generator=None):
        if tuple(values.shape) != tuple(shape):
            raise ValueError(
                f"delay init tensor of shape {tuple(values.shape)}, but the layer's delays "
                f"are {tuple(shape)}"
            )
        return values.clone()

    init.description = f"given{tuple(values.shape)}"
    return init


def parse_init(spec: str | float | Tensor | DelayInit) -> DelayInit:
    """Initialiser from a spec: a callable, a number, a tensor of the delays,
    ``"uniform:A:B"`` or ``"half_normal:S"``."""
    if callable(spec):
        return spec
    if torch.is_tensor(spec):
        return given(spec)
    if isinstance(spec, (int, float)):
        return constant(spec)
    name, *args = str(spec).split(":")
    makers = {"uniform": uniform, "half_normal": half_normal, "constant": constant}
    if name not in makers:
        raise ValueError(
            f"unknown delay init {spec!r}; use 'uniform:LOW:HIGH', 'half_normal:STD', a number "
            "or a tensor of the delays"
        )
    try:
        numbers = [float(a) for a in args]
    except ValueError:
        raise ValueError(
            f"delay init {spec!r}: its arguments must be numbers of steps, e.g. 'uniform:0:10'"
        ) from None
    try:
        return makers[name](*numbers)
    except TypeError:
        raise ValueError(f"delay init {spec!r} has the wrong number of arguments") from None
