"""The fast engine in the layer: what the engine paths of ``test_engine_paths.py`` do not see
(widest box sums, strided inputs, long float32 sequences, dispatch, memory, other neurons)."""

import dataclasses
import math

import pytest
import torch
from engine_harness import (
    Case,
    Config,
    Expected,
    assert_grad_close,
    compare,
    draw_case,
    forced_in_layers,
    interpreted_paths,
    native_kernels,
    paths,
    reference,
)
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


def test_wide_kernels_keep_exact_box_sums():
    """σ = 80 (w = 81): the box sums behind the delay and spread gradients no longer fit in
    int8 and are kept in int16; every path's gradients still equal the reference's."""
    case = draw_case(
        delay_type="axonal",
        size=5,
        batch=2,
        steps=200,
        max_delay=30.0,
        sigma=40.0,
        learn_spread=True,
        neuron=LIF(tau=2.0),
        integer_share=0.5,
        drive=(0.8, 0.5),
        seed=12,
    )
    case.width[0] = 81.0
    assert axonal._AxonalPlan(case.delay, case.width, 1).count_dtype == torch.int16
    expected = Expected(case.bind(reference), case.inputs(), case.grad_out, case.threshold)
    assert 0 < expected.spikes.mean() < 1
    for path in paths(Config("axonal")):
        compare(case.bind(path.run), expected)


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
    reference_layer, fast_layer = random_layer_pair(
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
        expected = reference_layer.eval()(current)
        spikes = fast_layer.eval()(current)
    assert calls, "eval without autograd should use the integer ring-buffer path"
    assert expected.sum() > 0
    assert torch.equal(spikes, expected)
    assert torch.equal(fast_layer.delay, reference_layer.delay)  # parameters untouched


def _counting(function, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return wrapper


def test_the_cpp_time_loops_build_and_run_by_default(monkeypatch):
    """The C++ kernels compile on this machine (a build error fails here, with the compiler's
    message), and a float32 layer with default settings runs them and gets the reference
    layer's spikes and gradients."""
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
    current = torch.rand(10, 3, 8, generator=torch.Generator().manual_seed(2)) * 1.5
    for delay_type in ("axonal", "synaptic"):
        results, layers = [], []
        for engine in ("auto", "reference"):
            layer = DelRec(
                8,
                LIF(),
                delay_type=delay_type,
                delay_init="uniform:0:5",
                sigma=2.0,
                engine=engine,
                generator=torch.Generator().manual_seed(5),
            )
            x = current.clone().requires_grad_()
            spikes = layer(x)
            grads = torch.autograd.grad(spikes.sum(), [x, layer.weight, layer.delay])
            results.append((spikes.detach(), grads))
            layers.append(layer)
        with torch.no_grad():  # integer-delay inference: the compiled ring
            layers[0].eval()(current)
        (spikes, grads), (expected_spikes, expected_grads) = results
        assert 0 < expected_spikes.mean() < 1
        assert torch.equal(spikes, expected_spikes)
        for name, grad, expected in zip(("current", "weight", "delay"), grads, expected_grads):
            assert_grad_close(name, grad, expected)
    assert len(calls) == 5


def training_case(delay_type, *, size, steps, max_delay, seed):
    """A random training-mode case of 3 sequences: learned spread σ = 2, recurrent dropout 0.3,
    half the delays integers, a LIF neuron with soft reset."""
    return draw_case(
        delay_type=delay_type,
        size=size,
        batch=3,
        steps=steps,
        max_delay=max_delay,
        sigma=2.0,
        learn_spread=True,
        neuron=LIF(tau=2.0, v_reset=None),
        dropout=0.3,
        integer_share=0.5,
        drive=(0.8, 0.5),
        seed=seed,
    )


@pytest.mark.parametrize("delay_type", ["axonal", "synaptic"])
def test_strided_inputs_and_gradients_give_the_same_result(delay_type):
    """Input, dropout mask and incoming gradient as permuted (non-contiguous) views, as a
    network passes them, give every path what their contiguous copies give."""
    case = training_case(delay_type, size=5, steps=30, max_delay=6.0, seed=8)
    strided = Case(
        case.current.permute(1, 2, 0).contiguous().permute(2, 0, 1),
        case.weight,
        case.delay,
        case.width,
        case.neuron,
        case.mask.t().contiguous().t(),
        case.grad_out.permute(2, 0, 1).contiguous().permute(1, 2, 0),
    )
    assert not any(x.is_contiguous() for x in (strided.current, strided.mask, strided.grad_out))
    assert not strided.inputs()["current"].is_contiguous()  # inputs() keeps the strides
    for path in paths(Config(delay_type)):
        results = []
        for c in (case, strided):
            inputs = c.inputs()
            spikes = c.bind(path.run)(**inputs)
            grads = torch.autograd.grad(spikes, list(inputs.values()), c.grad_out)
            results.append((spikes.detach(), dict(zip(inputs, grads))))
        (expected_spikes, expected_grads), (spikes, grads) = results
        assert 0 < expected_spikes.mean() < 1
        assert torch.equal(spikes, expected_spikes), path.name
        for name, grad in grads.items():
            torch.testing.assert_close(
                grad, expected_grads[name], rtol=1e-12, atol=1e-12, msg=f"{path.name} {name}"
            )


@pytest.mark.parametrize("delay_type", ["axonal", "synaptic"])
@pytest.mark.parametrize("frozen", [("weight",), ("current", "weight"), ("delay", "width")])
def test_frozen_inputs_leave_the_other_gradients_as_they_are(delay_type, frozen):
    """A path told that some inputs need no gradient (a frozen weight: the C++ axonal backward
    then skips its weight gradient) gives the others' gradients of the run that needs them all."""
    case = training_case(delay_type, size=6, steps=40, max_delay=8.0, seed=5)
    for path in paths(Config(delay_type)):
        everything = case.inputs()
        spikes = case.bind(path.run)(**everything)
        expected = dict(
            zip(everything, torch.autograd.grad(spikes, list(everything.values()), case.grad_out))
        )
        inputs = case.inputs()
        for name in frozen:
            inputs[name].requires_grad_(False)
        learning = {k: v for k, v in inputs.items() if v.requires_grad}
        spikes = case.bind(path.run)(**inputs)
        grads = torch.autograd.grad(spikes, list(learning.values()), case.grad_out)
        for name, grad in zip(learning, grads):
            torch.testing.assert_close(
                grad, expected[name], rtol=1e-12, atol=1e-12, msg=f"{path.name} {name}"
            )


def test_float32_recurrent_input_stays_accurate_over_long_sequences():
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
    for path in paths(Config("axonal", dtype=torch.float32)):
        spikes = path.run(current, weight.requires_grad_(), delay, width, LIF(tau=1.0), None)
        assert torch.equal(spikes[..., :sources], source_input.float() / 2.0), path.name
        assert torch.equal(spikes[..., sources:], (margin > 0).float()), path.name


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
    current = (
        torch.rand(15, 2, 5, generator=torch.Generator().manual_seed(2)) * 2
    ).requires_grad_()
    spikes = layer(current)
    width = 1.0 + 2.0  # 1 + σ: the spreads don't learn
    length = kernel_length(float(layer.delay.detach().max()), width)
    kernel = triangle_kernel(layer.delay, width, length)
    expected = reference_recurrence(current, layer.weight, kernel, layer.neuron)
    assert torch.equal(spikes, expected) and 0 < expected.mean() < 1
    inputs = [current, layer.weight, layer.delay]
    grads = torch.autograd.grad(spikes.sum(), inputs)
    for name, grad, wanted in zip(
        ("current", "weight", "delay"), grads, torch.autograd.grad(expected.sum(), inputs)
    ):
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, wanted, rtol=0, atol=0, msg=name)
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
    with native_kernels(False):  # the lag-stacked GEMM, when the C++ kernels can't be built
        assert type(synaptic_layer(current).grad_fn).__name__ == "_LagStackedBackward"


# --------------------------------------------------------------------------- second derivatives
HAND_WRITTEN = [
    pytest.param(delay_type, path, id=path.name)
    for delay_type in ("axonal", "synaptic")
    for path in paths(Config(delay_type)) + interpreted_paths(Config(delay_type))
]


@pytest.mark.parametrize(("delay_type", "path"), HAND_WRITTEN)
def test_double_backward_through_a_hand_written_path_names_the_reference(delay_type, path):
    """A hand-written backward has first derivatives only: a backward with create_graph=True
    (double backward, gradient penalties) raises and names engine='reference', instead of
    crashing inside PyTorch or returning a gradient without its second-order part."""
    layer = DelRec(3, delay_type=delay_type, engine=path.name).double()
    current = (torch.rand(4, 1, 3, dtype=torch.float64) * 2).requires_grad_()
    with forced_in_layers(path, "cpu"):
        spikes = layer(current)
    with pytest.raises(RuntimeError, match="first derivatives only.*engine='reference'"):
        (grad,) = torch.autograd.grad(spikes.sum(), current, create_graph=True)
        torch.autograd.grad(grad.square().sum(), layer.weight)


class SmoothNeuron(nn.Module):
    """A neuron with a smooth output (a sigmoid for the spike): the whole reference loop is then
    smooth, so finite differences check its second derivatives."""

    def initial_state(self, like):
        return (torch.zeros_like(like),)

    def step(self, u, state):
        h = 0.5 * state[0] + u
        s = torch.sigmoid(4 * (h - 1))
        return s, (h * (1 - s),)


@pytest.mark.parametrize("delay_type", ["axonal", "synaptic"])
def test_reference_path_has_exact_second_derivatives(delay_type):
    """engine='reference' is autograd of the buffer loop: its double backward in current,
    weights, delays and widths agrees with finite differences of its gradients."""
    g = torch.Generator().manual_seed(1)
    n = 3
    shape = (n,) if delay_type == "axonal" else (n, n)
    inputs = (
        torch.rand(5, 2, n, generator=g, dtype=torch.float64) * 1.5,
        torch.randn(n, n, generator=g, dtype=torch.float64),
        torch.rand(*shape, generator=g, dtype=torch.float64) * 3 + 0.3,  # off the kinks
        torch.full((n,), 1.5, dtype=torch.float64),
    )
    run = PATHS["reference"].run
    assert torch.autograd.gradgradcheck(
        lambda *x: run(*x, SmoothNeuron(), None), [x.requires_grad_() for x in inputs]
    )
