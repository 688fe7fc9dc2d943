"""The Triton inference ring against the reference loop."""

import pytest
import torch
from triton_helpers import (
    DEVICE,
    assert_same_spikes,
    needs_triton,
    random_problem,
    sizes,
)

from delrec.delays import triangle_kernel
from delrec.engine import PATHS, reference_recurrence
from delrec.neurons import LIF

pytestmark = needs_triton


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
