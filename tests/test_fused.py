"""The fused network around the delays against the reference: feedforward LIF layers, the
leaky-integrator readout, BatchNorm over time, dropout masks and spike products, alone and in
whole networks."""

import math
import platform
from unittest import mock

import pytest
import torch
from engine_harness import NEURONS, assert_close_relative, threads
from fused_helpers import (
    NETWORKS,
    assert_batch_norm_like_the_module,
    assert_lif_layer_like_the_loop,
    assert_trains_alike,
    grads_of,
    network_pair,
    reference_layer,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from delrec.bench import saved_bytes
from delrec.engine import PATHS, RecurrentState, fused, native
from delrec.engine import dropout as masks
from delrec.layers.dropout import Dropout
from delrec.layers.recurrent import DelRec
from delrec.models import set_feedforward_engine
from delrec.neurons import LIF, LeakyIntegrator

needs_kernels = pytest.mark.skipif(
    native.load("fused") is None,
    reason="the C++ kernels 'fused' are not built (a C++ compiler and ninja are needed)",
)


# --------------------------------------------------------------------------- masks
def test_philox_matches_the_published_known_answers():
    # Random123's known-answer vectors for Philox4x32-10: (counter, key) -> four words
    vectors = [
        ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            0x299F31D0A4093822,
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in vectors:
        words = masks.philox(tuple(torch.tensor([c]) for c in counter), key)
        assert tuple(int(w) for w in words) == expected


@needs_kernels
@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 150)),
    key=st.integers(0, 2**63 - 1),
    keep=st.floats(0.05, 0.99),
    offset=st.integers(0, 2**31),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_the_kernel_draws_the_masks_that_the_pytorch_ops_draw(shape, key, keep, offset, dtype):
    draw = masks.MaskDraw(key, keep, offset)
    expected = masks.reference_mask(shape, draw, dtype)
    assert torch.equal(fused.dropout_mask(shape, draw, dtype), expected)
    x = torch.randn(shape, dtype=dtype)
    assert torch.equal(fused.dropped(x, draw), x * expected)


@needs_kernels
def test_masks_of_rows_beyond_two_to_the_32_are_refused_on_both_paths():
    """A mask's row counter is one 32-bit word: the kernel wrapped rows past 2³² while the
    PyTorch ops did not, so the two drew different masks. Such rows are now refused."""
    draw = masks.MaskDraw(12345, 0.5, 2**32 - 2)
    assert torch.equal(  # the last two rows it can tell apart
        fused.dropout_mask((2, 2, 20), draw, torch.float64),
        masks.reference_mask((2, 2, 20), draw, torch.float64),
    )
    with pytest.raises(ValueError, match="2\\^32 rows only"):
        masks.reference_mask((2, 4, 20), draw, torch.float64)
    with pytest.raises(RuntimeError, match="2\\^32 rows of a batch only"):
        fused.dropout_mask((2, 4, 20), draw, torch.float64)
    for offset in (-1, 2**32):
        with pytest.raises(ValueError, match="batch_offset must be a row"):
            masks.MaskDraw(1, 0.5, offset)


def vector_variants():
    """Extra compiler flags for each build of the fused kernels besides the default one that
    this CPU runs: without AVX2 and AVX-512 always (the generator's plain loops, the spike
    products' 32-byte vectors on AVX), with AVX2 where the default build has AVX-512 (the
    generator's AVX2 version, the spike products' 32-byte vectors)."""
    variants = [("-mno-avx512f", "-mno-avx2")]
    default = native.load("fused")
    if default is not None and default.philox == "avx512":
        variants.append(("-mno-avx512f",))
    return variants


x86_variants = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"),
    reason="the variants are builds for x86 (-mno-avx512f, -mno-avx2)",
)


@needs_kernels
@x86_variants
@pytest.mark.parametrize("flags", vector_variants())
def test_every_version_of_the_generator_draws_the_same_masks(flags):
    kernels = native.build("fused", flags)
    assert kernels.philox != native.load("fused").philox
    for shape, keep, offset in (((3, 5, 300), 0.7, 0), ((2, 3, 17), 0.05, 2**31 - 3)):
        draw = masks.MaskDraw(987654321987, keep, offset)
        out = torch.empty(shape)
        kernels.dropout(None, out, draw.native(out.dtype))
        assert torch.equal(out, masks.reference_mask(shape, draw, out.dtype))


def test_masks_keep_the_asked_share_and_scale_by_one_over_keep():
    draw = masks.MaskDraw(key=12345, keep=0.6)
    values = fused.dropout_mask((50, 64, 100), draw)
    kept = values.ne(0).double().mean().item()
    assert abs(kept - 0.6) < 5 * math.sqrt(0.6 * 0.4 / values.numel())
    assert set(values.unique().tolist()) == {0.0, float(torch.tensor(1.0) / 0.6)}
    # consecutive neurons, samples and steps are not correlated, nor are the neurons that share
    # a Philox block (16 apart: its next word; 64 apart: the other half of the same word)
    bits = values.ne(0).double() - 0.6
    for dim, lag in ((0, 1), (1, 1), (2, 1), (2, 16), (2, 64)):
        near = (bits * bits.roll(lag, dim)).mean().item() / 0.24
        assert abs(near) < 0.01, (dim, lag)


def test_the_keep_probability_is_rounded_to_a_multiple_of_two_to_the_minus_16():
    assert masks.MaskDraw(key=1, keep=0.6).threshold == 39322  # round(0.6 · 65536)
    nearly_one = masks.MaskDraw(key=1, keep=1 - 2**-18)  # rounds to 1: every element kept
    assert nearly_one.threshold == 2**16
    assert bool(fused.dropout_mask((3, 4, 200), nearly_one).ne(0).all())


def test_a_shard_of_the_batch_draws_its_rows_of_the_whole_batch_mask():
    whole = fused.dropout_mask((4, 10, 9), masks.MaskDraw(5, 0.5, 0))
    assert torch.equal(fused.dropout_mask((4, 3, 9), masks.MaskDraw(5, 0.5, 4)), whole[:, 4:7])
    assert not torch.equal(fused.dropout_mask((4, 10, 9), masks.MaskDraw(6, 0.5, 0)), whole)


def test_keys_come_from_the_global_generator():
    torch.manual_seed(3)
    first = [masks.draw(0.2).key for _ in range(3)]
    torch.manual_seed(3)
    assert [masks.draw(0.2).key for _ in range(3)] == first and len(set(first)) == 3
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        masks.draw(1.0)


@pytest.mark.parametrize("engine", fused.NETWORK_ENGINES)
def test_dropout_module(engine):
    layer = Dropout(0.3)
    layer.engine = engine
    x = torch.randn(6, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    y = layer(x)
    torch.manual_seed(0)
    mask = masks.reference_mask(x.shape, masks.draw(0.3), x.dtype)
    assert torch.equal(y, x * mask)
    (grad,) = grads_of(y, [x], torch.ones_like(x))
    assert torch.equal(grad, mask)
    assert layer.eval()(x) is x and Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="probability"):
        Dropout(1.0)


# --------------------------------------------------------------------------- LIF layer
@needs_kernels
@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    steps=st.integers(1, 20),
    batch=st.integers(1, 4),
    size=st.integers(1, 70),
    neuron=NEURONS,
    other_surrogate=st.booleans(),
    dropout_in=st.booleans(),
    dropout_out=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_lif_layer_matches_the_autograd_loop(
    steps, batch, size, neuron, other_surrogate, dropout_in, dropout_out, seed
):
    shape = (steps, batch, size)
    assert_lif_layer_like_the_loop(shape, neuron, other_surrogate, dropout_in, dropout_out, seed)


@needs_kernels
@pytest.mark.parametrize("reset", [0.0, None])
def test_fused_lif_layer_in_float32_at_training_size(reset):
    g = torch.Generator().manual_seed(1)
    neuron = LIF(tau=2.0, v_reset=reset, detach_reset=reset is not None)
    current = torch.randn(60, 32, 100, generator=g) * 0.8 + 0.5
    grad_out = torch.randn(60, 32, 100, generator=g)
    draw = masks.MaskDraw(9, 0.8)
    x64 = current.double().requires_grad_()
    exact = reference_layer(neuron, x64, None, draw)
    (exact_grad,) = grads_of(exact, [x64], grad_out.double())
    x = current.clone().requires_grad_()
    spikes = fused.lif_layer(x, neuron.p, None, draw)
    reference = reference_layer(neuron, current, None, draw)
    assert torch.equal(spikes, reference)
    assert 0.05 < spikes.ne(0).float().mean() < 0.95
    assert torch.equal(spikes.double(), exact)  # no threshold tie in this draw
    assert_close_relative(grads_of(spikes, [x], grad_out)[0].double(), exact_grad, rtol=1e-5)


@needs_kernels
def test_fused_lif_layer_saves_only_the_membrane():
    current = torch.randn(10, 3, 8, requires_grad=True)
    neuron = LIF()
    saved = saved_bytes(lambda: fused.lif_layer(current, neuron.p, masks.MaskDraw(1, 0.5)))
    assert saved == current.numel() * current.element_size()
    assert saved_bytes(lambda: fused.dropped(current, masks.MaskDraw(1, 0.5))) == 0


# --------------------------------------------------------------------------- readout, norm
@needs_kernels
@pytest.mark.parametrize("decay_input", [False, True])
@pytest.mark.parametrize("tau", [1.05, 20.0])
def test_fused_leaky_integrator_matches_the_module(decay_input, tau):
    g = torch.Generator().manual_seed(2)
    current = torch.randn(30, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(30, 5, 7, generator=g, dtype=torch.float64)
    expected = LeakyIntegrator(tau, decay_input)(current)
    out = fused.integrate(current, tau, decay_input)
    assert_close_relative(out.detach(), expected.detach(), rtol=1e-12)
    assert_close_relative(
        grads_of(out, [current], grad_out)[0], grads_of(expected, [current], grad_out)[0]
    )
    # from a membrane of a previous chunk: v[-1], and its gradient
    start = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    out = fused.integrate(current, tau, decay_input, start)
    expected, _ = LeakyIntegrator(tau, decay_input)(current, (start,), return_state=True)
    assert_close_relative(out.detach(), expected.detach(), rtol=1e-12)
    actual = grads_of(out, [current, start], grad_out)
    for a, e in zip(actual, grads_of(expected, [current, start], grad_out)):
        assert_close_relative(a, e)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("with_shift", [False, True])
def test_fused_batch_norm_matches_the_module(dtype, momentum, with_shift):
    assert_batch_norm_like_the_module((20, 9, 6), dtype, momentum, with_shift)


@needs_kernels
def test_fused_batch_norm_keeps_float64_precision_for_a_large_mean():
    """Channels whose mean is 10⁶ times their spread: the variance as Σx²/M − mean² lost most
    of its digits (outputs off by 6e-6 at 10⁵, 1.5e-3 at 10⁶); taken around a pivot it keeps
    them, as ``nn.BatchNorm1d`` does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, 4, generator=g, dtype=torch.float64) * 1e-2 + 1e4
    modules = [torch.nn.BatchNorm1d(4).double() for _ in range(2)]
    expected = modules[0](x.flatten(0, 1)).view_as(x)
    out = fused.batch_norm(x, modules[1])
    assert_close_relative(out.detach(), expected.detach(), 1e-9)
    assert_close_relative(modules[1].running_var, modules[0].running_var, 1e-9)
    assert_close_relative(modules[1].running_mean, modules[0].running_mean, 1e-12)


# --------------------------------------------------------------------------- spike products
def spiky(shape, density, dtype, generator):
    """Random spikes of ``shape``: ``⌊density·numel⌋`` of them non-zero, at random places and
    of random sizes (masked and scaled spikes, or data)."""
    numel = math.prod(shape)
    x = torch.zeros(numel, dtype=dtype)
    places = torch.randperm(numel, generator=generator)[: int(density * numel)]
    x[places] = torch.randn(len(places), generator=generator, dtype=dtype)
    return x.view(shape)


def ran_sparse(out):
    """Whether ``out`` of :func:`fused.linear` came from the spike products (a view of)."""
    return "_SpikeLinear" in type(out.grad_fn.next_functions[0][0]).__name__


def sparse_calls(monkeypatch):
    """A list that records each call of the spike products' autograd Function."""
    calls, apply = [], fused._SpikeLinear.apply
    monkeypatch.setattr(fused._SpikeLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@needs_kernels
@settings(max_examples=120, deadline=None, derandomize=True)
@given(
    lead=st.lists(st.integers(0, 9), min_size=1, max_size=2),
    inputs=st.integers(1, 70),
    outputs=st.integers(1, 300),
    density=st.floats(0, fused.MAX_DENSITY, allow_subnormal=False),
    with_bias=st.booleans(),
    input_grad=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_spike_products_match_the_dense_product(
    lead, inputs, outputs, density, with_bias, input_grad, dtype, seed
):
    """Outputs of any width (whole register blocks, single vectors and the scalar tail), empty
    batches, any density up to the limit; the width and row limits lowered."""
    g = torch.Generator().manual_seed(seed)
    x = spiky((*lead, inputs), density, dtype, g).requires_grad_(input_grad)
    weight = torch.randn(outputs, inputs, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(outputs, generator=g, dtype=dtype).requires_grad_() if with_bias else None
    grad_out = torch.randn((*lead, outputs), generator=g, dtype=dtype)
    with mock.patch.object(fused, "MIN_OUTPUTS", 1), mock.patch.object(fused, "MIN_ROWS", 0):
        out = fused.linear(x, weight, bias)
    expected = F.linear(x, weight, bias)
    assert ran_sparse(out)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close_relative(out.detach(), expected.detach(), rtol)
    wanted = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    for got, want in zip(grads_of(out, wanted, grad_out), grads_of(expected, wanted, grad_out)):
        assert_close_relative(got, want, rtol)


@needs_kernels
def test_spike_products_give_the_same_sums_on_any_number_of_threads():
    """Rows past the weight gradient's first chunks of partial sums (2,048 rows each): the
    values of the dense product, bit for bit the same on one thread and on three."""
    g = torch.Generator().manual_seed(3)
    x = spiky((3 * 2048 + 5, 40), 0.1, torch.float64, g).requires_grad_()
    weight = torch.randn(150, 40, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(150, generator=g, dtype=torch.float64).requires_grad_()
    grad_out = torch.randn(len(x), 150, generator=g, dtype=torch.float64)
    runs = []
    for count in (1, 3):
        with threads(count):
            out = fused.linear(x, weight, bias)
            runs.append([out, *grads_of(out, [x, weight, bias], grad_out)])
    assert ran_sparse(out)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    expected = F.linear(x, weight, bias)
    assert_close_relative(runs[0][0].detach(), expected.detach(), 1e-12)
    for got, want in zip(runs[0][1:], grads_of(expected, [x, weight, bias], grad_out)):
        assert_close_relative(got, want, 1e-12)


@needs_kernels
@x86_variants
@pytest.mark.parametrize("flags", vector_variants())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_vector_width_computes_the_same_spike_products(flags, dtype):
    """The C++ spike products of a variant build against the dense product: outputs across
    the register blocks of every vector width, rows across the weight gradient's chunks."""
    kernels = native.build("fused", flags)
    assert kernels.vector_bytes == 32
    g = torch.Generator().manual_seed(8)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for rows, inputs, outputs in [(300, 33, n) for n in (1, 7, 17, 64, 65, 129, 200)] + [
        (2 * 2048 + 3, 20, 70)
    ]:
        x = spiky((rows, inputs), 0.1, dtype, g)
        weight = torch.randn(outputs, inputs, generator=g, dtype=dtype)
        bias = torch.randn(outputs, generator=g, dtype=dtype)
        grad = torch.randn(rows, outputs, generator=g, dtype=dtype)
        compressed = kernels.nonzero_rows(x, x.numel())
        out = torch.empty(rows, outputs, dtype=dtype)
        kernels.sparse_linear(*compressed, weight.t().contiguous(), bias, out)
        assert_close_relative(out, F.linear(x, weight, bias), rtol)
        grad_weight_t = torch.empty(inputs, outputs, dtype=dtype)
        kernels.sparse_weight_grad(*compressed, grad, grad_weight_t)
        assert_close_relative(grad_weight_t, x.t() @ grad, rtol)


@needs_kernels
def test_spike_products_run_where_they_pay(monkeypatch):
    """Sparse with at most :data:`fused.MAX_DENSITY` non-zeros (one more: dense), at least
    :data:`fused.MIN_OUTPUTS` outputs and :data:`fused.MIN_ROWS` rows, on the C++ kernels;
    what does not match goes to ``F.linear``, which says what."""
    calls = sparse_calls(monkeypatch)
    rows, inputs = fused.MIN_ROWS, 5
    x = torch.zeros(rows * inputs)
    x[torch.randperm(rows * inputs)[: int(fused.MAX_DENSITY * rows * inputs)]] = 1.0
    x = x.view(rows, inputs)
    wide = torch.randn(fused.MIN_OUTPUTS, inputs)
    fused.linear(x, wide)
    assert len(calls) == 1
    denser = x.clone()
    denser.view(-1)[denser.view(-1).eq(0).nonzero()[0]] = 1.0
    for args in [(denser, wide), (x, wide[:-1]), (x[:-1], wide), (x.double(), wide.double())]:
        assert torch.equal(fused.linear(*args), F.linear(*args))
    assert len(calls) == 2  # float64 runs them too
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        fused.linear(x[:, :4], wide)
    with pytest.raises(RuntimeError, match="dtype"):
        fused.linear(x.double(), wide)
    monkeypatch.setenv("DELREC_NATIVE", "0")
    fused.linear(x, wide)
    assert len(calls) == 2


@needs_kernels
@pytest.mark.parametrize("where", ["first rows", "last rows"])
def test_the_count_says_too_many_wherever_the_non_zeros_lie(where):
    """The count stops once the rows counted pass the limit; at the limit exactly it counts
    every row and compresses them all, one more non-zero is "dense", whichever rows (and
    threads) hold them."""
    kernels = native.load("fused")
    rows, inputs, limit = 5000, 7, 3000
    for pool in (1, 2):
        with threads(pool):
            for count in (limit, limit + 1):
                x = torch.zeros(rows * inputs)
                span = slice(0, count) if where == "first rows" else slice(-count, None)
                x[span] = 2.0
                compressed = kernels.nonzero_rows(x.view(rows, inputs), limit)
                if count > limit:
                    assert compressed == []
                    continue
                offsets, index, value = compressed
                assert offsets[0] == 0 and offsets[-1] == count and torch.all(value == 2.0)
                assert torch.equal(offsets.diff(), x.view(rows, inputs).ne(0).sum(1))


@needs_kernels
def test_spike_products_refuse_a_second_derivative(monkeypatch):
    monkeypatch.setattr(fused, "MIN_ROWS", 1)
    x = torch.zeros(4, 8)
    x[0, 3] = 1.0
    weight = torch.randn(fused.MIN_OUTPUTS, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(fused.linear(x, weight).sum(), weight)  # first order: fine
    assert_close_relative(grad, torch.autograd.grad(F.linear(x, weight).sum(), weight)[0], 1e-6)
    with pytest.raises(RuntimeError, match="first derivatives only.*set_feedforward_engine"):
        torch.autograd.grad(fused.linear(x, weight).square().sum(), weight, create_graph=True)


# --------------------------------------------------------------------------- whole networks
@needs_kernels
@pytest.mark.parametrize("model", ["delrec", "rsnn", "snn"])
@pytest.mark.parametrize("task", list(NETWORKS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_network_trains_like_the_reference(task, model, dtype):
    config, (fused_net, reference_net) = network_pair(task, model, dtype)
    lengths = torch.tensor([25, 7, 19, 25, 1, 12])  # variable lengths, zero-padded
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    assert_trains_alike(task, config, fused_net, reference_net, lengths, rtol)


@needs_kernels
@pytest.mark.parametrize("shape", [(10, 0), (1, 1)], ids=["empty batch", "one frame"])
def test_fused_network_answers_like_the_reference_without_statistics(shape):
    config, networks = network_pair("shd", "snn", torch.float32)
    frames = torch.rand(*shape, config.input_size)
    answers = []
    for network in networks:
        try:
            answers.append(network(frames).shape)
        except ValueError as error:  # BatchNorm over a single frame
            answers.append(str(error))
    assert answers[0] == answers[1]
    assert all(torch.equal(a, b) for a, b in zip(networks[0].buffers(), networks[1].buffers()))


@needs_kernels
def test_the_switch_chooses_the_path():
    config, (fused_net, reference_net) = network_pair("shd", "delrec", torch.float32)
    x = torch.rand(5, 2, config.input_size)
    assert type(fused_net(x).grad_fn).__name__ == "_IntegratorBackward"
    assert type(reference_net(x).grad_fn).__name__ != "_IntegratorBackward"
    with pytest.raises(ValueError, match="feedforward engine"):
        set_feedforward_engine(fused_net, "fast")
    assert all(m.engine == "reference" for m in reference_net.blocks)
    assert reference_net.blocks[1].neurons.engine == "auto"  # the recurrent layer's own option


@needs_kernels
def test_without_the_kernels_the_reference_runs_with_the_same_masks(monkeypatch):
    config, (network, _) = network_pair("ssc", "snn", torch.float64)
    frames = torch.rand(12, 3, config.input_size, dtype=torch.float64)
    torch.manual_seed(0)
    expected = network(frames)
    monkeypatch.setenv("DELREC_NATIVE", "0")  # masks drawn by PyTorch ops, autograd loops
    torch.manual_seed(0)
    assert torch.equal(network(frames), expected)
    with pytest.raises(RuntimeError, match="reference"):
        fused.lif_layer(frames, LIF().p)


# --------------------------------------------------------------------------- recurrent input
@needs_kernels
@pytest.mark.parametrize("where", ["input", "output"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "engine, neuron, stateful",
    [
        ("cpp-axonal", LIF(tau=2.0), False),  # the mask drawn in the engine's loops
        ("cpp-axonal", LIF(tau=2.0), True),  # from a state: dropped in front of / behind the loop
        ("cpp-axonal", LIF(tau=2.0, decay_input=True), False),  # drive ≠ current: input in front
        ("torch-axonal", LIF(tau=2.0, v_reset=0.0), False),  # a path that can't: outside
        ("reference", LIF(tau=2.0, v_reset=0.0), False),
    ],
)
def test_recurrent_layer_drops_its_input_or_spikes_like_the_dropout_module(
    where, dtype, engine, neuron, stateful, monkeypatch
):
    """``DelRec(current, input_dropout=draw)`` gives the spikes and gradients of the layer run on
    ``current ⊙ mask``, and ``DelRec(current, output_dropout=draw)`` those of ``layer(current) ⊙
    mask`` (the PyTorch-op mask), bit for bit, whoever applies the mask; N = 70 and 130 cross
    the masks' 128-element chunks, two threads split the rows (on both sides: PyTorch's float32
    GEMMs round differently on one thread and two on some CPUs)."""
    outside = []
    dropped = fused.dropped
    monkeypatch.setattr(fused, "dropped", lambda x, d: outside.append(1) or dropped(x, d))
    for steps, batch, n in [(30, 5, 70), (20, 3, 130)]:
        layer = DelRec(n, neuron, delay_init="uniform:0:6", learn_spread=True, sigma=2.0)
        layer = layer.to(dtype).train()
        layer.engine = engine
        current = torch.randn(steps, batch, n, dtype=dtype, requires_grad=True)
        draw = masks.draw(0.3, batch_offset=2)
        recurrent_mask = (torch.rand(batch, n) < 0.8).to(dtype) / 0.8
        grad_out = torch.randn(steps, batch, n, dtype=dtype)
        results = []
        for kind in ("in the layer", "by hand"):
            with threads(2):  # the same GEMM splits on both sides: bit for bit
                options = {"return_state": True, "dropout_mask": recurrent_mask}
                if not stateful:
                    options.pop("return_state")
                mask = masks.reference_mask(current.shape, draw, dtype)
                if kind == "in the layer":
                    out = layer(current, **{f"{where}_dropout": draw}, **options)
                elif where == "input":
                    out = layer(current * mask, **options)
                else:
                    out = layer(current, **options)
                    out = (out[0] * mask, out[1]) if stateful else out * mask
                spikes = out[0] if stateful else out
                params = [current, layer.weight, layer.delay, layer.spread_logits]
                results.append((spikes, *grads_of(spikes, params, grad_out)))
        for fast, expected in zip(*results):
            assert torch.equal(fast, expected)
        assert results[0][0].sum() > 0
    in_the_loop = engine == "cpp-axonal" and not stateful
    if where == "input":
        in_the_loop = in_the_loop and not neuron.p.decay_input
    assert (len(outside) == 0) == in_the_loop


@pytest.mark.parametrize("where", ["input_dropout", "output_dropout"])
def test_a_dropout_that_is_not_a_mask_draw_is_refused_by_name(where):
    layer, current = DelRec(8).train(), torch.randn(5, 2, 8)
    expected = rf"{where} must be a delrec.engine.dropout.MaskDraw.*got float"
    with pytest.raises(TypeError, match=expected):
        layer(current, **{where: 0.3})
    if where == "output_dropout":  # the function that draws it, called by the layer
        with pytest.raises(TypeError, match=expected):
            layer(current, output_dropout=lambda: 0.3)


@needs_kernels
def test_the_engine_refuses_a_dropout_it_cannot_draw_in_its_loop():
    """From a state, or with a drive other than the current (``decay_input``), the C++ path
    refuses an input mask with a message that says to drop the current in front; from a state,
    an output mask, saying to drop the spikes behind."""
    current, weight = torch.randn(6, 2, 8), torch.eye(8)
    delay, draw = torch.full((8,), 2.0), masks.draw(0.3)
    run = PATHS["cpp-axonal"].run
    start = RecurrentState((torch.zeros(2, 8),), torch.zeros(0, 2, 8))
    for neuron, state in [(LIF(), start), (LIF(decay_input=True), None)]:
        with pytest.raises(ValueError, match="drop the current in front"):
            run(current, weight, delay, 1.0, neuron, None, state=state, input_dropout=draw)
    with pytest.raises(ValueError, match="drop the spikes behind"):
        run(current, weight, delay, 1.0, LIF(), None, state=start, output_dropout=draw)


@needs_kernels
@pytest.mark.parametrize("model", ["delrec", "snn"])
@pytest.mark.parametrize("task", ["shd", "ssc"])
def test_wide_networks_train_like_the_reference_through_spike_products(task, model, monkeypatch):
    """Hidden layers wide enough for the spike products (the BatchNorm block of SHD and the
    dropout block of SSC): float64, so that rounding cannot flip a spike."""
    calls = sparse_calls(monkeypatch)
    monkeypatch.setattr(fused, "MIN_ROWS", 1)  # T·B = 120 frames here
    config, (fused_net, reference_net) = network_pair(
        task, model, torch.float64, hidden_sizes=(fused.MIN_OUTPUTS, 70, 130)[: 2 + (task == "ssc")]
    )
    lengths = torch.tensor([30, 9, 22, 30])
    assert_trains_alike(task, config, fused_net, reference_net, lengths, 1e-9)
    assert calls
