"""Mackey-Glass chaotic series forecasting, generated in memory
(docs/design.md#mackey-glass-forecasting).

    dx/dt = beta * x(t - tau) / (1 + x(t - tau)^n) - gamma * x(t)

Euler integration with step ``dt`` (0.1) from the constant history ``x(t) = x0`` (1.2) for
all t <= 0; the series is sampled every ``sample_every`` (1) time units, the first
``discard`` (5000) units are dropped and ``samples`` (6000) values kept. Values are not
normalised (they stay in about 0.2…1.4).

Splits: the kept series is cut in time into contiguous 60/20/20 segments (3600/1200/1200
samples). Inside each segment, an item is a window of ``window`` (150) consecutive samples
ending at time t and its target x(t + horizon); no input or target crosses a segment
boundary, so a split holds ``segment - window - horizon + 1`` items.

The integration uses only IEEE additions and multiplications (x^n by repeated squaring,
running products and sums), so the series is the same, bit for bit, on every machine.
"""

from __future__ import annotations

import numpy as np

from .core import DatasetInfo, SeriesWindows
from .errors import DataError

SPLIT_FRACTIONS = {"train": (0.0, 0.6), "valid": (0.6, 0.8), "test": (0.8, 1.0)}
SIZE_SETTINGS = ("tau", "horizon", "window", "samples", "n", "dt", "discard")  # check_mackey_glass
# windows each split holds at least: the NMSE divides by the variance of a split's targets
MIN_WINDOWS = 2
MAX_VALUES = 10**8  # integration steps, and window values of a split: 800 MB as float64


def _int_power(x: np.ndarray, n: int) -> np.ndarray:
    """x**n for an integer n >= 1 by repeated squaring (exact IEEE products, no libm pow)."""
    result, base = None, x
    while n:
        if n & 1:
            result = base if result is None else result * base
        n >>= 1
        if n:
            base = base * base
    return result


def mackey_glass(
    samples: int = 6000,
    tau: float = 17.0,
    beta: float = 0.2,
    gamma: float = 0.1,
    n: int = 10,
    dt: float = 0.1,
    x0: float = 1.2,
    discard: float = 5000.0,
    sample_every: float = 1.0,
) -> np.ndarray:
    """The sampled series, (samples,) float64. ``tau``, ``discard`` and ``sample_every`` must
    be whole multiples of ``dt``.

    Vectorised by blocks: within a block of D = tau/dt Euler steps every delayed value is
    already known, and x[k+1] = a x[k] + dt f[k] with a = 1 - gamma dt is a linear recurrence
    solved in closed form, x[k0+j] = a^j (x[k0] + dt sum_{i<j} a^-(i+1) f[k0+i])."""
    delay, discard_steps, stride, last = _integration_steps(
        samples, tau, n, dt, discard, sample_every
    )
    x = np.empty(last + 1)
    x[0] = x0
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by the caller
        _integrate(x, x0, delay, last, dt, beta, gamma, n)
    return x[discard_steps::stride].copy()


def _integration_steps(
    samples: int, tau: float, n: int, dt: float, discard: float, sample_every: float
) -> tuple[int, int, int, int]:
    """The Euler steps of ``tau``, ``discard`` and ``sample_every``, and the index of the last
    step integrated; a DataError for settings the integration cannot use."""
    if not dt > 0:
        raise DataError(f"Mackey-Glass: the integration step dt={dt} must be > 0")
    steps = {}
    for key, value in (("tau", tau), ("discard", discard), ("sample_every", sample_every)):
        steps[key] = int(round(value / dt))
        if steps[key] < 1 or abs(steps[key] * dt - value) > 1e-9 * max(1.0, value):
            raise DataError(f"Mackey-Glass: {key}={value} must be a positive multiple of dt={dt}")
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise DataError(f"Mackey-Glass: exponent n={n} must be a positive integer")
    if not (isinstance(samples, (int, np.integer)) and samples >= 1):
        raise DataError(f"Mackey-Glass: samples={samples} must be a positive integer")
    delay, stride = steps["tau"], steps["sample_every"]
    last = steps["discard"] + (samples - 1) * stride
    if max(last + 1, delay) > MAX_VALUES:
        raise DataError(
            f"Mackey-Glass: samples={samples}, discard={discard}, sample_every={sample_every} "
            f"and tau={tau} at dt={dt} need {max(last + 1, delay):.3g} integration steps, more "
            f"than {MAX_VALUES:.0e}: use fewer samples (the default is 6000) or a larger dt"
        )
    return delay, steps["discard"], stride, last


def _integrate(x, x0, delay, last, dt, beta, gamma, n) -> None:
    """Fill ``x[1 : last + 1]`` block by block (see :func:`mackey_glass`)."""
    a = 1.0 - gamma * dt
    powers = np.cumprod(np.full(delay, a))  # a^1 … a^D
    for k0 in range(0, last, delay):
        m = min(delay, last - k0)
        # x[k0+i-D]: the constant history in the first block (k0 is a multiple of D)
        lagged = x[k0 - delay : k0 - delay + m] if k0 else np.full(m, x0)
        drive = dt * beta * lagged / (1.0 + _int_power(lagged, n))
        x[k0 + 1 : k0 + m + 1] = powers[:m] * (x[k0] + np.cumsum(drive / powers[:m]))


def _split_bounds(split: str, samples: int) -> tuple[int, int]:
    """The first and one past the last sample of ``split``."""
    lo, hi = (int(round(f * samples)) for f in SPLIT_FRACTIONS[split])
    return lo, hi


def _window_count(samples: int, window: int, horizon: int) -> dict[str, int]:
    """Per split, the windows of ``window`` samples whose target ``horizon`` later it holds."""
    counts = {}
    for split in SPLIT_FRACTIONS:
        lo, hi = _split_bounds(split, samples)
        counts[split] = hi - lo - window - horizon + 1
    return counts


def check_mackey_glass(
    tau: float, horizon: int, window: int, samples: int, n: int, dt: float, discard: float
) -> None:
    """A DataError for sizes the series or its windows cannot have (nothing is integrated):
    every split must hold at least :data:`MIN_WINDOWS` windows with their targets, and none
    more than ``MAX_VALUES`` values. The arguments are :func:`load_mackey_glass`'s."""
    _integration_steps(samples, tau, n, dt, discard, 1.0)
    if window < 1 or horizon < 1:
        raise DataError(f"Mackey-Glass: window={window} and horizon={horizon} must be >= 1")
    for split, count in _window_count(samples, window, horizon).items():
        if count < MIN_WINDOWS:
            shortest = min(hi - lo for lo, hi in SPLIT_FRACTIONS.values())
            need = max(samples + 1, int((window + horizon) / shortest) - 2)
            while min(_window_count(need, window, horizon).values()) < MIN_WINDOWS:
                need += 1
            try:
                _integration_steps(need, tau, n, dt, discard, 1.0)
                fix = f"use samples >= {need}"
            except DataError:  # more than any series integrated here
                fix = "use a shorter window or horizon"
            raise DataError(
                f"Mackey-Glass: the {split} segment of samples={samples} has "
                f"{count + window + horizon - 1} samples, too few for {MIN_WINDOWS} "
                f"windows of window={window} plus horizon={horizon} (the NMSE divides by the "
                f"variance of a split's targets, which one window does not have): {fix}"
            )
        if count * window > MAX_VALUES:
            raise DataError(
                f"Mackey-Glass: the {split} split holds {count} windows of {window} samples, "
                f"{count * window:.3g} values, more than {MAX_VALUES:.0e}: use fewer samples or "
                "a shorter window"
            )


def load_mackey_glass(
    split: str,
    tau: float = 17.0,
    horizon: int = 20,
    window: int = 150,
    samples: int = 6000,
    beta: float = 0.2,
    gamma: float = 0.1,
    n: int = 10,
    dt: float = 0.1,
    x0: float = 1.2,
    discard: float = 5000.0,
) -> SeriesWindows:
    """Forecasting windows of one split: items ((window, 1) float32, x(t + horizon) float32).
    ``horizon`` and ``window`` count samples (time units)."""
    check_mackey_glass(tau, horizon, window, samples, n, dt, discard)
    series = mackey_glass(samples, tau, beta, gamma, n, dt, x0, discard)
    lo, hi = _split_bounds(split, samples)
    segment = series[lo:hi]
    with np.errstate(over="ignore"):
        values = segment.astype(np.float32)  # as the items hold them
    if not np.isfinite(values).all() or values.min() == values.max():
        shape = "overflows" if not np.isfinite(values).all() else f"stays at {values[0]:g}"
        raise DataError(
            f"Mackey-Glass: with beta={beta}, gamma={gamma}, n={n}, dt={dt}, x0={x0} the "
            f"{split} segment of the series {shape} (in float32), so there is nothing to "
            "forecast: keep the defaults (0.2, 0.1, 10, 0.1, 1.2) or values near them"
        )
    count = len(segment) - window - horizon + 1
    starts = np.arange(count)
    windows = segment[starts[:, None] + np.arange(window)]
    targets = segment[starts + window - 1 + horizon]
    info = DatasetInfo("mackey-glass", "regression", input_size=1, num_classes=None, steps=window)
    return SeriesWindows(windows, targets, info, split)
