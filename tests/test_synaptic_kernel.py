"""Synaptic delays by shifted reads of class rings (delrec.engine.synaptic): the plan behind
them, and what the engine paths of ``test_engine_paths.py`` do not see (delays long enough for
every kind of level, a delay at the clamp, 3000 float32 steps forward and 400 backward, the
fallback)."""

import pytest
import torch
from engine_harness import (
    Config,
    Expected,
    assert_exercised,
    compare,
    draw_case,
    native_kernels,
    paths,
    reference,
    threads,
)

from delrec.delays import kernel_length, triangle_kernel
from delrec.engine import PATHS, native, select
from delrec.engine.lif import width_vector
from delrec.engine.synaptic import _SlotPlan, cpp_recurrence
from delrec.neurons import LIF, ATan


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The C++ kernels compile here; a build error fails every test with the compiler's message."""
    return native.build("synaptic")


def check_synaptic_paths(case, thread_count=1):
    """Every synaptic path against the reference on ``case`` (harness tolerances), on
    ``thread_count`` threads; the draw must exercise the engine."""
    config = Config("synaptic", dtype=case.current.dtype)
    expected = Expected(case.bind(reference), case.inputs(), case.grad_out, case.threshold)
    assert_exercised(expected, ("current", "weight", "delay"))
    with threads(thread_count):
        for path in paths(config, case.neuron):
            compare(case.bind(path.run), expected)


@pytest.mark.parametrize(
    "dtype, sigma, learn_spread, thread_count",
    [
        (torch.float64, 2.5, False, 1),  # w = 3.5: four classes (one at w + 1)
        (torch.float64, 2.7, True, 2),  # a width per neuron, four classes each
        (torch.float64, 3.0, False, 2),  # w = 4: two classes
        (torch.float32, 2.7, False, 1),
    ],
)
def test_long_delays_below_and_above_the_half_width_in_one_layer(
    dtype, sigma, learn_spread, thread_count
):
    """Delays up to 36 steps with w ≈ 4: synapses below the half-width (chain levels), just
    above it (near levels, read every step) and far above it (read in blocks of steps), integer
    centres (classes of their own), a sequence long enough for every class ring to wrap, and a
    batch of 19 (three float64 vector blocks)."""
    case = draw_case(
        delay_type="synaptic",
        size=40,
        batch=19,
        steps=90,
        max_delay=36.0,
        sigma=sigma,
        learn_spread=learn_spread,
        neuron=LIF(tau=2.0, v_reset=None, surrogate=ATan(2.0)),
        seed=11,
        dtype=dtype,
    )
    kernels = native.build("synaptic")
    width = width_vector(case.width, case.delay, 40)
    plan = _SlotPlan(case.delay, width, kernels)
    m_a, m_b, m_top = plan.levels.unbind(1)
    assert (m_a < 0).any() and (m_top - m_b >= kernels.span).any()
    assert plan.depth < 90 / 2  # the rings wrap at least twice
    check_synaptic_paths(case, thread_count)


def test_far_and_near_synapses_spanning_every_blocking_of_the_sums():
    """150 neurons, 40 float64 samples (lane groups of 4 and 1 vector blocks), 26 steps (a last
    block of 2 steps): most synapses near (delays < 1, many members per slot: two blocks of rows
    in the backward's per-step sums), the others far (delays 12 … 20: block sums, several column
    blocks in the forward, mixed tiles and stage histories in the gradient sweep)."""
    case = draw_case(
        delay_type="synaptic",
        size=150,
        batch=40,
        steps=26,
        max_delay=1.0,
        sigma=1.0,
        learn_spread=False,
        neuron=LIF(tau=2.0),
        dropout=0.2,
        integer_share=0.0,
        weight_scale=1.95,
        seed=5,
    )
    far = torch.rand(150, 150, generator=torch.Generator().manual_seed(6)) < 0.3
    case.delay[far] = 12.0 + 8.0 * case.delay[far]
    check_synaptic_paths(case)


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


def test_long_float32_sequences_keep_the_gradients_accurate():
    """400 float32 steps at σ = 0 (w = 1): the gradients agree with the reference as the
    PyTorch-op path's do (about 1e-4). The backward sums its entry injections in float64: summed
    in float32, the slope increments (1, -2, 1) of an entry row stopped cancelling in the adjoint
    recursion and the gradients were about 0.1 off at this length (the error grows as T²)."""
    case = draw_case(
        delay_type="synaptic",
        size=48,
        batch=8,
        steps=400,
        max_delay=10.0,
        sigma=0.0,
        learn_spread=False,
        neuron=LIF(tau=2.0, v_reset=None, surrogate=ATan(2.0)),
        seed=5,
        dtype=torch.float32,
    )
    check_synaptic_paths(case)


def test_without_the_kernels_the_selector_picks_the_lag_gemm_and_the_slots_refuse_to_run():
    with native_kernels(False):
        current = torch.rand(5, 2, 3)
        assert not PATHS["cpp-synaptic"].available("cpu")
        path = select("synaptic", LIF(), device="cpu", integer=False, grad=True)
        assert path.name == "torch-synaptic"
        with pytest.raises(RuntimeError, match="DELREC_NATIVE=0"):
            cpp_recurrence(current, torch.eye(3), torch.ones(3, 3), 2.0, LIF())


def test_every_delay_above_the_half_width():
    """Delays 30 … 40 with w = 1.5: every level is above 0 (the rings' lowest level is positive),
    so the first steps read diagonals before the sequence's start."""
    case = draw_case(
        delay_type="synaptic",
        size=8,
        batch=3,
        steps=70,
        max_delay=10.0,
        sigma=0.5,
        learn_spread=False,
        neuron=LIF(tau=2.0),
        integer_share=0.0,
        weight_scale=4.5,
        seed=3,
    )
    case.delay += 30.0
    plan = _SlotPlan(case.delay, width_vector(case.width, case.delay, 8), native.build("synaptic"))
    assert plan.lowest > 0
    check_synaptic_paths(case)
