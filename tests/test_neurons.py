"""Neuron models and surrogates against hand-computed values and SpikingJelly."""

import math

import pytest
import torch

from delrec.layers import DelRec
from delrec.neurons import (
    LIF,
    AdLIF,
    ATan,
    LeakyIntegrator,
    LIFParameters,
    Triangle,
    as_neuron,
    lif_step,
    make_surrogate,
    run_steps,
)


def test_heaviside_fires_at_threshold_and_surrogate_shapes_the_gradient():
    x = torch.tensor([-0.5, 0.0, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    s = Triangle(gamma=1.0)(x)
    assert s.tolist() == [0.0, 1.0, 1.0, 1.0]  # Θ(0) = 1
    s.sum().backward()
    assert x.grad.tolist() == pytest.approx([0.5, 1.0, 0.7, 0.0])
    y = torch.tensor([0.1], dtype=torch.float64)
    assert ATan(alpha=5.0).derivative(y).item() == pytest.approx(
        2.5 / (1 + (math.pi * 5 * 0.1 / 2) ** 2)
    )
    assert Triangle(gamma=2.0).derivative(y).item() == pytest.approx(1.9 / 4)


def test_unknown_surrogate_names_the_choices():
    with pytest.raises(ValueError, match="triangle"):
        make_surrogate("sigmoidal")


def test_a_neuron_takes_a_surrogate_by_name_and_refuses_anything_else():
    assert LIF(surrogate="triangle").p.surrogate == Triangle()
    assert LIF(surrogate="ATan").p.surrogate == ATan()
    with pytest.raises(ValueError, match="choose one of"):
        LIF(surrogate="sigmoidal")
    for neuron in (LIF, AdLIF):
        with pytest.raises(TypeError, match="surrogate must be a delrec.neurons.Surrogate.*float"):
            neuron(surrogate=5.0)
    assert AdLIF(surrogate="atan").p.surrogate == ATan()


def test_lif_charge_fire_reset_by_hand():
    u = torch.tensor([[0.6, 0.6, 1.5]])
    v = torch.tensor([[0.5, 0.8, 0.0]])
    # charge: h = v - v/τ + u with τ = 2 → [0.85, 1.0, 1.5]
    s, v_hard = lif_step(u, v, LIFParameters(tau=2.0, v_reset=0.0))
    assert s.tolist() == [[0.0, 1.0, 1.0]]
    assert v_hard[0].tolist() == pytest.approx([0.85, 0.0, 0.0])
    _, v_soft = lif_step(u, v, LIFParameters(tau=2.0, v_reset=None))
    assert v_soft[0].tolist() == pytest.approx([0.85, 0.0, 0.5])
    # decay_input: h = v + (u - v)/τ → [0.55, 0.7, 0.75], nothing fires
    s, v_di = lif_step(u, v, LIFParameters(tau=2.0, decay_input=True))
    assert s.sum() == 0 and v_di[0].tolist() == pytest.approx([0.55, 0.7, 0.75])
    # hard reset to a non-zero v_reset leaks toward v_reset
    _, v_r = lif_step(
        torch.tensor([[0.0]]), torch.tensor([[0.4]]), LIFParameters(tau=4.0, v_reset=-0.4)
    )
    assert v_r.item() == pytest.approx(0.4 - 0.8 / 4)


def test_detach_reset_removes_the_reset_path_from_the_gradient():
    grads = {}
    for detach in (False, True):
        u = torch.tensor([[1.2]], dtype=torch.float64, requires_grad=True)
        neuron = LIF(tau=2.0, v_reset=None, detach_reset=detach, surrogate=Triangle())
        _, (v,) = neuron.step(u, neuron.initial_state(u))
        v.sum().backward()
        grads[detach] = u.grad.item()
    assert grads[True] == pytest.approx(1.0)  # v = h - θ·sg(s): dv/du = 1
    assert grads[False] == pytest.approx(1.0 - 0.8)  # minus θ·ψ'(h - θ) = 0.8


def test_lif_rejects_nonpositive_tau():
    with pytest.raises(ValueError, match="tau"):
        LIF(tau=0.0)


def test_leaky_integrator_is_the_closed_form_filter():
    u = torch.randn(30, 2, 3, dtype=torch.float64)
    out = LeakyIntegrator(tau=20.0, decay_input=True)(u)
    t = torch.arange(30, dtype=torch.float64)
    expected_last = ((1 - 1 / 20) ** (29 - t)).view(30, 1, 1).mul(u / 20).sum(0)
    assert torch.allclose(out[-1], expected_last)
    plain = LeakyIntegrator(tau=2.0)(u)
    assert torch.allclose(plain[1], plain[0] / 2 + u[1])


def test_adaptive_lif_adapts_its_firing():
    neuron = AdLIF(tau_u=5.0, tau_w=50.0, a=0.0, b=3.0)
    spikes = neuron(torch.full((300, 1, 1), 2.0))
    times = spikes.flatten().nonzero().flatten()
    intervals = times.diff()
    assert len(times) > 5 and intervals[-1] > intervals[0]  # spike-frequency adaptation
    state = neuron.initial_state(torch.zeros(4, 7))
    assert len(state) == 2 and all(x.shape == (4, 7) for x in state)


def test_as_neuron_explains_what_a_neuron_needs():
    with pytest.raises(TypeError, match="initial_state"):
        as_neuron(torch.nn.ReLU())


def test_our_lif_reproduces_spikingjelly_lifnode_spike_for_spike():
    sj = pytest.importorskip(
        "spikingjelly.activation_based.neuron",
        reason="optional dependency spikingjelly is not installed",
    )
    sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    torch.manual_seed(0)
    x = torch.rand(200, 8, 16, dtype=torch.float64) * 1.5
    for v_reset, detach, decay_input in [
        (0.0, True, False),
        (None, False, False),
        (0.0, False, True),
        (-0.2, True, True),
    ]:
        node = sj.LIFNode(
            tau=1.5,
            v_threshold=1.0,
            v_reset=v_reset,
            detach_reset=detach,
            decay_input=decay_input,
            surrogate_function=sj_surrogate.ATan(alpha=5.0),
        )
        expected = torch.stack([node(x_t) for x_t in x])
        ours = LIF(
            tau=1.5,
            v_reset=v_reset,
            detach_reset=detach,
            decay_input=decay_input,
            surrogate=ATan(alpha=5.0),
        )(x)
        assert 0 < expected.sum() < expected.numel()
        assert torch.equal(ours, expected)


# --------------------------------------------------------------------------- refused values
@pytest.mark.parametrize("make", [Triangle, ATan])
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_surrogate_width_must_be_finite_and_positive(make, value):
    """A zero, negative or non-finite γ or α gave NaN, zero or wrong-sign gradients."""
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        make(value)
    with pytest.raises(TypeError, match="must be a number"):
        make("1.0")


def test_surrogate_derivative_is_twice_differentiable():
    """The surrogate spike's backward is autograd of ψ': a double backward (engine='reference')
    gets ψ'' exactly."""
    x = torch.tensor([-1.3, -0.4, 0.2, 0.7], dtype=torch.float64, requires_grad=True)
    for surrogate in (Triangle(1.5), ATan(2.0)):
        assert torch.autograd.gradgradcheck(surrogate, (x,))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: LIF(tau=0.5), ValueError, "LIF tau must be a number of time steps >= 1"),
        (lambda: LIF(v_threshold=0.0), ValueError, "v_threshold must lie above the resting"),
        (lambda: LIF(v_threshold=-1.0, v_reset=None), ValueError, "resting potential 0"),
        (lambda: LIF(v_threshold=0.2, v_reset=0.5), ValueError, "resting potential 0.5"),
        (lambda: AdLIF(v_threshold=0.0), ValueError, "AdLIF v_threshold must lie above"),
        (lambda: LIF(tau="2"), TypeError, "LIF tau must be a number, got '2'"),
        (lambda: LIF(v_threshold="1"), TypeError, "LIF v_threshold must be a number"),
        (lambda: LIF(tau=True), TypeError, "LIF tau must be a number, got True"),
        (lambda: LIF(detach_reset="False"), TypeError, "detach_reset must be True or False"),
        (lambda: AdLIF(tau_u="5"), TypeError, "AdLIF tau_u must be a number"),
        (lambda: LeakyIntegrator(tau="2"), TypeError, "LeakyIntegrator tau must be a number"),
        (lambda: LeakyIntegrator(decay_input=1), TypeError, "decay_input must be True or False"),
    ],
)
def test_neuron_parameters_out_of_range_or_of_the_wrong_type_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_lif_accepts_the_edges_of_its_range():
    assert LIF(tau=1.0).p.tau == 1.0  # leak 0: no memory
    assert LIF(v_threshold=-0.2, v_reset=-0.5).p.v_rest == -0.5  # above a negative reset


@pytest.mark.parametrize(
    "module", [LIF(), AdLIF(), LeakyIntegrator()], ids=lambda m: type(m).__name__
)
def test_standalone_neurons_check_their_input_current(module):
    """As the recurrent layer does: a float sequence (T, B, N) or (T, N), T ≥ 1, finite."""
    with pytest.raises(TypeError, match="float tensor of input current, got torch.int64"):
        module(torch.ones(4, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"time-major input current .* got shape \(0, 2, 3\)"):
        module(torch.ones(0, 2, 3))
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        module(torch.ones(4))
    current = torch.rand(4, 2, 3)
    current[2, 1, 0] = math.nan
    with pytest.raises(ValueError, match="not finite: nan at step 2, batch item 1, neuron 0"):
        module(current)
    state = (torch.full((2, 3), math.inf),) * (2 if isinstance(module, AdLIF) else 1)
    with pytest.raises(ValueError, match="holds NaN or Inf"):
        module(torch.rand(4, 2, 3), state)
    assert module(torch.rand(4, 3)).shape == (4, 3)


class Squeezing(torch.nn.Module):
    """A user-written neuron with a bug: its spikes lose the batch dimension."""

    def initial_state(self, like):
        return (torch.zeros_like(like),)

    def step(self, u, state):
        return (u > 1).float().sum(0, keepdim=True), state


def test_a_neuron_returning_spikes_of_the_wrong_shape_is_named():
    match = r"Squeezing.step\(u, state\) returned spikes of shape \(1, 3\) .* \(2, 3\)"
    with pytest.raises(ValueError, match=match):
        run_steps(Squeezing(), torch.rand(4, 2, 3), (torch.zeros(2, 3),))
    with pytest.raises(ValueError, match=match):  # it broadcast silently in the layer
        DelRec(3, Squeezing())(torch.rand(4, 2, 3))


class OwnNeuron(torch.nn.Module):
    """A user-written neuron whose spikes have the dtype ``spike_dtype`` (None: the input's)
    and whose initial state is ``start`` (by default a tuple of one tensor)."""

    def __init__(self, spike_dtype=None, start="zeros"):
        super().__init__()
        self.spike_dtype, self.start = spike_dtype, start

    def initial_state(self, like):
        return (torch.zeros_like(like),) if self.start == "zeros" else self.start

    def step(self, u, state):
        v = state[0] + u
        return (v > 1).to(self.spike_dtype or u.dtype), (v * (v <= 1),)


def test_a_neuron_returning_spikes_or_a_state_of_the_wrong_kind_is_named():
    """Bool spikes came back from the layer and its own state was then refused as the user's
    mistake; float64 spikes in a float32 layer failed deep inside torch; a state of None failed
    with "'NoneType' object is not iterable"."""
    for dtype in (torch.bool, torch.float64):
        with pytest.raises(TypeError, match=f"OwnNeuron.step.* dtype {dtype} .* torch.float32"):
            DelRec(3, OwnNeuron(dtype))(torch.rand(4, 2, 3))
    with pytest.raises(TypeError, match=r"OwnNeuron.initial_state\(like\) returned NoneType"):
        DelRec(3, OwnNeuron(start=None))(torch.rand(4, 2, 3))
    assert DelRec(3, OwnNeuron())(torch.rand(4, 2, 3)).dtype == torch.float32


def test_a_parameter_set_on_a_neuron_is_refused_and_p_replaced_is_used():
    """``neuron.tau = 20`` would be a new attribute nothing reads; replacing ``p`` works."""
    import dataclasses

    for neuron, name in ((LIF(), "tau"), (AdLIF(), "tau_w")):
        with pytest.raises(AttributeError, match=rf"\.{name} cannot be set.*dataclasses.replace"):
            setattr(neuron, name, 20.0)
    x = torch.rand(20, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    expected = DelRec(8, LIF(tau=5.0), generator=torch.Generator().manual_seed(1)).double()
    edited = DelRec(8, LIF(tau=2.0), generator=torch.Generator().manual_seed(1)).double()
    edited.neuron.p = dataclasses.replace(edited.neuron.p, tau=5.0)
    assert expected(x).sum() > 0
    assert torch.equal(edited(x), expected(x))
