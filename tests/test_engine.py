"""The fast engine against the reference loop: same spikes, same gradients, less memory."""

import dataclasses
import math
import os
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from engine_helpers import NEURONS, assert_close_relative
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from delrec.bench import saved_bytes
from delrec.delays import kernel_length, triangle_kernel
from delrec.engine import PATHS, axonal, native, reference_recurrence, ring, select, synaptic
from delrec.layers import DelRec
from delrec.neurons import LIF, AdLIF, ATan


def random_layer_pair(*, size, delay_type, delays, sigma, learn_spread, neuron, dropout, seed):
    """The same float64 layer twice: engine 'reference' and engine 'fast'."""
    g = torch.Generator().manual_seed(seed)
    layers = [
        DelRec(
            size,
            neuron,
            delay_type=delay_type,
            delay_init=0.0,
            learn_spread=learn_spread,
            sigma=sigma,
            recurrent_dropout=dropout,
            engine=engine,
        ).double()
        for engine in ("reference", "fast")
    ]
    with torch.no_grad():
        layers[0].weight.copy_(
            torch.randn(size, size, generator=g, dtype=torch.float64) * 1.5 / math.sqrt(size)
        )
        layers[0].delay.copy_(delays)
        if learn_spread:
            layers[0].spread_logits.copy_(torch.randn(size, generator=g, dtype=torch.float64))
    layers[1].load_state_dict(layers[0].state_dict())
    return layers


def draw_delays(shape, max_delay, integer_share, g):
    """Delays in ``[0, max_delay]``: a share rounded to integers, the first one exactly 0."""
    delays = torch.rand(shape, generator=g, dtype=torch.float64) * max_delay
    integer = torch.rand(shape, generator=g) < integer_share
    delays[integer] = delays[integer].round()
    delays.view(-1)[0] = 0.0
    return delays


def run_with_grads(layer, current, mask, grad_out):
    """Spikes and the gradients of ``Σ spikes·grad_out`` w.r.t. current and every parameter."""
    current = current.clone().requires_grad_()
    params = [p for p in (layer.weight, layer.delay, layer.spread_logits) if p is not None]
    spikes = layer(current, dropout_mask=mask)
    inputs = [current] + params
    grads = torch.autograd.grad((spikes * grad_out).sum(), inputs, allow_unused=True)
    return spikes.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


LOOPS = ("native", "pytorch")  # the engine's time loops in C++, or in PyTorch ops


@contextmanager
def time_loops(which):
    """Run the fast engine's loops in C++ (``native``) or in PyTorch ops (the fallback)."""
    with mock.patch.dict(os.environ, {"DELREC_NATIVE": "1" if which == "native" else "0"}):
        yield


@settings(max_examples=120, deadline=None, derandomize=True)
@given(
    steps=st.integers(1, 14),
    batch=st.integers(1, 3),
    size=st.integers(1, 5),
    delay_type=st.sampled_from(["axonal", "synaptic", "shared"]),
    max_delay=st.sampled_from([0.0, 1.0, 4.0, 25.0]),  # 25 > T: kernels longer than the sequence
    integer_share=st.sampled_from([0.0, 0.5, 1.0]),
    sigma=st.sampled_from([0.0, 0.5, 1.0, 2.7, 10.0, 40.0]),
    learn_spread=st.booleans(),
    neuron=NEURONS,
    dropout=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fast_engine_matches_reference(
    steps,
    batch,
    size,
    delay_type,
    max_delay,
    integer_share,
    sigma,
    learn_spread,
    neuron,
    dropout,
    seed,
):
    g = torch.Generator().manual_seed(seed)
    shape = {"axonal": (size,), "synaptic": (size, size), "shared": (1,)}[delay_type]
    delays = draw_delays(shape, max_delay, integer_share, g)
    reference, fast_layer = random_layer_pair(
        size=size,
        delay_type=delay_type,
        delays=delays,
        sigma=sigma,
        learn_spread=learn_spread,
        neuron=neuron,
        dropout=0.3 if dropout else 0.0,
        seed=seed,
    )
    current = torch.randn(steps, batch, size, generator=g, dtype=torch.float64) * 0.8 + 0.4
    mask = (
        torch.bernoulli(torch.full((batch, size), 0.7, dtype=torch.float64), generator=g) / 0.7
        if dropout
        else None
    )
    grad_out = torch.randn(steps, batch, size, generator=g, dtype=torch.float64)

    expected_spikes, expected_grads = run_with_grads(reference, current, mask, grad_out)
    for loops in LOOPS:
        with time_loops(loops):
            spikes, grads = run_with_grads(fast_layer, current, mask, grad_out)
        assert torch.equal(spikes, expected_spikes), loops
        for name, actual, expected in zip(
            ["current", "weight", "delay", "spread"], grads, expected_grads
        ):
            assert actual.shape == expected.shape, name
            assert_close_relative(actual, expected)


@pytest.mark.parametrize("delay_type", ["axonal", "synaptic"])
@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize("sigma", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("delay", [0.0, 1.0, 2.0, 5.0, -0.5])
def test_gradients_at_kinks_follow_autograd_of_the_kernel(delay_type, loops, sigma, delay):
    """Integer centres and integer spreads put lags exactly on the kinks of the triangle; the
    reference convention (|x|' = 0 at 0, the clamp passes the gradient at 0) must hold there.
    A negative delay (before the optimizer's clamp) is read like the reference reads it."""
    size = 4
    shape = (size,) if delay_type == "axonal" else (size, size)
    reference, fast_layer = random_layer_pair(
        size=size,
        delay_type=delay_type,
        delays=torch.full(shape, delay, dtype=torch.float64),
        sigma=sigma,
        learn_spread=True,
        neuron=LIF(tau=2.0),
        dropout=0.0,
        seed=3,
    )
    g = torch.Generator().manual_seed(4)
    current = torch.rand(20, 2, size, generator=g, dtype=torch.float64) * 1.6
    grad_out = torch.randn(20, 2, size, generator=g, dtype=torch.float64)
    expected_spikes, expected_grads = run_with_grads(reference, current, None, grad_out)
    with time_loops(loops):
        spikes, grads = run_with_grads(fast_layer, current, None, grad_out)
    assert expected_spikes.sum() > 0
    assert torch.equal(spikes, expected_spikes)
    for actual, expected in zip(grads, expected_grads):
        assert_close_relative(actual, expected)


@pytest.mark.parametrize("loops", LOOPS)
def test_wide_kernels_keep_exact_box_sums(loops):
    """σ = 80 (w = 81): the box sums behind the delay and spread gradients no longer fit in
    int8 and are kept in int16; gradients still equal the reference's."""
    size = 5
    g = torch.Generator().manual_seed(12)
    reference, fast_layer = random_layer_pair(
        size=size,
        delay_type="axonal",
        delays=draw_delays((size,), 30.0, 0.5, g),
        sigma=80.0,
        learn_spread=True,
        neuron=LIF(tau=2.0),
        dropout=0.0,
        seed=12,
    )
    assert (
        axonal._AxonalPlan(fast_layer.delay, fast_layer.delays_and_width()[1], 1).count_dtype
        == torch.int16
    )
    current = torch.rand(200, 2, size, generator=g, dtype=torch.float64) * 1.6
    grad_out = torch.randn(200, 2, size, generator=g, dtype=torch.float64)
    expected_spikes, expected_grads = run_with_grads(reference, current, None, grad_out)
    with time_loops(loops):
        spikes, grads = run_with_grads(fast_layer, current, None, grad_out)
    assert 0 < expected_spikes.mean() < 1
    assert torch.equal(spikes, expected_spikes)
    for actual, expected in zip(grads, expected_grads):
        assert_close_relative(actual, expected)


def test_delay_clamped_at_zero_can_grow():
    """d = 0, σ = 0: ∂κ(1)/∂d = 0 and ∂κ(2)/∂d = +1/w² (docs/design.md#gradients-at-the-kinks),
    so a delay sitting at the clamp still gets a gradient from the spikes two steps back."""
    weight = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # neuron 0 → neuron 1
    current = torch.zeros(6, 1, 2, dtype=torch.float64)
    current[1, 0, 0] = 1.0  # neuron 0 fires at t = 1
    neuron = LIF(surrogate=ATan(2.0))
    delay = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    path = select("axonal", neuron, device="cpu", integer=False, grad=True)
    spikes = path.run(current, weight, delay, 1.0, neuron)
    (grad,) = torch.autograd.grad(spikes[:, 0, 1].sum(), delay)
    kernel_delay = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    expected_spikes = reference_recurrence(
        current, weight, triangle_kernel(kernel_delay, 1.0, 3), neuron
    )
    (expected,) = torch.autograd.grad(expected_spikes[:, 0, 1].sum(), kernel_delay)
    assert torch.equal(spikes, expected_spikes)
    assert spikes[:, 0, 1].nonzero().flatten().tolist() == [2]
    assert grad[0] > 0  # from t = 3 on: ∂h₁[3]/∂d₀ = +1 through ∂κ(2)/∂d
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("delay_type", ["axonal", "synaptic", "shared"])
def test_integer_delay_path_equals_reference_in_eval(delay_type, monkeypatch):
    """Eval mode rounds the delays (σ = 0); without autograd the fast engine runs the ring
    buffer."""
    size = 6
    shape = {"axonal": (size,), "synaptic": (size, size), "shared": (1,)}[delay_type]
    g = torch.Generator().manual_seed(11)
    delays = torch.rand(shape, generator=g, dtype=torch.float64) * 12.0
    delays.view(-1)[0] = 2.5  # rounds half to even
    reference, fast_layer = random_layer_pair(
        size=size,
        delay_type=delay_type,
        delays=delays,
        sigma=5.0,
        learn_spread=False,
        neuron=LIF(tau=2.0),
        dropout=0.2,
        seed=11,
    )
    calls = []
    for name in ("cpp-ring", "ring"):
        ring = PATHS[name]
        monkeypatch.setitem(PATHS, name, dataclasses.replace(ring, run=_counting(ring.run, calls)))
    current = torch.rand(60, 3, size, generator=g, dtype=torch.float64) * 1.3
    with torch.no_grad():
        expected = reference.eval()(current)
        spikes = fast_layer.eval()(current)
    assert calls, "eval without autograd should use the integer ring-buffer path"
    assert expected.sum() > 0
    assert torch.equal(spikes, expected)
    assert torch.equal(fast_layer.delay, reference.delay)  # parameters untouched


def _counting(function, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return wrapper


def test_the_cpp_time_loops_build_and_run_by_default(monkeypatch):
    """The C++ kernels compile on this machine (a build error fails here, with the compiler's
    message) and a float32 layer with default settings runs them."""
    native.build("axonal")
    native.build("synaptic")
    native.build("ring")
    calls = []
    monkeypatch.setattr(axonal, "_native_forward", _counting(axonal._native_forward, calls))
    monkeypatch.setattr(axonal, "_native_backward", _counting(axonal._native_backward, calls))
    monkeypatch.setattr(
        synaptic._SynapticSlots, "apply", _counting(synaptic._SynapticSlots.apply, calls)
    )
    monkeypatch.setattr(ring.IntegerLayer, "run", _counting(ring.IntegerLayer.run, calls))
    for delay_type in ("axonal", "synaptic"):
        layer = DelRec(8, LIF(), delay_type=delay_type, delay_init="uniform:0:5", sigma=2.0)
        layer(torch.rand(10, 3, 8)).sum().backward()
        with torch.no_grad():
            layer.eval()(torch.rand(10, 3, 8))
    assert len(calls) == 5


@pytest.mark.parametrize("delay_type", ["axonal", "synaptic"])
@pytest.mark.parametrize("loops", LOOPS)
def test_strided_inputs_and_gradients_give_the_same_result(delay_type, loops):
    """Input, dropout mask and incoming gradient as permuted (non-contiguous) views, as a
    network passes them, give what their contiguous copies give."""
    size, steps, batch = 5, 30, 3
    g = torch.Generator().manual_seed(8)
    shape = (size,) if delay_type == "axonal" else (size, size)
    _, layer = random_layer_pair(
        size=size,
        delay_type=delay_type,
        delays=draw_delays(shape, 6.0, 0.5, g),
        sigma=2.0,
        learn_spread=True,
        neuron=LIF(tau=2.0, v_reset=None),
        dropout=0.3,
        seed=8,
    )
    current = (torch.rand(batch, size, steps, generator=g, dtype=torch.float64) * 1.6).permute(
        2, 0, 1
    )
    mask = (torch.rand(size, batch, generator=g, dtype=torch.float64) < 0.7).double().t() / 0.7
    grad_out = torch.randn(size, steps, batch, generator=g, dtype=torch.float64).permute(1, 2, 0)
    assert not (current.is_contiguous() or mask.is_contiguous() or grad_out.is_contiguous())
    with time_loops(loops):
        spikes, grads = run_with_grads(layer, current, mask, grad_out)
        expected_spikes, expected_grads = run_with_grads(
            layer, current.contiguous(), mask.contiguous(), grad_out.contiguous()
        )
    assert 0 < expected_spikes.mean() < 1
    assert torch.equal(spikes, expected_spikes)
    for actual, expected in zip(grads, expected_grads):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loops", LOOPS)
def test_float32_recurrent_input_stays_accurate_over_long_sequences(loops):
    """The running trace is kept in float64, so in a float32 layer the delayed input after 3000
    steps with long, wide kernels still equals the float64 direct sum Σ_k κ(k) s[t-k] to ~1e-7.

    Sources (no recurrence, memoryless) spike where their input is 2; each detector receives one
    source's delayed trace z plus a current ``θ - z_exact + δ`` and fires iff
    ``z - z_exact + δ ≥ 0``: with ``δ = ±2e-6`` its spikes reveal any error above 2e-6 (float32
    running sums would be ~1e-3 off).
    """
    steps, batch, sources = 3000, 2, 5
    g = torch.Generator().manual_seed(0)
    delay = torch.tensor([0.0, 3.3, 47.5, 120.25, 149.9] + [0.0] * sources)
    width = float(torch.tensor(30.7))  # σ = 29.7, as float32
    weight = torch.zeros(2 * sources, 2 * sources)
    weight[sources:, :sources] = torch.eye(sources)  # source j → detector j
    source_input = (torch.rand(steps, batch, sources, generator=g) < 0.3).double() * 2.0
    kernel = triangle_kernel(
        delay[:sources].double(), width, kernel_length(float(delay.max()), width)
    )
    z_exact = torch.zeros(steps, batch, sources, dtype=torch.float64)
    for k in range(1, kernel.shape[1]):
        z_exact[k:] += kernel[:, k] * (source_input[:-k] / 2.0)
    margin = 2e-6 * torch.where(torch.rand(steps, batch, sources, generator=g) < 0.5, 1.0, -1.0)
    current = torch.cat([source_input, 1.0 - z_exact + margin.double()], dim=-1).float()
    neuron = LIF(tau=1.0)
    with time_loops(loops):
        path = select("axonal", neuron, device="cpu", integer=False, grad=True)
        spikes = path.run(current, weight.requires_grad_(), delay, width, neuron)
    assert torch.equal(spikes[..., :sources], source_input.float() / 2.0)
    assert torch.equal(spikes[..., sources:], (margin > 0).float())


def layer_memory(engine, max_delay, sigma=10.0, size=32, steps=60, batch=4):
    layer = DelRec(
        size,
        LIF(),
        delay_init=f"uniform:0:{max_delay}",
        sigma=sigma,
        engine=engine,
        generator=torch.Generator().manual_seed(0),
    )
    current = torch.rand(steps, batch, size, requires_grad=True)
    return saved_bytes(lambda: layer(current))


def test_memory_saved_for_backward_does_not_grow_with_the_delay_range():
    short, long = layer_memory("fast", 5), layer_memory("fast", 100)
    reference_short, reference_long = layer_memory("reference", 5), layer_memory("reference", 100)
    assert long == short
    assert reference_long > 5 * reference_short  # the buffer algorithm grows with L
    assert long < reference_short and long * 20 < reference_long


def test_memory_saved_for_backward_is_below_a_vanilla_recurrent_layer():
    from delrec.bench import VanillaRecurrentLIF

    size, steps, batch = 32, 60, 4
    vanilla = VanillaRecurrentLIF(size, LIF())
    current = torch.rand(steps, batch, size, requires_grad=True)
    assert layer_memory("fast", 100) <= saved_bytes(lambda: vanilla(current))


class ResonateNeuron(nn.Module):
    """A user-written neuron (two state variables), only ``initial_state`` and ``step``."""

    def initial_state(self, like):
        return torch.zeros_like(like), torch.zeros_like(like)

    def step(self, u, state):
        x, y = state
        x = 0.8 * x - 0.3 * y + u
        y = 0.3 * x + 0.8 * y
        s = ATan(2.0)(x - 1.0)
        return s, (x * (1 - s.detach()), y)


class RenamedLIF(LIF):
    """A subclass may override ``step``: it must not be run by the LIF-only fast engine."""


@pytest.mark.parametrize("neuron", [ResonateNeuron(), AdLIF(), RenamedLIF()])
def test_other_neurons_run_the_reference_path(neuron):
    layer = DelRec(
        5, neuron, delay_init="uniform:0:4", sigma=2.0, generator=torch.Generator().manual_seed(1)
    )
    assert layer.engine == "auto"
    assert select("axonal", neuron, device="cpu", integer=False, grad=True).name == "reference"
    current = (torch.rand(15, 2, 5) * 2).requires_grad_()
    spikes = layer(current)
    expected = reference_recurrence(current, layer.weight, layer.kernel(), layer.neuron)
    assert torch.equal(spikes, expected)
    spikes.sum().backward()
    assert layer.delay.grad is not None and current.grad is not None
    with pytest.raises(ValueError, match="engine='fast'"):
        DelRec(5, neuron, engine="fast")


def test_builtin_lif_runs_the_fast_path_by_default():
    layer = DelRec(6, LIF(), sigma=3.0)
    assert layer.engine == "auto"
    assert select("axonal", LIF(), device="cpu", integer=False, grad=True).name == "cpp-axonal"
    spikes = layer(torch.rand(10, 2, 6))
    assert type(spikes.grad_fn).__name__ == "_AxonalRecurrenceBackward"
    synaptic_layer = DelRec(6, LIF(), delay_type="synaptic")
    current = torch.rand(10, 2, 6)
    assert type(synaptic_layer(current).grad_fn).__name__ == "_SynapticSlotsBackward"
    with time_loops("pytorch"):  # the lag-stacked GEMM, when the C++ kernels can't be built
        assert type(synaptic_layer(current).grad_fn).__name__ == "_SynapticRecurrenceBackward"
