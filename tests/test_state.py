"""State in, state out: a sequence run in chunks equals one pass on every engine path, and
with the state detached at chunk boundaries the gradients are truncated BPTT as the reference
computes it."""

import math

import pytest
import torch
from engine_harness import NEURONS, assert_grad_close
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from delrec.engine import PATHS, RecurrentState
from delrec.engine.state import history_input, next_history
from delrec.layers import DelRec, DelRecState, FeedforwardDelay
from delrec.models import MODELS, NetworkConfig, build_network, preset_network
from delrec.neurons import LIF, AdLIF, LeakyIntegrator

SHAPES = {"axonal": lambda n: (n,), "synaptic": lambda n: (n, n), "shared": lambda n: (1,)}


def random_layer(size, delay_type, path, *, max_delay, integer_share, sigma, learn_spread,
                 neuron, dropout, seed, zero_first=True):  # fmt: skip
    """A float64 layer on engine ``path`` with random weights, delays (a share of them
    integers, the first one 0 if ``zero_first``) and spread logits."""
    g = torch.Generator().manual_seed(seed)
    layer = DelRec(
        size,
        neuron,
        delay_type=delay_type,
        delay_init=0.0,
        learn_spread=learn_spread,
        sigma=sigma,
        recurrent_dropout=dropout,
        engine=path,
    ).double()
    shape = SHAPES[delay_type](size)
    delays = torch.rand(shape, generator=g, dtype=torch.float64) * max_delay
    integer = torch.rand(shape, generator=g) < integer_share
    delays[integer] = delays[integer].round()
    if zero_first:
        delays.view(-1)[0] = 0.0
    with torch.no_grad():
        layer.weight.copy_(torch.randn(size, size, generator=g, dtype=torch.float64))
        layer.weight.mul_(1.5 / math.sqrt(size))
        layer.delay.copy_(delays)
        if learn_spread:
            layer.spread_logits.copy_(torch.randn(size, generator=g, dtype=torch.float64))
    return layer


def in_chunks(layer, current, cuts, state=None, **first):
    """Spikes of ``current`` run chunk by chunk (boundaries ``cuts``), the state passed along;
    ``first``: keyword arguments of the first chunk (a dropout mask)."""
    spikes, start = [], 0
    for end in [*cuts, current.shape[0]]:
        s, state = layer(current[start:end], state, return_state=True, **first)
        spikes.append(s)
        start, first = end, {}
    return torch.cat(spikes), state


def cut_points(steps):
    return st.lists(st.integers(1, max(1, steps - 1)), max_size=4).map(
        lambda cuts: sorted({c for c in cuts if 0 < c < steps})
    )


def stateful_paths(delay_type, neuron, integer, grad):
    paths = [
        name
        for name, path in PATHS.items()
        if path.supports(delay_type, neuron, integer, grad, state=True) and path.available("cpu")
    ]
    assert "reference" in paths
    return paths


def draw_current_and_mask(steps, batch, size, seed):
    """A float64 input current ``(T, B, N)``, a recurrent dropout mask ``(B, N)`` (keep 0.7)
    and the generator that drew them, for further draws."""
    g = torch.Generator().manual_seed(seed + 1)
    current = torch.randn(steps, batch, size, generator=g, dtype=torch.float64) * 0.8 + 0.4
    mask = torch.bernoulli(torch.full((batch, size), 0.7, dtype=torch.float64), generator=g) / 0.7
    return current, mask, g


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    data=st.data(),
    steps=st.integers(1, 30),
    batch=st.integers(1, 3),
    size=st.integers(1, 5),
    delay_type=st.sampled_from(["axonal", "synaptic", "shared"]),
    max_delay=st.sampled_from([0.0, 1.0, 4.0, 25.0]),  # 25 > T: kernels longer than the chunks
    integer_share=st.sampled_from([0.0, 0.5, 1.0]),
    sigma=st.sampled_from([0.0, 0.5, 2.7, 10.0]),
    learn_spread=st.booleans(),
    neuron=NEURONS,
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunks_equal_one_pass_on_every_path(
    data,
    steps,
    batch,
    size,
    delay_type,
    max_delay,
    integer_share,
    sigma,
    learn_spread,
    neuron,
    training,
    seed,
):
    """Training mode: spread kernels and a recurrent dropout mask fixed over the sequence;
    eval mode: integer delays (the ring path among others)."""
    cuts = data.draw(cut_points(steps), label="cuts")
    current, mask, _ = draw_current_and_mask(steps, batch, size, seed)
    options = dict(
        max_delay=max_delay,
        integer_share=integer_share,
        sigma=sigma,
        learn_spread=learn_spread,
        neuron=neuron,
        dropout=0.3,
        seed=seed,
    )
    expected = None
    for path in stateful_paths(delay_type, neuron, not training, grad=False):
        layer = random_layer(size, delay_type, path, **options).train(training)
        first = {"dropout_mask": mask} if training else {}
        with torch.no_grad():
            whole = layer(current, **first)
            chunked, state = in_chunks(layer, current, cuts, **first)
        assert torch.equal(chunked, whole), (path, cuts)
        expected = whole if expected is None else expected
        assert torch.equal(whole, expected), path  # and every path agrees
        assert state.spikes.shape[1:] == (batch, size)
        assert state.mask is (mask if training else None)


@pytest.mark.parametrize("delay_type", ["axonal", "synaptic", "shared"])
@pytest.mark.parametrize("training", [True, False])
def test_chunks_shorter_than_every_delay_equal_one_pass(delay_type, training):
    """Delays of 5–8 steps and chunks of 1 or 2 steps: the history reaches no step of a chunk
    (the random draws above always hold a delay of 0, so they never meet this case)."""
    current, mask, _ = draw_current_and_mask(12, 2, 4, seed=3)
    for path in stateful_paths(delay_type, LIF(), not training, grad=training):
        layer = DelRec(
            4, delay_type=delay_type, delay_init="uniform:5:8", recurrent_dropout=0.3, engine=path
        )
        layer = layer.double().train(training)
        first = {"dropout_mask": mask} if training else {}
        with torch.set_grad_enabled(training):
            whole = layer(current, **first)
            for cuts in ([1, 2, 3, 4, 5, 6], [2, 4, 6, 8, 10]):
                chunked, _ = in_chunks(layer, current, cuts, **first)
                assert torch.equal(chunked, whole), (path, cuts)
        assert whole.sum() > 0


def random_state(batch, size, history, seed):
    """A state to start from: random membranes and a random spike history, requiring grad."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, size, generator=g, dtype=torch.float64).requires_grad_()
    spikes = (torch.rand(history, batch, size, generator=g) < 0.4).double().requires_grad_()
    return v, spikes


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    data=st.data(),
    steps=st.integers(2, 24),
    batch=st.integers(1, 3),
    size=st.integers(1, 5),
    delay_type=st.sampled_from(["axonal", "synaptic", "shared"]),
    max_delay=st.sampled_from([1.0, 4.0, 15.0]),
    integer_share=st.sampled_from([0.0, 0.5]),
    sigma=st.sampled_from([0.0, 0.5, 2.7, 10.0]),
    learn_spread=st.booleans(),
    neuron=NEURONS,
    history=st.integers(0, 20),
    seed=st.integers(0, 2**16),
)
def test_chunked_gradients_are_truncated_bptt_of_the_reference(
    data,
    steps,
    batch,
    size,
    delay_type,
    max_delay,
    integer_share,
    sigma,
    learn_spread,
    neuron,
    history,
    seed,
):
    """From a given state (membranes and spike history that require grad), chunk by chunk
    with the state detached at each boundary: the same spikes and the same gradients of
    ``Σ spikes·g`` with respect to the input, the parameters and the initial state as the
    reference path (float64)."""
    cuts = data.draw(cut_points(steps), label="cuts")
    current, mask, g = draw_current_and_mask(steps, batch, size, seed)
    options = dict(
        max_delay=max_delay,
        integer_share=integer_share,
        sigma=sigma,
        learn_spread=learn_spread,
        neuron=neuron,
        dropout=0.3,
        seed=seed,
        # a layer's only delay at 0 (one neuron, or shared) and σ = 0: no recurrence at all
        zero_first=math.prod(SHAPES[delay_type](size)) > 1,
    )
    grad_out = torch.randn(steps, batch, size, generator=g, dtype=torch.float64)
    results = {}
    for path in stateful_paths(delay_type, neuron, integer=False, grad=True):
        layer = random_layer(size, delay_type, path, **options)
        x = current.clone().requires_grad_()
        v, past = random_state(batch, size, history, seed)
        start = DelRecState((v,), past, mask)
        spikes, _ = in_chunks(layer, x, cuts, start)
        params = [p for p in (layer.weight, layer.delay, layer.spread_logits) if p is not None]
        inputs = [x, v, past, *params]
        grads = torch.autograd.grad((spikes * grad_out).sum(), inputs, allow_unused=True)
        grads = [torch.zeros_like(i) if d is None else d for i, d in zip(inputs, grads)]
        results[path] = spikes, grads
    expected_spikes, expected_grads = results.pop("reference")
    assert results, "no fast path ran"
    names = ["current", "v", "history", "weight", "delay", "spread"]
    # a draw whose recurrence reaches no step of the loss (two steps, no history) is left out:
    # the weight and delay gradients compared must not be all zero (with none left, hypothesis
    # fails the test: Unsatisfiable)
    assume(all(bool(expected.ne(0).any()) for expected in expected_grads[3:5]))
    for path, (spikes, grads) in results.items():
        assert torch.equal(spikes, expected_spikes), path
        for name, actual, expected in zip(names, grads, expected_grads):
            assert_grad_close(f"{path} {name}", actual, expected)


def test_truncation_cuts_the_gradient_at_the_boundary_and_only_there():
    """A spike that reaches the second chunk only through the recurrence: with one pass its
    gradient reaches the first chunk's input, with chunks (the returned state carries no
    gradient) it does not; the gradient of the second chunk's own input is the same."""
    layer = DelRec(2, LIF(tau=2.0, v_reset=0.0), delay_init=0.0, learn_delays=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0.0], [3.0, 0.0]], dtype=torch.float64))
    x = torch.zeros(6, 1, 2, dtype=torch.float64)
    x[2, 0, 0] = 2.0  # neuron 0 fires at t = 2, neuron 1 at t = 3
    x[4, 0, 1] = 1.5  # and neuron 1 on its own at t = 4
    x.requires_grad_()
    whole = layer(x)
    (whole_grad,) = torch.autograd.grad(whole[3:, 0, 1].sum(), x)
    first, state = layer(x[:3], return_state=True)
    second = layer(x[3:], state)
    assert torch.equal(torch.cat([first, second]), whole)
    assert state.spikes.requires_grad is False and state.neuron[0].requires_grad is False
    (chunk_grad,) = torch.autograd.grad(second[:, 0, 1].sum(), x)
    assert whole_grad[2, 0, 0] != 0 and chunk_grad[:3].abs().sum() == 0
    torch.testing.assert_close(chunk_grad[3:], whole_grad[3:], rtol=0, atol=0)


def test_history_input_is_what_the_reference_replays():
    """The recurrent input a history sends into the next steps, computed directly (the LIF
    paths' correction), equals the direct sum over lags of the kernel."""
    g = torch.Generator().manual_seed(3)
    n, batch, past, steps = 4, 2, 9, 12
    weight = torch.randn(n, n, generator=g, dtype=torch.float64)
    history = (torch.rand(past, batch, n, generator=g) < 0.5).double()
    for kernel in (
        torch.rand(n, 8, generator=g, dtype=torch.float64),
        torch.rand(n, n, 8, generator=g, dtype=torch.float64),
    ):
        got = history_input(history, weight, kernel, steps)
        want = torch.zeros(steps, batch, n, dtype=torch.float64)
        for t in range(steps):
            for k in range(1, kernel.shape[-1]):
                if 0 < k - t <= past:
                    s = history[past - (k - t)]
                    if kernel.dim() == 2:
                        want[t] += (s * kernel[:, k]) @ weight.t()
                    else:
                        want[t] += s @ (weight * kernel[..., k]).t()
        assert got.shape[0] == kernel.shape[-1] - 1 and want[got.shape[0] :].abs().sum() == 0
        torch.testing.assert_close(got, want[: got.shape[0]], rtol=1e-12, atol=1e-12)


def test_next_history_keeps_the_last_steps_and_pads_with_zeros():
    past = torch.arange(1.0, 4.0).view(3, 1, 1)
    new = torch.tensor([4.0, 5.0]).view(2, 1, 1)
    assert next_history(past, new, 4).flatten().tolist() == [2.0, 3.0, 4.0, 5.0]
    assert next_history(past[:0], new, 4).flatten().tolist() == [0.0, 0.0, 4.0, 5.0]
    assert next_history(past, new, 0).shape == (0, 1, 1)


def test_other_neurons_carry_their_whole_state():
    """An AdLIF layer (two state variables) runs the reference path from its state."""
    layer = DelRec(5, AdLIF(tau_u=3.0, tau_w=10.0), delay_init="uniform:0:4", sigma=1.5).double()
    x = torch.rand(20, 2, 5, dtype=torch.float64) * 3
    with torch.no_grad():
        whole = layer(x)
        chunked, state = in_chunks(layer, x, [6, 13])
    assert 0 < whole.mean() < 1 and torch.equal(chunked, whole)
    assert len(state.neuron) == 2


def test_a_state_of_the_wrong_shape_is_refused_with_its_shape():
    layer = DelRec(4).double()
    _, state = layer(torch.rand(5, 3, 4, dtype=torch.float64), return_state=True)
    with pytest.raises(ValueError, match=r"\(H, 2, 4\)"):
        layer(torch.rand(5, 2, 4, dtype=torch.float64), state)
    with pytest.raises(TypeError, match="DelRecState"):
        layer(torch.rand(5, 3, 4, dtype=torch.float64), RecurrentState(*state[:2]))
    ffd = FeedforwardDelay(3, 2, kernel_size=4).double()
    with pytest.raises(ValueError, match=r"\(3, 1, 3\)"):
        ffd(torch.rand(5, 1, 3, dtype=torch.float64), torch.zeros(2, 1, 3, dtype=torch.float64))


def test_unbatched_chunks_carry_a_batch_of_one():
    layer = DelRec(4, delay_init="uniform:0:3").double().eval()
    x = torch.rand(12, 4, dtype=torch.float64) * 2
    first, state = layer(x[:5], return_state=True)
    assert first.shape == (5, 4) and state.spikes.shape[1:] == (1, 4)
    assert torch.equal(torch.cat([first, layer(x[5:], state)]), layer(x))


def test_readout_and_feedforward_layers_run_in_chunks():
    x = torch.randn(15, 2, 3, dtype=torch.float64)
    for module in (
        LeakyIntegrator(tau=3.0),
        LeakyIntegrator(tau=3.0, decay_input=True),
        LIF(tau=2.0, v_reset=None),
        FeedforwardDelay(3, 4, kernel_size=5).double(),
    ):
        whole = module(x)
        first, state = module(x[:4], return_state=True)
        second, _ = module(x[4:], state, return_state=True)
        torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------- networks
def chunked_network(net, x, cuts):
    out, spikes, state, start = [], [], None, 0
    for end in [*cuts, x.shape[0]]:
        o, s, state = net.forward_with_spikes(x[start:end], state, return_state=True)
        out.append(o)
        spikes.append(s)
        start = end
    return torch.cat(out), [torch.cat(layer) for layer in zip(*spikes)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task", ["shd", "psmnist", "mackey-glass"])
def test_networks_in_eval_run_in_chunks_exactly(model, task, dtype):
    """Every model and readout of the presets (BatchNorm with running statistics, feedforward
    delays, integer recurrent delays) gives the same spikes and outputs in chunks: to the bit
    in float64 (the compiled readout once added the start's decay after the chunk's sum, 1 ulp
    off), in float32 up to the order in which the BLAS sums a product of another length."""
    cfg = preset_network(
        task, model, hidden_sizes=(10,) * len(preset_network(task).hidden_sizes), ff_delay_window=6
    )
    net = build_network(cfg, seed=1).to(dtype).eval()
    x = (torch.rand(40, 3, cfg.input_size, dtype=dtype) < 0.3).to(dtype) * 4
    with torch.no_grad():
        out, spikes = net.forward_with_spikes(x)
        chunked_out, chunked_spikes = chunked_network(net, x, [1, 9, 10, 23])
    assert sum(float(s.sum()) for s in spikes) > 0
    assert all(torch.equal(a, b) for a, b in zip(chunked_spikes, spikes))
    if dtype == torch.float64:
        assert torch.equal(chunked_out, out), (chunked_out - out).abs().max()
    else:
        torch.testing.assert_close(chunked_out, out, rtol=1e-6, atol=1e-7)


def test_a_network_in_training_keeps_its_recurrent_dropout_masks_across_chunks():
    cfg = NetworkConfig(3, (8, 8), 2, block="dropout", dropout=0.0, recurrent_dropout=0.5)
    net = build_network(cfg, seed=0).double().train()
    for module in net.modules():
        if isinstance(module, DelRec):
            module.sigma.fill_(2.0)
    x = torch.rand(30, 2, 3, dtype=torch.float64) * 4
    torch.manual_seed(5)
    with torch.no_grad():
        out, spikes = net.forward_with_spikes(x)
    torch.manual_seed(5)
    with torch.no_grad():
        chunked_out, chunked_spikes = chunked_network(net, x, [7, 20])
    assert all(torch.equal(a, b) for a, b in zip(chunked_spikes, spikes))
    torch.testing.assert_close(chunked_out, out, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- odd states
@pytest.mark.parametrize("integer", [False, True], ids=["training", "eval"])
@pytest.mark.parametrize("delay_type", ["axonal", "synaptic"])
def test_a_state_of_views_runs_like_its_contiguous_copy(delay_type, integer):
    """A state whose tensors are views (sliced, transposed: what a user builds by hand) runs on
    every stateful path; cpp-ring refused a non-contiguous membrane."""
    neuron = LIF()
    for name in stateful_paths(delay_type, neuron, integer, grad=not integer):
        layer = DelRec(6, neuron, delay_type=delay_type, delay_init="uniform:0:3", engine=name)
        layer.train(not integer).double()
        current = torch.rand(
            8, 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
        )
        with torch.no_grad():
            _, state = layer(current * 1.5, return_state=True)
            (v,) = state.neuron
            views = DelRecState(
                (v.t().contiguous().t(),),
                state.spikes.transpose(0, 1).contiguous().transpose(0, 1),
                state.mask,
            )
            assert not views.neuron[0].is_contiguous() and not views.spikes.is_contiguous()
            expected = layer(current, state)
            assert torch.equal(layer(current, views), expected), name


def test_the_states_mask_is_checked_like_dropout_mask_and_unused_in_eval():
    """A state's mask must hold floats or booleans (an integer one failed in a kernel), and
    recurrent dropout is the identity in eval: a state's mask drops nothing there, though it
    stays with the sequence."""
    torch.manual_seed(0)
    layer = DelRec(8, delay_init=0.0, recurrent_dropout=0.5).double()
    current = torch.rand(6, 2, 8, dtype=torch.float64) * 1.5
    _, state = layer(current, return_state=True)
    assert state.mask is not None and (state.mask == 0).any()
    integer = state._replace(mask=torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="state.mask must hold floats .* got torch.int64"):
        layer(current, integer)
    layer.eval()
    spikes, after = layer(current, state, return_state=True)
    assert torch.equal(spikes, layer(current, state._replace(mask=None)))
    assert torch.equal(after.mask, state.mask)
    layer.train()
    assert not torch.equal(layer(current, state), layer(current, state._replace(mask=None)))
    # a state made in eval mode carries no mask: in training it gets the layer's fresh draw
    _, made_in_eval = layer.eval()(current, return_state=True)
    assert made_in_eval.mask is None
    _, continued = layer.train()(current, made_in_eval, return_state=True)
    assert continued.mask is not None and (continued.mask == 0).any()


def test_a_state_whose_history_the_grown_delays_outreach_is_refused():
    """A state keeps as many steps of spikes as the delays reached when it was made. Delays
    that grew since (an optimizer step between chunks) reach older spikes the state no longer
    holds: refused, where they counted as 0 without a word. A state of a sequence shorter
    than its history, or one made by hand (steps unknown), runs as before."""
    torch.manual_seed(0)
    layer = DelRec(8, delay_init=1.0).double()
    current = torch.rand(24, 2, 8, dtype=torch.float64) * 2
    _, state = layer(current[:12], return_state=True)
    assert state.steps == 12 and state.spikes.shape[0] < 12
    _, later = layer(current[12:16], state, return_state=True)
    assert later.steps == 16
    with torch.no_grad():
        layer.delay.fill_(7.6)
    with pytest.raises(
        ValueError,
        match=r"keeps the spikes of the last 3 steps of a sequence 12 steps in, but the delays "
        r"of DelRec\(8\) now reach 1\d steps back",
    ):
        layer(current[12:], state)
    layer(current[12:], state._replace(steps=None))  # made by hand: not known, runs
    _, short = DelRec(8, delay_init=1.0).double()(current[:2], return_state=True)
    assert short.steps == 2 and short.spikes.shape[0] == 2
    layer(current[2:], short)  # it holds the whole sequence so far


@pytest.mark.parametrize("delay_type", ["axonal", "synaptic", "shared"])
def test_a_state_made_in_eval_continues_in_training(delay_type):
    """Warm up in eval (integer delays), then train on the rest of the sequence: the eval state
    keeps as many steps of spikes as the training kernels reach (σ > 0, a delay rounded down),
    so training continues from it, with the spikes the reference loop gives from that state.
    The eval state used to keep only the integer delays' reach and was refused."""
    torch.manual_seed(1)
    layer = DelRec(6, delay_type=delay_type, delay_init="uniform:0:4", sigma=3.0).double()
    current = torch.rand(30, 2, 6, dtype=torch.float64) * 2
    layer.eval()
    with torch.no_grad():
        warm, state = layer(current[:20], return_state=True)
    reach = math.ceil(float(layer.delay.detach().max()) + 1 + 1 + 3.0)  # the spread kernel's L - 1
    assert state.spikes.shape[0] >= min(20, reach)
    assert torch.equal(state.spikes, warm[20 - state.spikes.shape[0] :])
    layer.train()
    fast = layer(current[20:], state)
    reference = DelRec(6, delay_type=delay_type, delay_init=0.0, sigma=3.0, engine="reference")
    reference = reference.double()
    reference.load_state_dict(layer.state_dict())
    assert torch.equal(fast, reference(current[20:], state))
    fixed = DelRec(6, delay_type=delay_type, delay_init="uniform:0:4", learn_delays=False)
    fixed = fixed.double().eval()  # real-valued fixed delays: training reaches d + 1, eval round(d)
    with torch.no_grad():
        _, state = fixed(current[:20], return_state=True)
    fixed.train()(current[20:], state)


def test_a_feedforward_delay_layer_takes_one_sequence_like_delrec():
    """``(T, I)`` in, ``(T, O)`` out, its state batched with ``B = 1``, as DelRec does; it used
    to be refused."""
    torch.manual_seed(0)
    layer = FeedforwardDelay(4, 3, kernel_size=5).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    assert torch.equal(layer(x), layer(x[:, None])[:, 0])
    head, state = layer(x[:7], return_state=True)
    assert state.shape == (4, 1, 4)
    assert torch.equal(torch.cat([head, layer(x[7:], state)]), layer(x))
    with pytest.raises(ValueError, match=r"expects \(T, B, 4\) or \(T, 4\), got \(12, 5\)"):
        layer(torch.randn(12, 5, dtype=torch.float64))
