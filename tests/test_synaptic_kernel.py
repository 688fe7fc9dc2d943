"""Synaptic delays by shifted reads of class rings (delrec.engine.synaptic) against the
reference loop, and the plan behind them."""

import math
import os
from unittest import mock

import pytest
import torch
from engine_helpers import NEURONS, assert_close_relative
from hypothesis import given, settings
from hypothesis import strategies as st

from delrec.delays import kernel_length, spread_width, triangle_kernel
from delrec.engine import PATHS, native, reference_recurrence, select
from delrec.engine.lif import width_vector
from delrec.engine.synaptic import _SlotPlan, cpp_recurrence
from delrec.neurons import LIF, ATan, Triangle


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The C++ kernels compile here; a build error fails every test with the compiler's message."""
    return native.build("synaptic")


def spikes_and_grads(run, current, weight, delay, logits, sigma, mask, grad_out):
    """Spikes of ``run(current, weight, delay, width, mask)`` and the gradients of
    ``Σ spikes·grad_out`` w.r.t. current, weight, delay and (if given) the spread logits."""
    inputs = [x.clone().requires_grad_() for x in (current, weight, delay)]
    if logits is not None:
        inputs.append(logits.clone().requires_grad_())
    width = spread_width(sigma, inputs[3] if logits is not None else None)
    spikes = run(*inputs[:3], width, mask)
    grads = torch.autograd.grad((spikes * grad_out).sum(), inputs, allow_unused=True)
    return spikes.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def reference(neuron):
    def run(current, weight, delay, width, mask):
        n = weight.shape[0]
        max_width = float(torch.as_tensor(width).detach().max())
        width = width.expand(n, n) if torch.is_tensor(width) else width  # per presynaptic neuron
        length = kernel_length(float(delay.detach().max()), max_width)
        kernel = triangle_kernel(delay, width, length)
        return reference_recurrence(current, weight, kernel, neuron, mask)

    return run


def slots(neuron):
    def run(current, weight, delay, width, mask):
        return cpp_recurrence(current, weight, delay, width, neuron, mask)

    return run


def assert_matches_reference(neuron, current, weight, delay, logits, sigma, mask, grad_out):
    args = (current, weight, delay, logits, sigma, mask, grad_out)
    expected_spikes, expected_grads = spikes_and_grads(reference(neuron), *args)
    spikes, grads = spikes_and_grads(slots(neuron), *args)
    assert torch.equal(spikes, expected_spikes)
    for name, actual, expected in zip(
        ["current", "weight", "delay", "spread"], grads, expected_grads
    ):
        assert actual.shape == expected.shape, name
        assert_close_relative(actual, expected)
    return expected_spikes


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    steps=st.integers(1, 14),
    batch=st.integers(1, 3),
    size=st.integers(1, 6),
    max_delay=st.sampled_from([0.0, 1.0, 4.0, 25.0]),  # 25 > T: kernels longer than the sequence
    integer_share=st.sampled_from([0.0, 0.5, 1.0]),
    sigma=st.sampled_from([0.0, 0.5, 1.0, 2.7, 10.0, 40.0]),
    spread=st.sampled_from(["shared", "learnable", "learnable-integer"]),
    neuron=NEURONS,
    dropout=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_slot_traces_match_the_reference(
    steps, batch, size, max_delay, integer_share, sigma, spread, neuron, dropout, seed
):
    """Same spikes and gradients as the reference, for every neuron option, delays with zeros
    and integers, widths shared or per neuron ("learnable-integer": logits 0, so w = 1 + σ is
    an integer or half-integer for most σ and centres land on kinks)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(size, size, generator=g, dtype=torch.float64) * 1.5 / math.sqrt(size)
    delay = torch.rand(size, size, generator=g, dtype=torch.float64) * max_delay
    integer = torch.rand(size, size, generator=g) < integer_share
    delay[integer] = delay[integer].round()
    delay[0, 0] = 0.0
    logits = {
        "shared": None,
        "learnable-integer": torch.zeros(size, dtype=torch.float64),
        "learnable": torch.randn(size, generator=g, dtype=torch.float64),
    }[spread]
    current = torch.randn(steps, batch, size, generator=g, dtype=torch.float64) * 0.8 + 0.4
    mask = (
        torch.bernoulli(torch.full((batch, size), 0.7, dtype=torch.float64), generator=g) / 0.7
        if dropout
        else None
    )
    grad_out = torch.randn(steps, batch, size, generator=g, dtype=torch.float64)
    assert_matches_reference(neuron, current, weight, delay, logits, sigma, mask, grad_out)


@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("delay", [0.0, 0.5, 1.0, 2.0, 5.0, -0.5])
@pytest.mark.parametrize("learn_spread", [False, True])
def test_gradients_at_kinks_follow_autograd_of_the_kernel(sigma, delay, learn_spread):
    """Integer (or half-integer) centres and widths put c, c - w and c + w exactly on integer
    lags, the kinks of the triangle; every synapse of a layer sits there, alone or beside
    synapses in the neighbouring intervals (delay ± 0.25)."""
    size = 4
    g = torch.Generator().manual_seed(4)
    delays = torch.full((size, size), delay, dtype=torch.float64)
    delays[1, :2] += 0.25
    delays[2, 2:] -= 0.25
    weight = torch.randn(size, size, generator=g, dtype=torch.float64) / math.sqrt(size)
    logits = torch.zeros(size, dtype=torch.float64) if learn_spread else None
    current = torch.rand(20, 2, size, generator=g, dtype=torch.float64) * 1.6
    grad_out = torch.randn(20, 2, size, generator=g, dtype=torch.float64)
    spikes = assert_matches_reference(
        LIF(tau=2.0), current, weight, delays, logits, sigma, None, grad_out
    )
    assert spikes.sum() > 0


@pytest.mark.parametrize("threads", [1, 2])
def test_a_larger_layer_spanning_several_vector_blocks(threads):
    """Batch rows of several vector blocks (19 float64 samples: 3 blocks of 8, the last one
    padded), many slots per neuron, odd member counts; one thread and two."""
    size, steps, batch = 23, 40, 19
    g = torch.Generator().manual_seed(7)
    delay = torch.rand(size, size, generator=g, dtype=torch.float64) * 30.0
    delay[:, ::3] = delay[:, ::3].round()
    weight = torch.randn(size, size, generator=g, dtype=torch.float64) * 1.5 / math.sqrt(size)
    logits = torch.randn(size, generator=g, dtype=torch.float64)
    current = torch.randn(steps, batch, size, generator=g, dtype=torch.float64) * 0.8 + 0.4
    mask = torch.bernoulli(torch.full((batch, size), 0.8, dtype=torch.float64), generator=g) / 0.8
    grad_out = torch.randn(steps, batch, size, generator=g, dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_matches_reference(
            LIF(tau=2.0, v_reset=None, surrogate=Triangle(1.0)),
            current,
            weight,
            delay,
            logits,
            3.3,
            mask,
            grad_out,
        )
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_wide_batch_and_many_neurons_spanning_every_blocking_of_the_sums(threads):
    """70 float64 samples (9 vector blocks: lane groups of 4, 4 and 1), 130 neurons and 30 steps:
    more than one block of rows in the backward's member sums, several column blocks in the
    forward's, and a gradient sweep in several chunks of time and groups of neurons."""
    size, steps, batch = 130, 30, 70
    g = torch.Generator().manual_seed(3)
    delay = torch.rand(size, size, generator=g, dtype=torch.float64) * 8.0
    delay[::4] = delay[::4].round()
    weight = torch.randn(size, size, generator=g, dtype=torch.float64) * 2.0 / math.sqrt(size)
    current = torch.randn(steps, batch, size, generator=g, dtype=torch.float64) * 0.8 + 0.5
    grad_out = torch.randn(steps, batch, size, generator=g, dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        spikes = assert_matches_reference(
            LIF(tau=2.0), current, weight, delay, None, 1.5, None, grad_out
        )
    finally:
        torch.set_num_threads(previous)
    assert 0.05 < spikes.mean() < 0.95  # the recurrent sums decide spikes


def random_layer(size, steps, batch, delays, dtype, seed):
    """Weights, current and a random loss of a layer whose delays are ``delays`` ``(N, N)``."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(size, size, generator=g, dtype=dtype) * 1.5 / math.sqrt(size)
    current = torch.randn(steps, batch, size, generator=g, dtype=dtype) * 0.8 + 0.4
    grad_out = torch.randn(steps, batch, size, generator=g, dtype=dtype)
    return weight, current, grad_out


@pytest.mark.parametrize(
    "dtype, sigma, learn_spread, threads",
    [
        (torch.float64, 2.5, False, 1),  # w = 3.5: four classes (one at w + 1)
        (torch.float64, 2.7, True, 2),  # a width per neuron, four classes each
        (torch.float64, 3.0, False, 2),  # w = 4: two classes
        (torch.float32, 2.7, False, 1),
    ],
)
def test_long_delays_below_and_above_the_half_width_in_one_layer(
    dtype, sigma, learn_spread, threads
):
    """Delays up to 36 steps with w ≈ 4: synapses below the half-width (chain levels), just
    above it (near levels, read every step) and far above it (read in blocks of steps), integer
    centres (classes of their own), a sequence long enough for every class ring to wrap, and a
    batch of 19 (three float64 vector blocks). Spikes identical to the reference, gradients
    within 1e-6 (float64) or 1e-4 (float32) of the largest."""
    size, steps, batch = 40, 90, 19
    g = torch.Generator().manual_seed(11)
    delay = (torch.rand(size, size, generator=g, dtype=torch.float64) * 36.0).to(dtype)
    integer = torch.rand(size, size, generator=g) < 0.3
    delay[integer] = delay[integer].round()
    weight, current, grad_out = random_layer(size, steps, batch, delay, dtype, seed=12)
    logits = torch.randn(size, generator=g, dtype=dtype) if learn_spread else None
    width = width_vector(spread_width(sigma, logits), delay, size)
    plan = _SlotPlan(delay, width, native.build("synaptic"))
    m_a, m_b, m_top = plan.levels.unbind(1)
    assert (m_a < 0).any() and (m_top - m_b >= native.build("synaptic").span).any()
    assert plan.depth < steps / 2  # the rings wrap at least twice
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = (current, weight, delay, logits, sigma, None, grad_out)
        neuron = LIF(tau=2.0, v_reset=None, surrogate=ATan(2.0))
        expected_spikes, expected_grads = spikes_and_grads(reference(neuron), *args)
        spikes, grads = spikes_and_grads(slots(neuron), *args)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(spikes, expected_spikes) and 0.05 < spikes.mean() < 0.95
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    for actual, expected in zip(grads, expected_grads):
        assert_close_relative(actual, expected, rtol=rtol)


def test_far_and_near_synapses_spanning_every_blocking_of_the_sums():
    """150 neurons, 40 float64 samples (lane groups of 4 and 1 vector blocks), 26 steps (a last
    block of 2 steps): most synapses near (delays < 1, many members per slot: two blocks of rows
    in the backward's per-step sums), the others far (delays 12 … 20: block sums, several column
    blocks in the forward, mixed tiles and stage histories in the gradient sweep)."""
    size, steps, batch = 150, 26, 40
    g = torch.Generator().manual_seed(5)
    delay = torch.rand(size, size, generator=g, dtype=torch.float64)
    far = torch.rand(size, size, generator=g) < 0.3
    delay[far] = 12.0 + 8.0 * delay[far]
    weight, current, grad_out = random_layer(size, steps, batch, delay, torch.float64, seed=6)
    mask = torch.bernoulli(torch.full((batch, size), 0.8, dtype=torch.float64), generator=g) / 0.8
    spikes = assert_matches_reference(
        LIF(tau=2.0), current, weight * 1.3, delay, None, 1.0, mask, grad_out
    )
    assert 0.05 < spikes.mean() < 0.95


@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.7, 3.0])
def test_a_neuron_has_at_most_four_classes_whatever_the_delay_range(sigma):
    """The plan (docs/design.md#synaptic-delays-by-shifted-reads): each synapse's level is
    ⌈c - w⌉ - 1 and its class the pattern of c translated into (w, w + 1]; a neuron has at
    most 4 classes (2 when w is an integer) whether its delays span 5 steps or 500, and the
    rings hold the levels' range."""
    size = 64
    g = torch.Generator().manual_seed(0)
    kernels = native.build("synaptic")
    w = 1.0 + sigma
    counts = []
    for max_delay in (5.0, 500.0):
        delay = torch.rand(size, size, generator=g, dtype=torch.float64) * max_delay
        delay[:, ::5] = delay[:, ::5].round()  # integer centres too
        plan = _SlotPlan(delay, torch.full((size,), w, dtype=torch.float64), kernels)
        classes = plan.class_start.diff()
        assert classes.max() <= (2 if w == int(w) else 4)
        counts.append(int(classes.max()))
        centre = 1.0 + delay
        level = plan.slot_level[plan.slot_of.long()]
        assert torch.equal(level, (centre - w).ceil().long() - 1)
        m_a, _, m_top = plan.levels.unbind(1)
        assert plan.depth == int(m_top.max() - m_a.min()) + 1
    assert counts[0] == counts[1]  # the classes do not grow with the delay range


def test_a_delay_clamped_at_zero_can_grow():
    """d = 0, σ = 0: ∂κ(2)/∂d = +1/w² (docs/design.md#gradients-at-the-kinks), so a synapse at
    the clamp gets a gradient from the spikes two steps back."""
    weight = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # neuron 0 → neuron 1
    current = torch.zeros(6, 1, 2, dtype=torch.float64)
    current[1, 0, 0] = 1.0  # neuron 0 fires at t = 1
    delay = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    spikes = cpp_recurrence(current, weight, delay, 1.0, LIF(surrogate=ATan(2.0)))
    (grad,) = torch.autograd.grad(spikes[:, 0, 1].sum(), delay)
    assert spikes[:, 0, 1].nonzero().flatten().tolist() == [2]
    assert grad[1, 0] > 0 and grad.count_nonzero() == 1


def test_long_float32_sequences_keep_the_float64_trace_accuracy():
    """After 3000 steps with long, wide kernels the delayed input of a float32 layer still equals
    the float64 direct sum to ~1e-7: detectors driven by ``θ - z_exact ± 2e-6`` fire exactly
    where the margin is positive (float32 running sums would be ~1e-3 off)."""
    steps, batch, sources = 3000, 2, 5
    g = torch.Generator().manual_seed(0)
    delay = torch.zeros(2 * sources, 2 * sources)
    delay[sources:, :sources] = torch.diag(torch.tensor([0.0, 3.3, 47.5, 120.25, 149.9]))
    width = float(torch.tensor(30.7))  # σ = 29.7, as float32
    weight = torch.zeros(2 * sources, 2 * sources)
    weight[sources:, :sources] = torch.eye(sources)  # source j → detector j
    source_input = (torch.rand(steps, batch, sources, generator=g) < 0.3).double() * 2.0
    own = delay[sources:, :sources].diagonal().double()
    kernel = triangle_kernel(own, width, kernel_length(float(own.max()), width))
    z_exact = torch.zeros(steps, batch, sources, dtype=torch.float64)
    for k in range(1, kernel.shape[1]):
        z_exact[k:] += kernel[:, k] * (source_input[:-k] / 2.0)
    margin = 2e-6 * torch.where(torch.rand(steps, batch, sources, generator=g) < 0.5, 1.0, -1.0)
    current = torch.cat([source_input, 1.0 - z_exact + margin.double()], dim=-1).float()
    spikes = cpp_recurrence(current, weight.requires_grad_(), delay, width, LIF(tau=1.0))
    assert torch.equal(spikes[..., :sources], source_input.float() / 2.0)
    assert torch.equal(spikes[..., sources:], (margin > 0).float())


def test_without_the_kernels_the_selector_picks_the_lag_gemm_and_the_slots_refuse_to_run():
    with mock.patch.dict(os.environ, {"DELREC_NATIVE": "0"}):
        current = torch.rand(5, 2, 3)
        assert not PATHS["cpp-synaptic"].available("cpu")
        path = select("synaptic", LIF(), device="cpu", integer=False, grad=True)
        assert path.name == "torch-synaptic"
        with pytest.raises(RuntimeError, match="DELREC_NATIVE=0"):
            cpp_recurrence(current, torch.eye(3), torch.ones(3, 3), 2.0, LIF())


def test_every_delay_above_the_half_width():
    """Delays 30 … 40 with w = 1.5: every level is above 0 (the rings' lowest level is positive),
    so the first steps read diagonals before the sequence's start."""
    size, steps, batch = 8, 70, 3
    g = torch.Generator().manual_seed(3)
    delay = 30.0 + 10.0 * torch.rand(size, size, generator=g, dtype=torch.float64)
    width = width_vector(spread_width(0.5, None), delay, size)
    plan = _SlotPlan(delay, width, native.build("synaptic"))
    assert plan.lowest > 0
    weight, current, grad_out = random_layer(size, steps, batch, delay, torch.float64, seed=4)
    spikes = assert_matches_reference(
        LIF(tau=2.0), current, weight * 3.0, delay, None, 0.5, None, grad_out
    )
    assert 0.05 < spikes.mean() < 0.95
