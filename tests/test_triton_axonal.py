"""The Triton axonal kernels against the reference loop: same spikes, same gradients."""

import pytest
import torch
from triton_helpers import (
    CUDA,
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
from delrec.engine.axonal import _AxonalPlan
from delrec.neurons import LIF, ATan, Surrogate, Triangle

pytestmark = needs_triton


class Sigmoid(Surrogate):
    """A surrogate the kernels don't know: its ψ' comes precomputed."""

    def derivative(self, x):
        s = torch.sigmoid(4.0 * x)
        return 4.0 * s * (1 - s)


def triton_run(neuron, mask):
    def run(current, weight, delay, width):
        return PATHS["triton-axonal"].run(current, weight, delay, width, neuron, mask)

    return run


# (neuron, max delay, σ, learned spreads, dropout, dtype): every reset, surrogate and option
CASES = [
    (LIF(tau=2.0), 6.0, 2.5, True, True, torch.float64),
    (LIF(tau=1.5, v_reset=None, surrogate=Triangle(0.5)), 4.0, 0.0, False, False, torch.float64),
    (
        LIF(tau=5.0, v_reset=-0.3, detach_reset=True, decay_input=True, surrogate=ATan(5.0)),
        10.0,
        1.0,
        False,
        True,
        torch.float64,
    ),
    (
        LIF(v_reset=None, detach_reset=True, surrogate=Sigmoid()),
        25.0,
        3.0,
        True,
        False,
        torch.float64,
    ),
    (LIF(tau=2.0, v_threshold=0.5, surrogate=Triangle(1.0)), 8.0, 4.0, True, True, torch.float32),
    (LIF(tau=1.5, v_reset=None, decay_input=True), 3.0, 0.0, False, False, torch.float32),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_axonal_kernels_match_reference(case):
    neuron, max_delay, sigma, learn_spread, dropout, dtype = CASES[case]
    neuron = neuron.to(DEVICE)
    # float32 on the GPU: smaller, since every membrane within rounding of θ would flip
    steps, batch, n = sizes((24, 3, 20), (70, 37, 150) if dtype == torch.float64 else (40, 20, 140))
    current, weight, delay, logits, mask, grad_out, sigma = random_problem(
        steps, batch, n, max_delay=max_delay, sigma=sigma, dtype=dtype, seed=case, dropout=dropout
    )
    if neuron.p.decay_input:  # the current enters divided by τ
        current = current * neuron.p.tau
    problem = (current, weight, delay, logits, sigma, learn_spread, grad_out)
    expected_spikes, expected = spikes_and_grads(reference_run(neuron, mask), *problem)
    spikes, grads = spikes_and_grads(triton_run(neuron, mask), *problem)
    assert 0 < expected_spikes.mean() < 1
    assert_same_spikes(spikes, expected_spikes)
    assert_grads_close(grads, expected, dtype)


@pytest.mark.parametrize(("delay", "sigma"), [(0.0, 1.0), (1.0, 0.0), (2.0, 2.0), (-0.5, 1.0)])
def test_gradients_at_kinks_follow_autograd_of_the_kernel(delay, sigma):
    """Integer centres and spreads put lags exactly on the triangle's kinks; a negative delay
    (before the optimizer's clamp) is read as the reference reads it."""
    n = 4
    current, weight, _, logits, _, grad_out, sigma = random_problem(
        20, 2, n, max_delay=0.0, sigma=sigma, dtype=torch.float64, seed=3, dropout=False
    )
    delays = torch.full((n,), delay, dtype=torch.float64, device=DEVICE)
    neuron = LIF(tau=2.0)
    problem = (current, weight, delays, torch.zeros_like(logits), sigma, True, grad_out)
    expected_spikes, expected = spikes_and_grads(reference_run(neuron, None), *problem)
    spikes, grads = spikes_and_grads(triton_run(neuron, None), *problem)
    assert expected_spikes.sum() > 0
    assert_same_spikes(spikes, expected_spikes)
    assert_grads_close(grads, expected, torch.float64)


def test_blocks_of_rows_and_neurons_are_crossed():
    """More rows and neurons than one block of either (two programs, two neuron blocks, two
    inner blocks of the product)."""
    neuron = LIF(tau=2.0, v_reset=None)
    steps, batch, n = sizes((12, 18, 40), (40, 70, 300))
    current, weight, delay, logits, mask, grad_out, sigma = random_problem(
        steps, batch, n, max_delay=5.0, sigma=1.5, dtype=torch.float64, seed=9, dropout=True
    )
    problem = (current, weight, delay, logits, sigma, True, grad_out)
    expected_spikes, expected = spikes_and_grads(reference_run(neuron, mask), *problem)
    spikes, grads = spikes_and_grads(triton_run(neuron, mask), *problem)
    assert_same_spikes(spikes, expected_spikes)
    assert_grads_close(grads, expected, torch.float64)


def test_wide_kernels_keep_exact_box_sums():
    """σ = 70 (w = 71): the box sums behind the delay and spread gradients are int16."""
    neuron = LIF(tau=2.0)
    steps = sizes(40, 160)
    current, weight, delay, logits, _, grad_out, sigma = random_problem(
        steps, 2, 5, max_delay=30.0, sigma=70.0, dtype=torch.float64, seed=12, dropout=False
    )
    assert _AxonalPlan(delay, torch.full_like(delay, 71.0), 1).count_dtype == torch.int16
    problem = (current * 1.5, weight, delay, logits, sigma, True, grad_out)
    expected_spikes, expected = spikes_and_grads(reference_run(neuron, None), *problem)
    spikes, grads = spikes_and_grads(triton_run(neuron, None), *problem)
    assert_same_spikes(spikes, expected_spikes)
    assert_grads_close(grads, expected, torch.float64)


def test_variable_lengths():
    """Padded sequences of several lengths (the loss reads each sample up to its length): the
    spikes of each sample up to its length, and every gradient, are those of the sample run
    alone at its length."""
    neuron = LIF(tau=2.0, surrogate=Triangle(1.0))
    steps, n = sizes(16, 60), sizes(6, 40)
    lengths = [steps, steps // 2, 3]
    current, weight, delay, logits, _, grad_out, sigma = random_problem(
        steps,
        len(lengths),
        n,
        max_delay=6.0,
        sigma=2.0,
        dtype=torch.float64,
        seed=5,
        dropout=False,
    )
    for b, length in enumerate(lengths):
        grad_out[length:, b] = 0.0
    run = triton_run(neuron, None)
    spikes, grads = spikes_and_grads(run, current, weight, delay, logits, sigma, True, grad_out)
    weight_grad = torch.zeros_like(weight)
    for b, length in enumerate(lengths):
        alone = (current[:length, b : b + 1], weight, delay, logits, sigma, True)
        expected_spikes, expected = spikes_and_grads(
            reference_run(neuron, None), *alone, grad_out[:length, b : b + 1]
        )
        assert_same_spikes(spikes[:length, b : b + 1], expected_spikes)
        assert_grads_close([grads[0][:length, b : b + 1]], expected[:1], torch.float64)
        assert not grads[0][length:, b].any()
        weight_grad += expected[1]
    assert_grads_close([grads[1]], [weight_grad], torch.float64, names=["weight"])


@pytest.mark.skipif(not CUDA, reason="N = 1024 runs compiled on a GPU (too slow interpreted)")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_thousand_neurons_forward_and_backward(dtype):
    """N = 1024 (many neuron blocks and inner blocks) against the PyTorch-op loops: in float64
    the same spikes and gradients; in float32 the same spikes but for threshold ties (each
    flips a sample's future), finite gradients."""
    neuron = LIF(tau=2.0, detach_reset=True, surrogate=ATan(5.0))
    current, weight, delay, logits, mask, grad_out, sigma = random_problem(
        30, 20, 1024, max_delay=30.0, sigma=10.0, dtype=dtype, seed=21, dropout=True
    )

    def torch_run(current, weight, delay, width):
        return PATHS["torch-axonal"].run(current, weight, delay, width, neuron, mask)

    problem = (current, weight, delay, logits, sigma, True, grad_out)
    expected_spikes, expected = spikes_and_grads(torch_run, *problem)
    spikes, grads = spikes_and_grads(triton_run(neuron, mask), *problem)
    assert 0 < expected_spikes.mean() < 1
    if dtype == torch.float64:
        assert_same_spikes(spikes, expected_spikes)
        assert_grads_close(grads, expected, dtype)
    else:
        assert (spikes != expected_spikes).float().mean() < 1e-3
        assert all(g.isfinite().all() for g in grads)


def test_axonal_kernels_run_in_chunks_like_the_reference():
    """From a given state (membranes and spike history), chunk by chunk: the spikes and the
    truncated-BPTT gradients of the reference path."""
    from delrec.engine import RecurrentState
    from delrec.engine.state import history_length

    neuron = LIF(tau=2.0, v_reset=None).to(DEVICE)
    steps, batch, n = sizes((16, 2, 12), (60, 17, 130))
    current, weight, delay, logits, mask, grad_out, sigma = random_problem(
        steps, batch, n, max_delay=6.0, sigma=2.0, dtype=torch.float64, seed=5, dropout=True
    )
    width = 1.0 + sigma
    g = torch.Generator().manual_seed(5)
    v0 = torch.randn(batch, n, generator=g, dtype=torch.float64).to(DEVICE)
    past = (torch.rand(history_length(delay, width), batch, n, generator=g) < 0.3).double()
    results = {}
    for name in ("reference", "triton-axonal"):
        inputs = [x.detach().clone().requires_grad_() for x in (current, weight, delay, v0)]
        x, w, d, v = inputs
        state, pieces = RecurrentState((v,), past.to(DEVICE)), []
        for start, end in ((0, 5), (5, 6), (6, steps)):
            spikes, state = PATHS[name].run(x[start:end], w, d, width, neuron, mask, state=state)
            pieces.append(spikes)
        spikes = torch.cat(pieces)
        grads = torch.autograd.grad((spikes * grad_out).sum(), inputs)
        results[name] = spikes, grads
    (expected_spikes, expected), (spikes, grads) = results["reference"], results["triton-axonal"]
    assert 0 < expected_spikes.mean() < 1
    assert_same_spikes(spikes, expected_spikes)
    for actual, want in zip(grads, expected):
        torch.testing.assert_close(actual, want, rtol=1e-6, atol=1e-9)
