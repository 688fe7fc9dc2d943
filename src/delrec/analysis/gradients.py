"""Measured recurrent-weight gradients against the S3 prediction, for fixed recurrent delays.

One recurrent LIF layer (soft reset with the gradient through the reset, as in S3) with the
same recurrent weights ``W`` and the same input current is run with every delay ``d`` fixed
for all neurons. The loss reads only the last step, ``L = Σ_b Σ_i q_i s_i[T-1]`` with a fixed
random readout ``q``, so the gradient at earlier steps is pure back-propagation through the
recurrence. Measured, per delay:

* ``δ[t] = ∂L/∂h[t]`` for ``k = T-1-t`` steps back from the loss (read as the gradient of the
  input current, which enters the membrane ``h`` with slope 1);
* the contribution of each step to ``∂L/∂W``: ``G[t] = Σ_b δ_b[t] ⊗ s_b[t-1-d]``, whose sum
  over ``t`` is ``∂L/∂W``;
* ``‖∂L/∂W‖`` itself, and the relative difference between ``Σ_t G[t]`` and autograd's ``∂L/∂W``
  (a check that the decomposition accounts for the whole gradient).

Through the surrogate, ``δ[t] = A_t δ[t+1] + diag(ψ'_t) Wᵀ δ[t+1+d]`` with
``A_t = α(1 − θ ψ'_t)``, ``α = 1 − 1/τ`` (our LIF decays the reset with the membrane; S3 writes
``α − θψ'``): the adjoint of the S3 recurrence. Two estimates of ``(a, b)`` from the recorded
trajectory give two predictions ``r_d`` (:mod:`delrec.analysis.spectral`):

* S3's: ``a = max |A_t|``, ``b = ‖W‖₂ · max ψ'`` (≥ ``sup_t ‖W diag ψ'_t‖₂``). Then
  ``e[k] = a e[k-1] + b e[k-1-d]``, ``e[0] = ‖δ[T-1]‖``, bounds ``‖δ[T-1-k]‖`` for every ``k``
  (induction on the recurrence above), and grows like ``r_d^k``: a rigorous but loose bound.
* mean-field: ``a = rms(A_t)``, ``b = ‖W‖_F/√N · rms(ψ')``: the gain of a typical vector, a
  heuristic for the trend, not a bound.

The measured growth factor per step is ``exp`` of the least-squares slope of
``log ‖δ[T-1-k]‖`` over ``k``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from delrec import files
from delrec.analysis.spectral import spectral_radius
from delrec.config import MAX_SEED, is_seed
from delrec.layers import DelRec
from delrec.neurons import LIF, ATan, Triangle, lif_charge

DEFAULT_DELAYS = (0, 1, 2, 5, 10, 20)
MAX_SIZE = 4096  # neurons of one layer: 16.8 M recurrent weights
MAX_MAGNITUDE = 1e6  # gain, input current and surrogate scale: beyond any use, finite in float64
MAX_PEAK_BYTES = 8e9  # the memory one experiment may take (:func:`_peak_bytes`)


def _peak_bytes(steps: int, batch: int, size: int) -> float:
    """About the peak memory of one delay, measured: the float64 trajectories autograd keeps
    (some 24 of ``T·B·N``) and the per-step contributions to ∂L/∂W (``T·N²``, twice)."""
    return 8.0 * steps * size * (24 * batch + 2 * size)


@dataclass(frozen=True)
class GradientSetup:
    """The experiment's settings: sizes in neurons and steps; ``W = gain × orthogonal``."""

    delays: tuple[int, ...] = DEFAULT_DELAYS
    size: int = 64
    steps: int = 150
    batch: int = 8
    tau: float = 2.0
    gain: float = 6.0
    input_mean: float = 0.3
    input_std: float = 0.5
    surrogate: str = "triangle"
    surrogate_scale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.delays or min(self.delays) < 0:
            raise ValueError(f"delays must be non-negative integers, got {self.delays}")
        twice = sorted({d for d in self.delays if self.delays.count(d) > 1})
        if twice:
            raise ValueError(
                f"--delays {','.join(map(str, self.delays))} names the delay "
                f"{', '.join(map(str, twice))} more than once; give each delay once"
            )
        object.__setattr__(self, "delays", tuple(sorted(self.delays)))  # the table's order
        if max(self.delays) + 2 > self.steps:
            raise ValueError(
                f"steps ({self.steps}) must exceed the largest delay + 1 "
                f"({max(self.delays) + 1}) for the recurrence to act"
            )
        if self.surrogate not in ("atan", "triangle"):
            raise ValueError(f"surrogate must be 'atan' or 'triangle', got {self.surrogate!r}")
        for name, low, high in (("size", 1, MAX_SIZE), ("batch", 1, 4096), ("steps", 2, 100_000)):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"--{name} must be in {low}…{high}, got {value}")
        if not (math.isfinite(self.tau) and self.tau >= 1):
            raise ValueError(f"--tau must be >= 1 step (a leak of 1/tau per step), got {self.tau}")
        peak = _peak_bytes(self.steps, self.batch, self.size)
        if peak > MAX_PEAK_BYTES:
            raise ValueError(
                f"--steps {self.steps}, --batch {self.batch} and --size {self.size} together "
                f"need about {peak / 1e9:.0f} GB of memory (at most {MAX_PEAK_BYTES / 1e9:.0f} "
                "GB): lower one of them"
            )
        for name in ("gain", "input_mean", "input_std", "surrogate_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and abs(value) <= MAX_MAGNITUDE):
                raise ValueError(
                    f"--{name.replace('_', '-')} must be finite and at most "
                    f"{MAX_MAGNITUDE:g} in magnitude, got {value}"
                )
        if self.input_std < 0:
            raise ValueError(f"--input-std must be >= 0, got {self.input_std}")
        if self.surrogate_scale < 1 / MAX_MAGNITUDE:
            raise ValueError(
                f"--surrogate-scale must be >= {1 / MAX_MAGNITUDE:g}, got {self.surrogate_scale}"
            )
        if not is_seed(self.seed):
            raise ValueError(f"--seed must be in 0…{MAX_SEED}, got {self.seed}")


@dataclass
class DelayResult:
    """What was measured for one delay, and the S3 prediction from the same trajectory."""

    delay: int
    weight_grad_norm: float
    growth_measured: float  # exp(slope of log ‖δ[T-1-k]‖ over k)
    a: float  # S3 estimate: max |α(1 − θψ')|
    b: float  # S3 estimate: ‖W‖₂ · max ψ'
    radius: float  # r_d of λ^(d+1) − a λ^d − b: the S3 bound's growth per step
    a_rms: float  # mean-field estimate: rms of α(1 − θψ')
    b_rms: float  # mean-field estimate: ‖W‖_F/√N · rms ψ'
    radius_rms: float  # r_d from (a_rms, b_rms)
    spike_rate: float
    decomposition_error: float  # ‖Σ_t G[t] − ∂L/∂W‖ / ‖∂L/∂W‖
    backward_norms: list[float] = field(repr=False)  # ‖δ[T-1-k]‖, k = 0 … T-1
    s3_bound: list[float] = field(repr=False)  # e[k], same k
    step_contributions: list[float] = field(repr=False)  # ‖G[t]‖, t = 0 … T-1


class _RecordingLIF(LIF):
    """LIF that keeps the membrane ``h[t]`` (before firing) of every step, detached."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.membranes: list[Tensor] = []

    def step(self, u, state):
        self.membranes.append(lif_charge(u, state[0], self.p).detach())
        return super().step(u, state)


def _surrogate(setup: GradientSetup):
    if setup.surrogate == "atan":
        return ATan(setup.surrogate_scale)
    return Triangle(setup.surrogate_scale)


def _s3_sequence(a: float, b: float, delay: int, start: float, length: int) -> np.ndarray:
    """``e[k] = a e[k-1] + b e[k-1-d]`` with ``e[0] = start`` and ``e[k<0] = 0``."""
    e = np.zeros(length)
    e[0] = start
    for k in range(1, length):
        e[k] = a * e[k - 1] + (b * e[k - 1 - delay] if k - 1 - delay >= 0 else 0.0)
    return e


def _growth_factor(norms: np.ndarray) -> float:
    """``exp`` of the least-squares slope of ``log norms`` over the steps where they are > 0."""
    k = np.flatnonzero(norms > 0)
    if len(k) < 2:  # no gradient to follow (a silent network): no growth factor
        return math.nan
    return float(math.exp(np.polyfit(k, np.log(norms[k]), 1)[0]))


def measure_delay(
    setup: GradientSetup, delay: int, weight: Tensor, current: Tensor, readout: Tensor
) -> DelayResult:
    """Run one delay on the given weights ``(N, N)``, input current ``(T, B, N)`` and readout."""
    neuron = _RecordingLIF(tau=setup.tau, v_reset=None, surrogate=_surrogate(setup))
    layer = DelRec.fixed(setup.size, neuron, delay_init=float(delay), engine="reference").double()
    with torch.no_grad():
        layer.weight.copy_(weight)
    current = current.clone().requires_grad_(True)
    spikes = layer(current)
    loss = (spikes[-1] * readout).sum()
    loss.backward()

    delta = current.grad  # ∂L/∂h[t], (T, B, N)
    presynaptic = torch.zeros_like(spikes)
    presynaptic[delay + 1 :] = spikes[: len(spikes) - delay - 1].detach()
    contributions = torch.einsum("tbi,tbj->tij", delta, presynaptic)  # G[t], sums to ∂L/∂W
    backward_norms = delta.flatten(1).norm(dim=1).flip(0).numpy()

    membranes = torch.stack(neuron.membranes)
    slopes = _surrogate(setup).derivative(membranes - neuron.p.v_threshold)  # ψ'_t, (T, B, N)
    leak_path = (1.0 - 1.0 / setup.tau) * (1.0 - neuron.p.v_threshold * slopes)  # A_t
    a = float(leak_path.abs().max())
    b = float(torch.linalg.matrix_norm(weight, ord=2) * slopes.max())
    a_rms = float(leak_path.pow(2).mean().sqrt())
    b_rms = float(weight.norm() / math.sqrt(setup.size) * slopes.pow(2).mean().sqrt())
    bound = _s3_sequence(a, b, delay, float(backward_norms[0]), len(backward_norms))

    weight_grad = layer.weight.grad
    return DelayResult(
        delay=delay,
        weight_grad_norm=float(weight_grad.norm()),
        growth_measured=_growth_factor(backward_norms),
        a=a,
        b=b,
        radius=spectral_radius(a, b, delay),
        a_rms=a_rms,
        b_rms=b_rms,
        radius_rms=spectral_radius(a_rms, b_rms, delay),
        spike_rate=float(spikes.detach().mean()),
        backward_norms=backward_norms.tolist(),
        s3_bound=bound.tolist(),
        step_contributions=contributions.flatten(1).norm(dim=1).tolist(),
        decomposition_error=float((contributions.sum(0) - weight_grad).norm() / weight_grad.norm()),
    )


def run_gradient_experiment(setup: GradientSetup) -> list[DelayResult]:
    """Measure every delay of ``setup`` on the same weights, input current and readout."""
    generator = torch.Generator().manual_seed(setup.seed)
    weight = torch.empty(setup.size, setup.size, dtype=torch.float64)
    torch.nn.init.orthogonal_(weight, gain=setup.gain, generator=generator)
    shape = (setup.steps, setup.batch, setup.size)
    current = setup.input_mean + setup.input_std * torch.randn(
        shape, generator=generator, dtype=torch.float64
    )
    readout = torch.randn(setup.size, generator=generator, dtype=torch.float64)
    return [measure_delay(setup, d, weight, current, readout) for d in setup.delays]


def format_results(results: list[DelayResult]) -> str:
    """Plain-text table: measured ‖∂L/∂W‖ and growth factor next to the S3 radius."""
    lines = [
        f"{'d':>3}  {'|dL/dW|':>10}  {'growth/step':>11}  {'S3 r_d':>8}  {'a':>6}  "
        f"{'b':>6}  {'rms r_d':>8}  {'a_rms':>6}  {'b_rms':>6}  {'spikes':>6}"
    ]
    for r in results:
        lines.append(
            f"{r.delay:>3}  {r.weight_grad_norm:>10.4g}  {r.growth_measured:>11.4f}  "
            f"{r.radius:>8.4f}  {r.a:>6.3f}  {r.b:>6.3f}  {r.radius_rms:>8.4f}  "
            f"{r.a_rms:>6.3f}  {r.b_rms:>6.3f}  {r.spike_rate:>6.3f}"
        )
    return "\n".join(lines)


def why_no_gradient(result: DelayResult) -> str | None:
    """Why ``result`` has no weight gradient or no growth factor (``nan``), and what to change;
    None when it has both."""
    if result.weight_grad_norm > 0 and math.isfinite(result.growth_measured):
        return None
    if result.spike_rate == 0:
        return (
            "the layer never spiked, so no recurrent spike carries a gradient to W: "
            "raise --input-mean (or --gain)"
        )
    if result.backward_norms[0] == 0:
        return (
            "at the last step, the one the loss reads, every membrane is outside the "
            "surrogate's support (ψ' = 0), so no gradient flows back: use --surrogate atan "
            "(ψ' > 0 everywhere), a wider --surrogate-scale, or another --seed or --steps"
        )
    if not math.isfinite(result.growth_measured):
        return (
            "∂L/∂h is non-zero at fewer than 2 steps, too few to fit a growth factor: "
            "try another --seed or more --steps"
        )
    return "no presynaptic spike meets a non-zero ∂L/∂h: try another --seed or more --steps"


def results_as_records(setup: GradientSetup, results: list[DelayResult]) -> dict:
    """JSON-ready (strict JSON: null for a non-finite number, e.g. the growth factor of a
    delay without gradient): the setup and every result with its curves."""
    records = {"setup": asdict(setup), "results": [asdict(r) for r in results]}
    return files.strict_json(records)


def plot_gradients(setup: GradientSetup, results: list[DelayResult], path) -> None:
    """Three panels: ‖∂L/∂h‖ backward in time with the S3 bound, per-step contributions to
    ∂L/∂W, and the measured growth factor next to r_d."""
    plt = files.pyplot()

    fig, (back, contrib, rates) = plt.subplots(1, 3, figsize=(16, 4.6))
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(results)))
    for r, colour in zip(results, colours):
        k = np.arange(len(r.backward_norms))
        back.semilogy(k, np.maximum(r.backward_norms, 1e-300), color=colour, label=f"d = {r.delay}")
        back.semilogy(k, r.s3_bound, color=colour, ls="--", lw=0.8)
        contrib.semilogy(
            np.maximum(r.step_contributions, 1e-300), color=colour, label=f"d = {r.delay}"
        )
    measured = np.concatenate([r.backward_norms for r in results])
    back.set(
        xlabel="steps back from the loss k",
        ylabel="‖∂L/∂h[T-1-k]‖",
        title="measured (solid) and S3 bound e[k] (dashed)",
    )
    if (measured > 0).any():  # a silent network has no gradient to scale the axis by
        back.set_ylim(max(1e-12, measured[measured > 0].min() / 10), measured.max() * 1e3)
    back.legend(fontsize=8)
    contributions = np.concatenate([r.step_contributions for r in results])
    contrib.set(
        xlabel="time step t",
        ylabel="‖G[t]‖ (contribution to ∂L/∂W)",
        title="per-step contributions to ∂L/∂W",
    )
    if (contributions > 0).any():
        contrib.set_ylim(
            max(1e-12, contributions[contributions > 0].min()), contributions.max() * 10
        )

    delays = [r.delay for r in results]
    rates.plot(delays, [r.radius for r in results], "o--", label="S3 bound r_d (sup a, b)")
    rates.plot(delays, [r.radius_rms for r in results], "d--", label="mean-field r_d (rms a, b)")
    rates.plot(delays, [r.growth_measured for r in results], "s-", label="measured growth per step")
    rates.axhline(1.0, color="black", lw=0.8)
    twin = rates.twinx()
    norms = [r.weight_grad_norm for r in results]
    twin.plot(delays, norms, "^:", color="tab:red", label="‖∂L/∂W‖")
    if any(n > 0 for n in norms):  # log scale only where there is a gradient to show
        twin.set_yscale("log")
    twin.set_ylabel("‖∂L/∂W‖", color="tab:red")
    rates.set(
        xlabel="recurrent delay d (steps)",
        ylabel="growth factor per step",
        title=f"N={setup.size}, T={setup.steps}, gain={setup.gain}, τ={setup.tau}",
    )
    lines = rates.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    rates.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8)
    fig.tight_layout()
    files.write_figure(path, fig)
    plt.close(fig)
