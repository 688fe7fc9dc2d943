"""The Triton inference ring and the feedforward kernels against the reference loops."""

import pytest
import torch
from triton_helpers import (
    DEVICE,
    assert_grads_close,
    assert_same_spikes,
    needs_triton,
    random_problem,
    sizes,
)

from delrec.delays import triangle_kernel
from delrec.engine import PATHS, reference_recurrence
from delrec.engine.lif import LIFMap
from delrec.neurons import LIF, ATan, LeakyIntegrator, Surrogate, Triangle

pytestmark = needs_triton


class Sigmoid(Surrogate):
    """A surrogate the kernels don't know: its ψ' comes precomputed."""

    def derivative(self, x):
        s = torch.sigmoid(4.0 * x)
        return 4.0 * s * (1 - s)


@pytest.mark.parametrize(
    ("delay_type", "neuron", "dropout", "dtype"),
    [
        ("axonal", LIF(tau=2.0), True, torch.float64),
        ("shared", LIF(tau=1.5, v_reset=None), False, torch.float64),
        ("synaptic", LIF(tau=2.0, v_reset=-0.3, decay_input=True), True, torch.float64),
        ("axonal", LIF(tau=2.0, v_reset=None), False, torch.float32),
        ("synaptic", LIF(tau=1.5), False, torch.float32),
    ],
)
def test_integer_delay_ring_matches_reference(delay_type, neuron, dropout, dtype):
    """Eval mode: delays rounded (half to even), σ = 0; every spike lands 1 + d steps later."""
    steps, batch, n = sizes((30, 3, 20), (80, 37, 150))
    current, weight, _, _, mask, _, _ = random_problem(
        steps, batch, n, max_delay=0.0, sigma=0.0, dtype=dtype, seed=7, dropout=dropout
    )
    if neuron.p.decay_input:
        current = current * neuron.p.tau
    shape = {"axonal": (n,), "shared": (1,), "synaptic": (n, n)}[delay_type]
    delay = torch.rand(shape, generator=torch.Generator().manual_seed(8), dtype=dtype) * 12
    delay.view(-1)[0] = 2.5  # rounds to 2
    delay = delay.round().to(DEVICE).expand(n if delay_type == "shared" else shape)
    kernel = triangle_kernel(delay, 1.0, int(delay.max()) + 2)
    expected = reference_recurrence(current, weight, kernel, neuron, mask)
    spikes = PATHS["triton-ring"].run(current, weight, delay, 1.0, neuron, mask)
    assert 0 < expected.mean() < 1
    assert_same_spikes(spikes, expected)


FEEDFORWARD = [
    (LIF(tau=2.0), torch.float64),
    (LIF(tau=1.5, v_reset=None, detach_reset=True, surrogate=Triangle(0.5)), torch.float64),
    (LIF(tau=5.0, v_reset=-0.3, decay_input=True, surrogate=ATan(5.0)), torch.float64),
    (LIF(v_reset=None, surrogate=Sigmoid()), torch.float64),
    (LIF(tau=2.0, detach_reset=True, surrogate=Triangle(1.0)), torch.float32),
]


@pytest.mark.parametrize("case", range(len(FEEDFORWARD)))
def test_feedforward_lif_matches_the_step_loop(case):
    """A LIF layer without recurrence: spikes and the input gradient of the neuron's own
    autograd step loop."""
    from delrec.engine.triton import feedforward

    neuron, dtype = FEEDFORWARD[case]
    steps, batch, n = sizes((25, 3, 30), (90, 33, 300))
    g = torch.Generator().manual_seed(case)
    current = torch.randn(steps, batch, n, generator=g, dtype=torch.float64) * 0.8 + 0.45
    current = (current * (neuron.p.tau if neuron.p.decay_input else 1.0)).to(DEVICE, dtype)
    grad_out = torch.randn(steps, batch, n, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    x = current.clone().requires_grad_()
    expected = neuron(x)
    (expected_grad,) = torch.autograd.grad((expected * grad_out).sum(), x)
    y = current.clone().requires_grad_()
    spikes = feedforward.lif_sequence(y, LIFMap.of(neuron.p))
    (grad,) = torch.autograd.grad((spikes * grad_out).sum(), y)
    assert 0 < expected.mean() < 1
    assert_same_spikes(spikes, expected.detach())
    assert_grads_close([grad], [expected_grad], dtype, names=["current"])


@pytest.mark.parametrize("decay_input", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_leaky_integrator_matches_the_step_loop(decay_input, dtype):
    from delrec.engine.triton import feedforward

    tau = 3.0
    readout = LeakyIntegrator(tau, decay_input=decay_input)
    steps, batch, k = sizes((20, 3, 7), (100, 64, 35))
    g = torch.Generator().manual_seed(1)
    current = torch.randn(steps, batch, k, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    grad_out = torch.randn(steps, batch, k, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    x = current.clone().requires_grad_()
    expected = readout(x)
    (expected_grad,) = torch.autograd.grad((expected * grad_out).sum(), x)
    y = current.clone().requires_grad_()
    membrane = feedforward.leaky_sequence(y, 1 - 1 / tau, 1 / tau if decay_input else 1.0)
    (grad,) = torch.autograd.grad((membrane * grad_out).sum(), y)
    assert_grads_close([membrane.detach(), grad], [expected.detach(), expected_grad], dtype)
