"""The Triton synaptic kernels (lag-stacked) against the reference loop."""

import pytest
import torch
from triton_helpers import (
    DEVICE,
    assert_grads_close,
    assert_same_spikes,
    needs_triton,
    random_problem,
    reference_run,
    sizes,
    spikes_and_grads,
)

from delrec.engine import PATHS
from delrec.neurons import LIF, ATan, Triangle

pytestmark = needs_triton


@pytest.mark.parametrize(
    ("neuron", "sigma", "learn_spread", "dropout", "dtype"),
    [
        (LIF(tau=2.0), 1.5, True, True, torch.float64),
        (
            LIF(tau=1.5, v_reset=None, detach_reset=True, surrogate=ATan(5.0)),
            0.0,
            False,
            False,
            torch.float64,
        ),
        (LIF(v_reset=None, surrogate=Triangle(1.0)), 2.0, False, True, torch.float32),
    ],
)
def test_synaptic_kernels_match_reference(neuron, sigma, learn_spread, dropout, dtype):
    steps, batch, n = sizes((14, 3, 10), (60, 20, 70))
    current, weight, _, logits, mask, grad_out, sigma = random_problem(
        steps, batch, n, max_delay=0.0, sigma=sigma, dtype=dtype, seed=4, dropout=dropout
    )
    delay = torch.rand(n, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 5
    delay[0, :3] = torch.tensor([0.0, 1.0, 3.0])  # integer centres: kinks
    delay = delay.to(DEVICE, dtype)

    def run(current, weight, delay, width):
        return PATHS["triton-synaptic"].run(current, weight, delay, width, neuron, mask)

    problem = (current, weight, delay, logits, sigma, learn_spread, grad_out)
    expected_spikes, expected = spikes_and_grads(reference_run(neuron, mask), *problem)
    spikes, grads = spikes_and_grads(run, *problem)
    assert 0 < expected_spikes.mean() < 1
    assert_same_spikes(spikes, expected_spikes)
    assert_grads_close(grads, expected, dtype)
