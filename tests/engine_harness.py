"""The engine test harness: every engine path against the reference loop, in one place.

Which engine paths a test runs, and how it forces one, lives here and nowhere else in the tests:
:func:`paths` returns, for a :class:`Config` (delay type, integer-delay inference, dtype,
device), every path of the registry :data:`delrec.engine.PATHS` except ``reference`` that
supports the configuration and is available here, each forced by calling its ``run``::

    run(current (T, B, N), weight (N, N), delay (N,) or (N, N), width float or (N,),
        neuron, mask (B, N) or None) -> spikes (T, B, N)

:func:`reference` is what they are compared with: ``PATHS["reference"]`` (the reference loop
on ``triangle_kernel``), which also returns its pre-spike membrane for tie detection.

How a new engine path joins
    Register it in :data:`delrec.engine.PATHS` (``delrec.engine.register``) with honest
    ``supports`` and ``available``: nothing changes here. Every harness test then runs it
    against the reference wherever it is available: at training sizes in float64 and float32
    on one and two threads, on random draws, at the kinks and at the edges
    (``test_engine_paths.py``). A GPU path that Triton's interpreter runs on CPU tensors
    (``runs_on`` is ``delrec.engine.triton.runs_on``) is also run there, by
    :func:`interpreted_paths`, on small cases (random draws, kinks, edges); this module sets
    ``TRITON_INTERPRET=1`` when there is no GPU, before any kernel module is imported. Add
    one planted bug for it to ``tests/mutations/plant.py`` and check that the suite catches
    it (docs/testing.md).

The comparison functions take any function of named input tensors that returns spikes
``(T, B, N)``, so other spiking engines (the fused feedforward LIF against the autograd LIF
loop) use them as they are; engines with a continuous output (feedforward delays against the
convolution) compare it and its gradients with :func:`assert_grad_close`:

* :class:`Expected` — the reference's spikes, membrane and gradients of ``Σ spikes·grad_out``
  for one case, computed once for every candidate compared with it (a reference built on the
  LIF gets its pre-spike membrane from :class:`RecordingLIF`);
* :func:`compare` — spikes identical (up to accepted threshold ties, below), then every
  gradient at the dtype's tolerance, entry by entry;
* :func:`assert_exercised` — rejects a degenerate draw (no spikes, saturated, a zero gradient
  where the test needs one): the test fails, it is not skipped.

Threshold ties. A spike is ``h ≥ θ``. Two correct float32 engines round ``h`` differently, so
where the reference's pre-spike membrane lies strictly within ``TIE_WIDTH[dtype]`` of ``θ``,
they may disagree, and from there the sample's trajectory diverges. :func:`compare` accepts a
disagreement only if, in its sample, every spike that differs at the first step where any
differs is such a tie. That sample then takes no further part: its later spikes are not
compared and its ``grad_out`` is zeroed on both sides, so it adds exactly nothing to any
gradient. At most ``MAX_TIED_SHARE`` of the samples may tie. In float64 the width is 0: spikes
must be identical.

Gradients, per entry: ``|a - e| ≤ rtol·(|e| + floor·rms(e))`` with ``(rtol, floor)`` from
:data:`GRAD_TOLERANCE` and ``rms`` over the tensor's entries. An error confined to the small
entries of a gradient fails; near-zero entries (sums of many terms of both signs) are held to
``rtol·floor·rms``. The tolerances sit about ten times above the worst agreement measured at
training sizes (docs/testing.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from delrec.engine import DELAY_TYPES, PATHS, EnginePath, native
from delrec.engine import triton as gpu
from delrec.neurons import LIF, ATan, LIFParameters, Triangle, lif_charge

if not torch.cuda.is_available():  # before any Triton kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

# (rtol, floor) of the per-entry gradient check (module docstring)
GRAD_TOLERANCE = {torch.float64: (1e-9, 1e-2), torch.float32: (4e-3, 1e-2)}
# a reference membrane within this distance of the threshold is a tie
TIE_WIDTH = {torch.float64: 0.0, torch.float32: 1e-5}
MAX_TIED_SHARE = 0.25


# --------------------------------------------------------------------------- the paths
@dataclass(frozen=True)
class Config:
    """What a layer asks an engine for: the delay type, integer-delay inference (eval mode, no
    autograd), dtype and device."""

    delay_type: str
    integer: bool = False
    dtype: torch.dtype = torch.float64
    device: str = "cpu"

    def __post_init__(self):
        assert self.delay_type in DELAY_TYPES, self.delay_type


def paths(config: Config, neuron: nn.Module | None = None) -> list[EnginePath]:
    """Every engine path but the reference that runs ``config`` with ``neuron`` (default: the
    built-in LIF) here, in the registry's order."""
    return [path for path in _supporting(config, neuron) if path.available(config.device)]


def interpreted_paths(config: Config, neuron: nn.Module | None = None) -> list[EnginePath]:
    """The GPU (Triton) paths that run ``config`` on CPU tensors under Triton's interpreter
    when called by name, where they are not available otherwise (no GPU): slow, so for small
    cases. Empty without the ``triton`` package or off the CPU."""
    if config.device != "cpu" or not (gpu.installed() and gpu.interpreting()):
        return []
    return [
        path
        for path in _supporting(config, neuron)
        if path.runs_on is gpu.runs_on and not path.available(config.device)
    ]


def _supporting(config: Config, neuron: nn.Module | None) -> list[EnginePath]:
    neuron = LIF() if neuron is None else neuron
    grad = not config.integer
    return [
        path
        for name, path in PATHS.items()
        if name != "reference" and path.supports(config.delay_type, neuron, config.integer, grad)
    ]


def unavailable_reason(path: EnginePath, device: str) -> str:
    """Why ``path`` does not run on ``device`` here, in the engine's own words: what the Triton
    kernels miss (``delrec.engine.triton.missing_reason``: the package, a CUDA GPU) or why the
    C++ kernels don't run (``delrec.engine.native.unavailable``)."""
    device = torch.device(device)
    if path.runs_on is gpu.runs_on:
        return f"engine path {path.name!r}: {gpu.missing_reason(device)}"
    if path.name.startswith("cpp-"):
        kernels = path.name.removeprefix("cpp-")
        if device.type != "cpu":
            return f"engine path {path.name!r}: the C++ kernels '{kernels}' take CPU tensors"
        return native.unavailable(kernels)
    return f"engine path {path.name!r} does not run on {device} here"


@contextmanager
def forced_in_layers(path: EnginePath, device: str):
    """Let a layer forced onto ``path`` (``engine=path.name``) run on ``device`` for the block:
    a Triton path on CPU tensors under Triton's interpreter (what :func:`interpreted_paths`
    calls by name; slow, for small cases); where the path can't run, the test skips with
    :func:`unavailable_reason`."""
    interpreted = (
        torch.device(device).type == "cpu"
        and path.runs_on is gpu.runs_on
        and gpu.installed()
        and gpu.interpreting()
    )
    with mock.patch.object(gpu, "_interpreter_paths", True) if interpreted else nullcontext():
        if not path.available(device):
            pytest.skip(unavailable_reason(path, device))
        yield


@contextmanager
def native_kernels(enabled: bool):
    """The C++ kernels on (``DELREC_NATIVE=1``) or off, for tests of what the selector does
    without them (to run one path, call ``PATHS[name].run``)."""
    with mock.patch.dict(os.environ, {"DELREC_NATIVE": "1" if enabled else "0"}):
        yield


@contextmanager
def threads(count: int):
    """Run with ``count`` intra-op threads (ATen and the C++ kernels' parallel loops)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- the reference
class RecordingLIF(LIF):
    """The built-in LIF whose ``step`` also records the pre-spike membrane ``h``, the value it
    compares with the threshold (same expression, so the same rounding)."""

    def __init__(self, params: LIFParameters):
        super().__init__()
        self.p = params
        self.membrane: list[Tensor] = []

    def step(self, u, state):
        self.membrane.append(lif_charge(u, state[0], self.p).detach())
        return super().step(u, state)


def reference(current, weight, delay, width, neuron, mask) -> tuple[Tensor, Tensor]:
    """``PATHS["reference"]``: spikes ``(T, B, N)`` (differentiable) and the pre-spike membrane
    ``(T, B, N)`` (detached) of the built-in LIF ``neuron``."""
    recording = RecordingLIF(neuron.p)
    spikes = PATHS["reference"].run(current, weight, delay, width, recording, mask)
    return spikes, torch.stack(recording.membrane)


# --------------------------------------------------------------------------- cases
# the built-in LIF with every option, for random draws (hypothesis)
NEURONS = st.builds(
    LIF,
    tau=st.sampled_from([1.5, 2.0, 5.0]),
    v_threshold=st.sampled_from([0.5, 1.0]),
    v_reset=st.sampled_from([0.0, -0.3, None]),  # None = soft reset
    detach_reset=st.booleans(),
    decay_input=st.booleans(),
    surrogate=st.one_of(
        st.builds(Triangle, gamma=st.sampled_from([0.5, 1.0])),
        st.builds(ATan, alpha=st.sampled_from([2.0, 5.0])),
    ),
)


@dataclass
class Case:
    """One engine input. Differentiable: ``current``, ``weight``, ``delay`` (``(1,)`` for shared
    delays, expanded to ``(N,)`` for the engine) and ``width`` when it is a tensor ``(N,)``
    (learned spreads; a number otherwise). Fixed: the built-in LIF neuron, the dropout mask
    and the gradient of the loss w.r.t. the spikes, ``grad_out``."""

    current: Tensor
    weight: Tensor
    delay: Tensor
    width: Tensor | float
    neuron: nn.Module
    mask: Tensor | None
    grad_out: Tensor

    @property
    def threshold(self) -> float:
        return self.neuron.p.v_threshold

    def inputs(self, grad: bool = True) -> dict[str, Tensor]:
        """The differentiable inputs by name, as fresh leaves."""
        named = {"current": self.current, "weight": self.weight, "delay": self.delay}
        if torch.is_tensor(self.width):
            named["width"] = self.width
        return {k: v.detach().clone().requires_grad_(grad) for k, v in named.items()}

    def bind(self, run: Callable) -> Callable:
        """``run`` (engine signature) as a function of :meth:`inputs`."""
        n = self.weight.shape[0]

        def call(current, weight, delay, width=self.width):
            if delay.shape == (1,) and n > 1:  # shared: one delay for every neuron
                delay = delay.expand(n)
            return run(current, weight, delay, width, self.neuron, self.mask)

        return call

    def to(self, dtype: torch.dtype, device: str = "cpu") -> Case:
        """The same case in ``dtype`` on ``device``."""

        def cast(x):
            return x.to(device=device, dtype=dtype) if torch.is_tensor(x) else x

        return Case(
            cast(self.current),
            cast(self.weight),
            cast(self.delay),
            cast(self.width),
            self.neuron,
            cast(self.mask),
            cast(self.grad_out),
        )


def draw_case(
    *,
    delay_type: str,
    size: int,
    batch: int,
    steps: int,
    max_delay: float,
    sigma: float,
    learn_spread: bool,
    neuron: nn.Module,
    dropout: float = 0.0,
    integer_share: float = 0.3,
    drive: tuple[float, float] = (0.4, 0.8),
    weight_scale: float = 1.5,
    integer: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
) -> Case:
    """A random case, drawn in float64 on the CPU, then cast to ``dtype`` on ``device``:
    delays ``U(0, max_delay)`` with a share rounded to integers (all of them, and ``w = 1``,
    for integer-delay inference), weights ``N(0, (scale/√N)²)``, currents ``N(mean, std²)``
    with ``drive = (mean, std)``, half-widths ``1 + 2σ·sigmoid(N(0, 1))`` per neuron when the
    spreads learn (else ``1 + σ``), a dropout mask ``(B, N)`` when ``dropout > 0``, and
    ``grad_out ~ N(0, 1)``."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    shape = {"axonal": (size,), "synaptic": (size, size), "shared": (1,)}[delay_type]
    delay = torch.rand(shape, generator=g, dtype=f64) * max_delay
    rounded = torch.rand(shape, generator=g) < (1.0 if integer else integer_share)
    delay[rounded] = delay[rounded].round()
    weight = torch.randn(size, size, generator=g, dtype=f64) * weight_scale / math.sqrt(size)
    width: Tensor | float = 1.0 if integer else 1.0 + sigma
    if learn_spread and not integer:
        width = 1.0 + 2.0 * sigma * torch.sigmoid(torch.randn(size, generator=g, dtype=f64))
    mean, std = drive
    current = torch.randn(steps, batch, size, generator=g, dtype=f64) * std + mean
    mask = None
    if dropout:
        keep = torch.full((batch, size), 1.0 - dropout, dtype=f64)
        mask = torch.bernoulli(keep, generator=g) / (1.0 - dropout)
    grad_out = torch.randn(steps, batch, size, generator=g, dtype=f64)
    return Case(current, weight, delay, width, neuron, mask, grad_out).to(dtype, device)


# --------------------------------------------------------------------------- comparisons
class Expected:
    """The reference's result for one case, computed once: ``reference(**inputs)`` returns the
    spikes ``(T, B, N)`` and the pre-spike membrane compared with ``threshold``; gradients of
    ``Σ spikes·grad_out`` w.r.t. every input that requires one, with some samples (dim 1) left
    out (:meth:`grads`)."""

    def __init__(
        self,
        reference: Callable[..., tuple[Tensor, Tensor]],
        inputs: dict[str, Tensor],
        grad_out: Tensor,
        threshold: float,
    ):
        self.inputs = inputs
        self.grad_out, self.threshold = grad_out, threshold
        self._graph, membrane = reference(**inputs)
        self.spikes, self.membrane = self._graph.detach(), membrane.detach()
        self._grads: dict[tuple[int, ...], dict[str, Tensor]] = {}

    def learned(self) -> list[str]:
        return [k for k, v in self.inputs.items() if v.requires_grad]

    def grads(self, left_out: tuple[int, ...] = ()) -> dict[str, Tensor]:
        """Gradients by input name with the samples ``left_out`` given no weight in the loss."""
        if left_out not in self._grads:
            names = self.learned()
            self._grads[left_out] = dict(
                zip(
                    names,
                    _grads(self._graph, [self.inputs[k] for k in names], self.weighting(left_out)),
                )
            )
        return self._grads[left_out]

    def weighting(self, left_out: tuple[int, ...]) -> Tensor:
        """``grad_out`` with the samples ``left_out`` zeroed."""
        grad_out = self.grad_out.clone()
        grad_out[:, list(left_out)] = 0.0
        return grad_out


def _grads(output: Tensor, inputs: list[Tensor], grad_out: Tensor) -> list[Tensor]:
    if not inputs:
        return []
    found = torch.autograd.grad(output, inputs, grad_out, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found)]


@dataclass
class Agreement:
    """What :func:`compare` measured: the samples left out after a tie, and per gradient the
    smallest ``rtol`` that would have passed, ``max |a - e| / (|e| + floor·rms(e))``."""

    tied: tuple[int, ...]
    error: dict[str, float]

    def worst(self) -> float:
        return max(self.error.values(), default=0.0)


def tied_samples(actual: Tensor, expected: Tensor, membrane: Tensor, threshold: float):
    """The samples (dim 1) whose spikes differ, after checking that each one's first difference
    is a threshold tie (module docstring); AssertionError otherwise."""
    differ = actual != expected
    width = TIE_WIDTH[membrane.dtype]
    tied = []
    for b in differ.any(-1).any(0).nonzero().flatten().tolist():
        first = int(differ[:, b].any(-1).nonzero()[0])
        neurons = differ[first, b].nonzero().flatten()
        distance = (membrane[first, b, neurons] - threshold).abs()
        assert bool((distance < width).all()), (
            f"spikes differ from the reference at step {first} of sample {b}, neurons "
            f"{neurons.tolist()} (engine {actual[first, b, neurons].tolist()}, reference "
            f"{expected[first, b, neurons].tolist()}), where the reference membrane is "
            f"{distance.max().item():.3g} from the threshold: not a tie (< {width:g})"
        )
        tied.append(b)
    assert len(tied) <= MAX_TIED_SHARE * actual.shape[1], (
        f"{len(tied)} of {actual.shape[1]} samples tie at the threshold: more than "
        f"{MAX_TIED_SHARE:.0%}, not rounding"
    )
    return tuple(tied)


def assert_grad_close(name: str, actual: Tensor, expected: Tensor) -> float:
    """The per-entry check of the module docstring; returns the smallest ``rtol`` that passes,
    ``max |a - e| / (|e| + floor·rms(e))``."""
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    rtol, floor = GRAD_TOLERANCE[expected.dtype]
    e, a = expected.double(), actual.double()
    error = (a - e).abs()
    assert bool(torch.isfinite(a).all()), f"gradient '{name}' is not finite"
    if not error.any():
        return 0.0
    scale = e.abs() + floor * float(e.square().mean().sqrt())
    ratio = error / scale
    worst = int(ratio.argmax())
    assert float(ratio.flatten()[worst]) <= rtol, (
        f"gradient '{name}': {int((ratio > rtol).sum())} of {e.numel()} entries off, worst at "
        f"flat index {worst}: engine {a.flatten()[worst].item():.17g}, reference "
        f"{e.flatten()[worst].item():.17g}, error {ratio.flatten()[worst].item():.3g} of "
        f"|e| + {floor:g}·rms(e) (allowed {rtol:g})"
    )
    return float(ratio.max())


def assert_close_relative(actual: Tensor, expected: Tensor, rtol: float = 1e-6) -> None:
    """Equal within ``rtol`` relative to the largest entry of ``expected``: a looser, tensor-wide
    bound than :func:`assert_grad_close`, for comparisons with code whose error is relative to
    the whole tensor (another library's normalisation epsilon, say)."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-12)


def compare(candidate: Callable[..., Tensor], expected: Expected) -> Agreement:
    """Check ``candidate(**inputs)`` against :class:`Expected`: spikes identical up to accepted
    ties, then every gradient (tied samples left out on both sides) at the dtype's tolerance."""
    inputs = {
        k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in expected.inputs.items()
    }
    spikes = candidate(**inputs)
    assert spikes.shape == expected.spikes.shape, (spikes.shape, expected.spikes.shape)
    assert spikes.dtype == expected.spikes.dtype, (spikes.dtype, expected.spikes.dtype)
    tied = tied_samples(spikes.detach(), expected.spikes, expected.membrane, expected.threshold)
    names = expected.learned()
    grads = _grads(spikes, [inputs[k] for k in names], expected.weighting(tied))
    reference_grads = expected.grads(tied)
    error = {k: assert_grad_close(k, g, reference_grads[k]) for k, g in zip(names, grads)}
    return Agreement(tied, error)


def assert_exercised(expected: Expected, nonzero: tuple[str, ...] = ()) -> None:
    """Reject a degenerate draw: some spikes but not only spikes, and a non-zero gradient for
    each name in ``nonzero`` (for ``delay``: some spike reached a delay kernel's slope within
    the sequence, and its effect reached the loss)."""
    rate = float(expected.spikes.mean())
    assert 0.0 < rate < 1.0, f"degenerate draw: spike rate {rate}, the engine is not exercised"
    grads = expected.grads()
    for name in nonzero:
        assert bool(grads[name].ne(0).any()), f"degenerate draw: the {name} gradient is all zero"
