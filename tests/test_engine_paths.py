"""Every engine path against the reference loop (tests/engine_harness.py): at training sizes in
float64 and float32 on one and two threads, on random draws that exercise the engine, at the
kinks of the kernel and at the edges (one step, one neuron, kernels longer than the sequence).
"""

import math

import pytest
import torch
from engine_harness import (
    GRAD_TOLERANCE,
    NEURONS,
    TIE_WIDTH,
    Case,
    Config,
    Expected,
    assert_exercised,
    assert_grad_close,
    compare,
    draw_case,
    interpreted_paths,
    paths,
    reference,
    threads,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from delrec.engine import DELAY_TYPES, PATHS
from delrec.engine import triton as gpu
from delrec.neurons import LIF, ATan

F64, F32 = torch.float64, torch.float32
INTERPRETER = pytest.mark.skipif(
    not (gpu.installed() and gpu.interpreting()),
    reason="the GPU paths run under Triton's interpreter only with the optional package "
    "'triton' and no GPU (with a GPU they run compiled: test_every_path_on_cuda_*)",
)


def check_every_path(
    config: Config, case: Case, nonzero=(), thread_counts=(None,), interpreted=False
) -> dict:
    """Every path of ``config`` (with ``interpreted``, only the GPU paths run by Triton's
    interpreter) against the reference on ``case`` (computed once); the draw must exercise the
    engine (``nonzero``: gradients that must not vanish). Returns the agreement of each
    (path, threads)."""
    grad = not config.integer
    expected = Expected(case.bind(reference), case.inputs(grad), case.grad_out, case.threshold)
    assert_exercised(expected, nonzero if grad else ())
    found = (interpreted_paths if interpreted else paths)(config, case.neuron)
    assert found, f"no engine path runs {config}"
    agreement = {}
    for path in found:
        for count in thread_counts:
            key = path.name if count is None else (path.name, count)
            try:
                with threads(count or torch.get_num_threads()):
                    agreement[key] = compare(case.bind(path.run), expected)
            except AssertionError as error:
                on = "" if count is None else f" on {count} thread(s)"
                raise AssertionError(f"engine path {path.name}{on}: {error}") from error
    return agreement


# --------------------------------------------------------------------------- training sizes
# Sizes that cross every blocking of the C++ kernels (csrc/*.cpp; lanes = one 64-byte cache line):
# N = 264: 16.5 blocks of 16 neurons (axonal transpositions); 128 + 128 + 8 rows in the synaptic
#   backward's member sums; many column blocks of 64 slots in the synaptic forward's gathers.
# B = 36 (synaptic float64: rows padded to 40 lanes, lane groups of 4 blocks and 1) and B = 70
#   (synaptic float32: 80 lanes, 4 blocks and 1; axonal: the backward's row sums in one chunk of
#   64 and a tail of 6): every sum over whole and partial lane groups.
# T = 100: the synaptic gradient sweep in 9 chunks of 12 steps, neurons in groups of 62.
# Two threads: every parallel loop in two or three chunks (grain 8192 elements).
TRAINING = {
    # name: (delay type, dtype, sigma, learned spreads, soft reset, dropout)
    "axonal-f64-spread-hard-dropout": ("axonal", F64, 5.0, True, False, 0.2),
    "axonal-f64-sigma0-soft": ("axonal", F64, 0.0, False, True, 0.0),
    "axonal-f32-spread-soft": ("axonal", F32, 5.0, True, True, 0.0),
    "axonal-f32-sigma0-hard-dropout": ("axonal", F32, 0.0, False, False, 0.2),
    "shared-f64-spread-hard-dropout": ("shared", F64, 5.0, True, False, 0.2),
    "shared-f32-sigma0-soft": ("shared", F32, 0.0, False, True, 0.0),
    "synaptic-f64-spread-soft-dropout": ("synaptic", F64, 5.0, True, True, 0.2),
    "synaptic-f64-sigma0-hard": ("synaptic", F64, 0.0, False, False, 0.0),
    "synaptic-f32-spread-hard": ("synaptic", F32, 5.0, True, False, 0.0),
    "synaptic-f32-sigma0-soft-dropout": ("synaptic", F32, 0.0, False, True, 0.2),
}


def training_case(
    delay_type, dtype, sigma, learn_spread, soft, dropout, integer=False, device="cpu"
):
    return draw_case(
        delay_type=delay_type,
        size=264,
        batch=36 if (delay_type, dtype) == ("synaptic", F64) else 70,
        steps=100,
        max_delay=10.0,
        sigma=sigma,
        learn_spread=learn_spread,
        neuron=LIF(tau=2.0, v_reset=None if soft else 0.0, surrogate=ATan(2.0)),
        dropout=dropout,
        integer=integer,
        seed=len(delay_type) + int(sigma) + 2 * soft,
        dtype=dtype,
        device=device,
    )


@pytest.mark.parametrize("name", list(TRAINING))
def test_every_path_at_training_size_on_one_and_two_threads(name):
    delay_type, dtype, sigma, learn_spread, soft, dropout = TRAINING[name]
    case = training_case(delay_type, dtype, sigma, learn_spread, soft, dropout)
    nonzero = ("current", "weight", "delay") + (("width",) if learn_spread else ())
    check_every_path(Config(delay_type, dtype=dtype), case, nonzero, thread_counts=(1, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(TRAINING))
def test_every_path_on_cuda_at_training_size(name):
    """The paths available on a GPU (the PyTorch-op loops, later GPU kernels) against the
    reference on the same GPU."""
    delay_type, dtype, sigma, learn_spread, soft, dropout = TRAINING[name]
    case = training_case(delay_type, dtype, sigma, learn_spread, soft, dropout, device="cuda")
    nonzero = ("current", "weight", "delay") + (("width",) if learn_spread else ())
    check_every_path(Config(delay_type, dtype=dtype, device="cuda"), case, nonzero)


@pytest.mark.parametrize("delay_type", ["axonal", "synaptic"])
def test_integer_delay_inference_at_training_size_in_float32(delay_type):
    case = training_case(delay_type, F32, 0.0, False, False, 0.2, integer=True)
    check_every_path(Config(delay_type, integer=True, dtype=F32), case, thread_counts=(1, 2))


# --------------------------------------------------------------------------- random draws
@st.composite
def engine_cases(draw, max_size=20, extra_steps=30):
    """A configuration and a case that exercises it: currents around the level at which the
    neuron fires within a few steps, and a sequence that outlasts the longest lag by 12 to 30
    steps."""
    config = Config(
        draw(st.sampled_from(DELAY_TYPES)),
        integer=draw(st.sampled_from([False, False, False, True])),
        dtype=draw(st.sampled_from([F64, F64, F64, F32])),
    )
    sigma = 0.0 if config.integer else draw(st.sampled_from([0.0, 0.5, 1.0, 2.7, 6.0]))
    learn_spread = sigma > 0 and draw(st.booleans())
    max_delay = draw(st.sampled_from([0.0, 1.0, 4.0, 12.0]))
    longest = math.ceil(1.0 + max_delay + 1.0 + (2.0 if learn_spread else 1.0) * sigma)
    neuron = draw(NEURONS)
    p = neuron.p
    rest = 0.0 if p.soft_reset else p.v_reset
    firing = (p.v_threshold - rest) / (1.0 if p.decay_input else p.tau)  # h tends to θ
    level = draw(st.sampled_from([1.2, 1.5, 2.0])) * firing
    case = draw_case(
        delay_type=config.delay_type,
        size=draw(st.integers(2, max_size)),  # 20: beyond one block of 16 neurons
        batch=draw(st.integers(2, 4)),
        steps=draw(st.integers(longest + 12, longest + extra_steps)),
        max_delay=max_delay,
        sigma=sigma,
        learn_spread=learn_spread,
        neuron=neuron,
        dropout=draw(st.sampled_from([0.0, 0.3])),
        integer_share=draw(st.sampled_from([0.0, 0.5, 1.0])),
        drive=(level, level),
        integer=config.integer,
        seed=draw(st.integers(0, 2**16)),
        dtype=config.dtype,
    )
    if case.mask is not None:
        case.mask[0] = 1.0 / 0.7  # one sample keeps all its recurrent input
    return config, case


@settings(max_examples=150, deadline=None, derandomize=True)
@given(engine_cases())
def test_every_path_matches_the_reference_on_random_draws(drawn):
    config, case = drawn
    nonzero = ("weight", "delay") + (("width",) if torch.is_tensor(case.width) else ())
    check_every_path(config, case, nonzero)


@INTERPRETER
@settings(max_examples=8, deadline=None, derandomize=True)
@given(engine_cases(max_size=6, extra_steps=16))
def test_interpreted_gpu_paths_match_the_reference_on_random_draws(drawn):
    config, case = drawn
    nonzero = ("weight", "delay") + (("width",) if torch.is_tensor(case.width) else ())
    check_every_path(config, case, nonzero, interpreted=True)


# --------------------------------------------------------------------------- kinks
KINK_GRADIENTS = ("weight", "delay", "width")


@pytest.mark.parametrize("delay_type", DELAY_TYPES)
@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("delay", [0.0, 0.5, 1.0, 2.0, 5.0, -0.5])
def test_every_path_at_the_kinks(delay_type, sigma, delay):
    """Integer (or half-integer) centres and learned half-widths ``1 + σ`` or ``2 + σ`` put
    ``c``, ``c - w`` and ``c + w`` exactly on integer lags, the kinks of the triangle, where
    the reference convention holds (``|x|' = 0`` at 0, the clamp passes the gradient at 0);
    some delays sit beside them (± 0.25) in the neighbouring intervals. A negative delay
    (before the optimizer's clamp) is read as the reference reads it."""
    check_every_path(Config(delay_type), kink_case(delay_type, sigma, delay), KINK_GRADIENTS)


@INTERPRETER
@pytest.mark.parametrize("delay_type", DELAY_TYPES)
@pytest.mark.parametrize("delay", [0.0, 0.5, 2.0, -0.5])
def test_interpreted_gpu_paths_at_the_kinks(delay_type, delay):
    case = kink_case(delay_type, 1.0, delay)
    check_every_path(Config(delay_type), case, KINK_GRADIENTS, interpreted=True)


def kink_case(delay_type, sigma, delay):
    size = 4
    shape = {"axonal": (size,), "shared": (1,), "synaptic": (size, size)}[delay_type]
    delays = torch.full(shape, delay, dtype=F64)
    if delay_type == "axonal":
        delays[1] += 0.25
    elif delay_type == "synaptic":
        delays[1, :2] += 0.25
        delays[2, 2:] -= 0.25
    g = torch.Generator().manual_seed(4)
    return Case(
        current=torch.rand(20, 2, size, generator=g, dtype=F64) * 1.6,
        weight=torch.randn(size, size, generator=g, dtype=F64) * 1.5 / math.sqrt(size),
        delay=delays,
        width=1.0 + sigma + (torch.arange(size, dtype=F64) % 2),
        neuron=LIF(tau=2.0),
        mask=None,
        grad_out=torch.randn(20, 2, size, generator=g, dtype=F64),
    )


# --------------------------------------------------------------------------- edges
@pytest.mark.parametrize("delay_type", DELAY_TYPES)
@pytest.mark.parametrize(
    "size, steps, max_delay, sigma",
    [
        (1, 1, 0.0, 1.5),
        (1, 6, 3.0, 1.5),
        (3, 1, 4.0, 1.5),
        (5, 8, 25.0, 1.5),  # delays past the end of the sequence
        (4, 10, 2.0, 15.0),  # kernels wider than the sequence
    ],
)
def test_every_path_at_the_edges(delay_type, size, steps, max_delay, sigma):
    """One step, one neuron, kernels longer than the sequence: what the engines compute there
    (often nothing reaches a delay, so its gradient is exactly 0) equals the reference; the GPU
    paths too, under Triton's interpreter when there is no GPU."""
    case = draw_case(
        delay_type=delay_type,
        size=size,
        batch=2,
        steps=steps,
        max_delay=max_delay,
        sigma=sigma,
        learn_spread=True,
        neuron=LIF(tau=2.0, v_reset=None),
        drive=(1.2, 0.5),
        seed=size + steps,
    )
    expected = Expected(case.bind(reference), case.inputs(), case.grad_out, case.threshold)
    assert expected.spikes.sum() > 0
    config = Config(delay_type)
    for path in paths(config) + interpreted_paths(config):
        compare(case.bind(path.run), expected)
    if steps == 1:  # nothing is delayed within one step
        assert not expected.grads()["delay"].any() and not expected.grads()["weight"].any()


# --------------------------------------------------------------------------- the harness itself
def test_every_available_path_is_run_by_the_harness():
    """No registered path (but the reference) that runs here is left out of every
    configuration the harness tests."""
    names = {
        path.name
        for delay_type in DELAY_TYPES
        for integer in (False, True)
        for path in paths(Config(delay_type, integer=integer))
    }
    available = {name for name, path in PATHS.items() if path.available("cpu")}
    assert names == available - {"reference"}
    assert all(len(paths(Config(d))) >= 2 for d in DELAY_TYPES)  # a compiled and an op path


def small_case(dtype=F64, **overrides):
    settings_ = dict(
        delay_type="axonal",
        size=6,
        batch=8,
        steps=30,
        max_delay=4.0,
        sigma=1.0,
        learn_spread=False,
        neuron=LIF(tau=2.0),
        seed=1,
        dtype=dtype,
    )
    return draw_case(**{**settings_, **overrides})


def flipped(run, steps, sample, neuron):
    """``run`` with the spike ``(steps, sample, neuron)`` flipped (gradients unchanged)."""

    def call(**inputs):
        spikes = run(**inputs)
        change = torch.zeros_like(spikes)
        change[steps, sample, neuron] = 1.0 - 2.0 * spikes[steps, sample, neuron].detach()
        return spikes + change

    return call


@pytest.mark.parametrize("dtype", [F64, F32])
def test_a_spike_that_differs_away_from_the_threshold_fails(dtype):
    case = small_case(dtype)
    expected = Expected(case.bind(reference), case.inputs(), case.grad_out, 1.0)
    neuron = int((expected.membrane[10, 3] - 1.0).abs().argmax())
    assert (expected.membrane[10, 3, neuron] - 1.0).abs() > 0.1
    with pytest.raises(AssertionError, match=f"step 10 of sample 3, neurons \\[{neuron}\\]"):
        compare(flipped(case.bind(reference_spikes), 10, 3, neuron), expected)


def reference_spikes(*args):
    return reference(*args)[0]


@pytest.mark.parametrize("dtype", [F64, F32])
def test_a_threshold_tie_leaves_its_sample_out_in_float32_only(dtype):
    """Sample 5 gets the current ``θ`` at step 0 (``h = θ`` exactly): an engine that does not
    fire there is accepted in float32, where the sample's later spikes and its gradient are
    left out, and refused in float64."""
    case = small_case(dtype)
    case.current[0, 5, 1] = 1.0
    expected = Expected(case.bind(reference), case.inputs(), case.grad_out, 1.0)
    assert expected.membrane[0, 5, 1] == 1.0 and expected.spikes[0, 5, 1] == 1.0
    candidate = flipped(case.bind(reference_spikes), 0, 5, 1)
    if dtype == F64:
        with pytest.raises(AssertionError, match="not a tie"):
            compare(candidate, expected)
        return
    assert TIE_WIDTH[F32] > 0
    agreement = compare(candidate, expected)
    assert agreement.tied == (5,) and agreement.worst() == 0.0
    assert expected.grads((5,))["weight"].ne(expected.grads()["weight"]).any()


def test_too_many_ties_fail():
    case = small_case(F32)
    case.current[0, :, 1] = 1.0
    expected = Expected(case.bind(reference), case.inputs(), case.grad_out, 1.0)
    candidate = case.bind(reference_spikes)
    for sample in range(3):
        candidate = flipped(candidate, 0, sample, 1)
    with pytest.raises(AssertionError, match="3 of 8 samples tie"):
        compare(candidate, expected)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_an_error_confined_to_the_small_entries_of_a_gradient_fails(dtype):
    """Entries spanning six decades: an error of 10× the tolerance on the five smallest fails,
    where the same tolerance relative to the largest entry would not see it."""
    signs = torch.tensor([1.0, -1.0], dtype=dtype).repeat(25)
    expected = torch.logspace(-6, 0, 50, dtype=dtype) * signs
    rtol, floor = GRAD_TOLERANCE[dtype]
    actual = expected.clone()
    actual[:5] += 10 * rtol * floor * expected.square().mean().sqrt()
    assert (actual - expected).abs().max() < rtol * expected.abs().max()  # relative to the largest
    with pytest.raises(AssertionError, match="gradient 'delay': 5 of 50 entries off"):
        assert_grad_close("delay", actual, expected)
    assert assert_grad_close("delay", expected * (1 + rtol / 2), expected) <= rtol


def test_degenerate_draws_are_rejected():
    silent = small_case(drive=(0.0, 0.01))
    expected = Expected(silent.bind(reference), silent.inputs(), silent.grad_out, 1.0)
    with pytest.raises(AssertionError, match="degenerate draw: spike rate 0.0"):
        assert_exercised(expected)
    short = small_case(steps=2, max_delay=0.0, sigma=0.0, drive=(1.5, 0.5))  # lags ≥ 1 + 1
    expected = Expected(short.bind(reference), short.inputs(), short.grad_out, 1.0)
    assert_exercised(expected, ("current",))
    with pytest.raises(AssertionError, match="degenerate draw: the delay gradient is all zero"):
        assert_exercised(expected, ("current", "delay"))
