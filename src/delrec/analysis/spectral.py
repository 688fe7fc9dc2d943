"""The characteristic equation of the S3 gradient recurrence and its spectral radius.

Section S3 of the paper bounds the gradient sensitivity of a recurrent spiking layer whose
recurrent connection has delay ``d`` by the scalar recurrence ``e[t+1] = a·e[t] + b·e[t-d]``.
Its characteristic equation is ``λ^(d+1) − a·λ^d − b = 0`` (``λ − a − b = 0`` for ``d = 0``);
``r_d``, the largest modulus over all its ``d + 1`` complex roots, is the growth factor per
time step of the bound: ``r_d > 1`` means the bound explodes, ``r_d < 1`` that it vanishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from delrec import files


def characteristic_coefficients(a: float, b: float, delay: int) -> np.ndarray:
    """Coefficients, highest degree first, of ``λ^(d+1) − a·λ^d − b``."""
    if delay < 0 or int(delay) != delay:
        raise ValueError(f"delay must be a non-negative integer, got {delay}")
    coefficients = np.zeros(int(delay) + 2)
    coefficients[0] = 1.0
    coefficients[1] = -a
    coefficients[-1] -= b  # for d = 0 the constant term is −a − b
    return coefficients


def characteristic_roots(a: float, b: float, delay: int) -> np.ndarray:
    """All ``d + 1`` complex roots (numpy.roots on the companion matrix, one Newton polish)."""
    coefficients = characteristic_coefficients(a, b, delay)
    roots = np.roots(coefficients).astype(complex)
    derivative = np.polyder(coefficients)
    slope = np.polyval(derivative, roots)
    safe = np.abs(slope) > 1e-12  # a multiple root (b = 0) is left as the eigen-solver gave it
    roots[safe] -= np.polyval(coefficients, roots[safe]) / slope[safe]
    return roots


def spectral_radius(a: float, b: float, delay: int) -> float:
    """``r_d = max |λ|`` over the roots of ``λ^(d+1) − a·λ^d − b``."""
    return float(np.abs(characteristic_roots(a, b, delay)).max())


@dataclass(frozen=True)
class SpectralRow:
    """One delay: its spectral radius, regime and all roots."""

    delay: int
    radius: float
    roots: np.ndarray

    @property
    def regime(self) -> str:
        """``"explode"`` (r_d > 1), ``"vanish"`` (r_d < 1) or ``"marginal"`` (r_d = 1 to 1e-12)."""
        if abs(self.radius - 1.0) <= 1e-12:
            return "marginal"
        return "explode" if self.radius > 1.0 else "vanish"


MAX_TABLE_DELAY = 500  # the longest delay of a table


def spectral_table(a: float, b: float, max_delay: int) -> list[SpectralRow]:
    """One :class:`SpectralRow` for each ``d = 0 … max_delay``."""
    if not 0 <= max_delay <= MAX_TABLE_DELAY:
        raise ValueError(
            f"--max-delay must be in 0…{MAX_TABLE_DELAY}, got {max_delay} (the roots of delay "
            "d cost (d+1)³ operations, a table to D about D⁴/4: D = 200 takes seconds to tens "
            f"of seconds, D = {MAX_TABLE_DELAY} some 40 times as long, minutes)"
        )
    for name, value in (("--a", a), ("--b", b)):
        if not (math.isfinite(value) and 0 <= value <= 1e6):
            raise ValueError(
                f"{name} must be a finite number in [0, 1e6] (a bound on a magnitude), got {value}"
            )
    rows = []
    for delay in range(max_delay + 1):
        roots = characteristic_roots(a, b, delay)
        rows.append(SpectralRow(delay, float(np.abs(roots).max()), roots))
    return rows


def format_table(rows: list[SpectralRow]) -> str:
    """A plain-text table: delay, r_d, regime, number of roots outside the unit circle."""
    lines = [f"{'d':>3}  {'r_d':>10}  {'regime':<8}  roots |λ|>1"]
    for row in rows:
        outside = int((np.abs(row.roots) > 1.0).sum())
        lines.append(
            f"{row.delay:>3}  {row.radius:>10.6f}  {row.regime:<8}  {outside}/{row.delay + 1}"
        )
    return "\n".join(lines)


def rows_as_records(a: float, b: float, rows: list[SpectralRow]) -> list[dict]:
    """JSON-ready records (roots as ``[real, imag]`` pairs)."""
    return [
        {
            "a": a,
            "b": b,
            "delay": row.delay,
            "radius": row.radius,
            "regime": row.regime,
            "roots": [[float(z.real), float(z.imag)] for z in row.roots],
        }
        for row in rows
    ]


def plot_spectral(a: float, b: float, rows: list[SpectralRow], path) -> None:
    """Two panels: r_d against d with the regimes shaded, and every root in the complex plane."""
    plt = files.pyplot()

    delays = np.array([row.delay for row in rows])
    radii = np.array([row.radius for row in rows])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))

    top = max(1.1, radii.max() * 1.05)
    bottom = min(0.9, radii.min() * 0.95)
    left.axhspan(1.0, top, color="tab:red", alpha=0.08, label="r_d > 1: bound explodes")
    left.axhspan(bottom, 1.0, color="tab:blue", alpha=0.08, label="r_d < 1: bound vanishes")
    left.axhline(1.0, color="black", lw=0.8)
    explode = radii > 1.0
    left.plot(delays, radii, color="gray", lw=1)
    left.scatter(delays[explode], radii[explode], color="tab:red", zorder=3)
    left.scatter(delays[~explode], radii[~explode], color="tab:blue", zorder=3)
    left.set(
        xlabel="recurrent delay d (steps)",
        ylabel="spectral radius r_d",
        title=f"λ^(d+1) − {a:g}·λ^d − {b:g} = 0",
        ylim=(bottom, top),
    )
    left.legend(loc="best", fontsize=8)

    cmap = plt.get_cmap("viridis")
    theta = np.linspace(0, 2 * np.pi, 200)
    right.plot(np.cos(theta), np.sin(theta), color="black", lw=0.8, label="unit circle")
    for row in rows:
        colour = cmap(row.delay / max(1, delays.max()))
        right.scatter(row.roots.real, row.roots.imag, s=10, color=colour)
    right.set(xlabel="Re λ", ylabel="Im λ", title="all roots (colour: d, dark = 0)", aspect="equal")
    right.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    files.write_figure(path, fig)
    plt.close(fig)
