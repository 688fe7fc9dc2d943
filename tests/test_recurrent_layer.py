"""The DelRec layer (reference semantics): timing, gradients, eval mode, dropout, variants."""

import copy
import re

import pytest
import torch
from engine_harness import assert_grad_close
from torch import nn

from delrec.layers import DelRec, clamp_delays, set_spread
from delrec.neurons import LIF, ATan, as_neuron


def pulse(T, B, N, events, dtype=torch.float64):
    """Input current that is 1.0 at each (t, b, n) of ``events`` and 0 elsewhere."""
    x = torch.zeros(T, B, N, dtype=dtype)
    for t, b, n in events:
        x[t, b, n] = 1.0
    return x


def hard_lif():
    return LIF(tau=2.0, v_threshold=1.0, v_reset=0.0)


def layer_with(weight, delay, delay_type="axonal", **kwargs):
    layer = DelRec(
        weight.shape[0], hard_lif(), delay_type=delay_type, delay_init=0.0, **kwargs
    ).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.delay.copy_(delay)
    return layer


@pytest.mark.parametrize("mode", ["eval", "train-sigma0"])
@pytest.mark.parametrize("d", [0, 1, 3, 7, 12])
def test_axonal_spike_arrives_one_plus_d_steps_later(d, mode):
    weight = torch.zeros(3, 3, dtype=torch.float64)
    weight[2, 0] = 1.0  # neuron 0 → neuron 2
    layer = layer_with(weight, torch.tensor([float(d), 0.0, 0.0]))
    layer.train(mode != "eval")
    spikes = layer(pulse(25, 1, 3, [(4, 0, 0)]))
    assert spikes[:, 0, 0].nonzero().flatten().tolist() == [4]
    assert spikes[:, 0, 2].nonzero().flatten().tolist() == [4 + 1 + d]


def test_synaptic_delays_are_per_connection():
    weight = torch.zeros(4, 4, dtype=torch.float64)
    weight[1:, 0] = 1.0  # neuron 0 → neurons 1, 2, 3
    delay = torch.zeros(4, 4, dtype=torch.float64)
    delay[1, 0], delay[2, 0], delay[3, 0] = 0.0, 5.0, 9.0
    layer = layer_with(weight, delay, delay_type="synaptic").eval()
    spikes = layer(pulse(20, 1, 4, [(2, 0, 0)]))
    assert [spikes[:, 0, i].nonzero().flatten().tolist() for i in range(4)] == [[2], [3], [8], [12]]


def test_self_connected_neuron_fires_every_one_plus_d_steps():
    layer = layer_with(torch.ones(1, 1, dtype=torch.float64), torch.tensor([4.0])).eval()
    spikes = layer(pulse(23, 1, 1, [(0, 0, 0)]))
    assert spikes.flatten().nonzero().flatten().tolist() == [0, 5, 10, 15, 20]


def test_shared_delay_applies_to_every_connection():
    weight = torch.zeros(3, 3, dtype=torch.float64)
    weight[2, 0] = weight[2, 1] = 1.0
    layer = layer_with(weight, torch.tensor([6.0]), delay_type="shared").eval()
    spikes = layer(pulse(20, 2, 3, [(1, 0, 0), (3, 1, 1)]))
    assert spikes[:, 0, 2].nonzero().flatten().tolist() == [8]
    assert spikes[:, 1, 2].nonzero().flatten().tolist() == [10]


def test_eval_rounds_delays_and_drops_the_spread_without_touching_parameters():
    torch.manual_seed(0)
    layer = DelRec(
        6, delay_init="uniform:0:8", learn_spread=True, sigma=3.0, recurrent_dropout=0.3
    ).double()
    with torch.no_grad():
        layer.spread_logits.normal_()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.rand(40, 3, 6, dtype=torch.float64) * 1.6
    evaluated = layer.eval()(x)
    after = layer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    rounded = DelRec(6, delay_init=0.0, sigma=0.0).double().train()
    with torch.no_grad():
        rounded.weight.copy_(layer.weight)
        rounded.delay.copy_(layer.delay.round())
    assert torch.equal(evaluated, rounded(x))
    layer.integer_eval = False  # eval with the spread kernel
    assert not torch.equal(layer(x), evaluated)


class SmoothNeuron(nn.Module):
    """A user-written neuron with a smooth spike function, so finite differences are meaningful."""

    def initial_state(self, like):
        return (torch.zeros_like(like),)

    def step(self, u, state):
        v = 0.6 * state[0] + u
        s = torch.sigmoid(3.0 * (v - 1.0))
        return s, (v - s,)


@pytest.mark.parametrize(
    "delay_type,learn_spread",
    [("axonal", False), ("axonal", True), ("synaptic", True), ("shared", False)],
)
def test_gradients_match_finite_differences(delay_type, learn_spread):
    """Smooth-neuron path: the whole layer (kernel, buffer, dropout) by finite differences.

    Delays are non-integer so no kernel kink lies within the finite-difference step; the
    kink convention itself is checked in test_delays.py.
    """
    torch.manual_seed(1)
    layer = DelRec(
        4,
        SmoothNeuron(),
        delay_type=delay_type,
        delay_init="uniform:0.1:5.9",
        learn_spread=learn_spread,
        sigma=1.7,
    ).double()
    mask = torch.tensor([[2.0, 0.0, 2.0, 2.0], [2.0, 2.0, 0.0, 2.0]], dtype=torch.float64)
    x = torch.rand(12, 2, 4, dtype=torch.float64, requires_grad=True)
    if learn_spread:
        with torch.no_grad():
            layer.spread_logits.normal_()
    names = [name for name, p in layer.named_parameters() if p.requires_grad]

    def run(x, *values):
        return torch.func.functional_call(
            layer, dict(zip(names, values)), (x,), {"dropout_mask": mask}
        )

    inputs = (x, *[getattr(layer, n).detach().clone().requires_grad_() for n in names])
    assert torch.autograd.gradcheck(run, inputs, atol=1e-6, rtol=1e-5)


def test_real_lif_gradients_reach_every_parameter():
    """A float32 layer with learned spreads: every parameter gets a non-zero gradient, the one
    the reference engine gives (float32 tolerance, tests/engine_harness.py)."""
    torch.manual_seed(2)
    layer = DelRec(
        8, LIF(surrogate=ATan(2.0)), delay_init="uniform:0:6", learn_spread=True, sigma=2.0
    )
    x = torch.rand(30, 4, 8) * 1.5
    layer(x).sum().backward()
    reference = copy.deepcopy(layer)
    reference.engine = "reference"
    reference.zero_grad()
    reference(x).sum().backward()
    for name in ("weight", "delay", "spread_logits"):
        grad = getattr(layer, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert_grad_close(name, grad, getattr(reference, name).grad)


def test_recurrent_dropout_mask_is_drawn_per_sequence_and_fixed_over_time():
    class AlwaysFires(nn.Module):
        def initial_state(self, like):
            return ()

        def step(self, u, state):
            self.currents.append(u)
            return torch.ones_like(u), state

    neuron = AlwaysFires()
    neuron.currents = []
    layer = DelRec.vanilla(64, neuron, recurrent_dropout=0.5).train()
    with torch.no_grad():
        layer.weight.fill_(1.0 / 64)  # exact in binary
    layer(torch.zeros(6, 4, 64))
    recurrent = torch.stack(neuron.currents[1:])  # r[t] = W·1 = 1 for t ≥ 1
    assert torch.all(recurrent == recurrent[0])  # same mask at every step
    assert set(recurrent.unique().tolist()) == {0.0, 2.0}  # Bernoulli(1-p)/(1-p)
    assert not torch.equal(recurrent[0, 0], recurrent[0, 1])  # one mask per sample
    neuron.currents = []
    layer.eval()(torch.zeros(6, 4, 64))
    assert torch.equal(torch.stack(neuron.currents[1:]), torch.ones(5, 4, 64))


def test_variants_and_constraints():
    vanilla = DelRec.vanilla(5)
    assert not vanilla.delay.requires_grad and torch.all(vanilla.delay == 0)
    fixed = DelRec.fixed(5, delay_init="uniform:0:20")
    assert not fixed.delay.requires_grad and torch.equal(fixed.delay, fixed.delay.round())
    learned = DelRec(5, delay_init="uniform:0:20")
    assert learned.delay.requires_grad and not torch.equal(learned.delay, learned.delay.round())
    shared = DelRec(5, delay_type="shared")
    assert shared.delay.shape == (1,)
    model = nn.Sequential(vanilla, fixed, learned)
    set_spread(model, 4.0)
    assert [float(m.sigma) for m in model] == [0.0, 0.0, 4.0]
    with torch.no_grad():
        learned.delay[0] = -2.0
    clamp_delays(model)
    assert learned.delay.min() >= 0


def test_unbatched_input_matches_a_batch_of_one():
    torch.manual_seed(3)
    layer = DelRec(5, delay_init="uniform:0:4", sigma=1.0)
    x = torch.rand(20, 5) * 2
    assert torch.equal(layer(x), layer(x.unsqueeze(1)).squeeze(1))


def test_bad_inputs_get_clear_errors():
    layer = DelRec(5)
    with pytest.raises(ValueError, match=r"time-major input current \(T, B, 5\)"):
        layer(torch.zeros(10, 3, 4))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.zeros(10, 3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="dropout_mask"):
        layer(torch.zeros(10, 3, 5), dropout_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="recurrent dropout mask holds -2: a dropout mask keeps"):
        layer(torch.zeros(10, 3, 5), dropout_mask=torch.tensor([1.0, 0.0, -2.0]).repeat(5, 1).T)
    with pytest.raises(ValueError, match="delay_type"):
        DelRec(5, delay_type="dendritic")
    with pytest.raises(ValueError, match="recurrent_dropout"):
        DelRec(5, recurrent_dropout=1.0)
    with pytest.raises(TypeError, match="not a neuron model"):
        DelRec(5, nn.Tanh())


@pytest.mark.parametrize(
    "delay_type, name, shape",
    [
        ("axonal", "weight", (4, 4)),
        ("axonal", "delay", (5, 5)),
        ("synaptic", "delay", (5,)),
        ("shared", "delay", (5,)),
        ("axonal", "spread_logits", (4,)),
        ("axonal", "sigma", (5,)),
    ],
)
def test_a_tensor_replaced_by_hand_with_another_shape_is_named(delay_type, name, shape):
    """Not a bare broadcast error from inside an engine."""
    layer = DelRec(5, delay_type=delay_type, learn_spread=name == "spread_logits")
    setattr(layer, name, nn.Parameter(torch.rand(shape), requires_grad=False))
    expected = re.escape(f"DelRec(5).{name} has shape {shape}, the layer's is")
    with pytest.raises(ValueError, match=expected):
        layer(torch.zeros(10, 3, 5))


@pytest.mark.parametrize("engine", ["auto", "reference"])
def test_a_tensor_replaced_by_hand_with_another_dtype_is_named(engine):
    """A float64 delay in a float32 layer ran on the C++ engines and failed on the others
    with a bare "expected scalar type" error."""
    layer = DelRec(6, delay_type="synaptic", engine=engine)
    layer.delay = nn.Parameter(layer.delay.detach().double())
    expected = re.escape("DelRec(6).delay is torch.float64, the layer's weight torch.float32")
    with pytest.raises(ValueError, match=expected):
        layer(torch.randn(10, 2, 6))


def test_an_adaptive_spikingjelly_node_keeps_its_adaptation_between_steps():
    """Resetting the whole node after each step (to drop the membrane's graph) also zeroed an
    adaptive node's w: an Izhikevich node then fired 80 spikes instead of 56."""
    sj = pytest.importorskip(
        "spikingjelly.activation_based.neuron",
        reason="optional dependency spikingjelly is not installed",
    )
    node = sj.IzhikevichNode(tau=2.0, v_c=0.8, a0=1.0, v_threshold=1.0, a=1.0, b=0.1, tau_w=10.0)
    neuron = as_neuron(node)
    u = torch.full((1, 4), 2.0)
    state, total = neuron.initial_state(u), 0.0
    for _ in range(40):
        spikes, state = neuron.step(u, state)
        total += float(spikes.sum())
    assert total == 56 and torch.allclose(node.w, torch.full((1, 4), 1.0984), atol=1e-4)
    assert not torch.is_tensor(node.v)  # the membrane itself is handed back, not kept


def test_spikingjelly_node_works_in_the_layer_and_matches_our_lif():
    sj = pytest.importorskip(
        "spikingjelly.activation_based.neuron",
        reason="optional dependency spikingjelly is not installed",
    )
    surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    torch.manual_seed(4)
    ours = DelRec(
        6,
        LIF(tau=2.0, v_reset=0.0, detach_reset=True, surrogate=ATan(2.0)),
        delay_init="uniform:0:5",
        sigma=1.5,
    ).double()
    theirs = DelRec(
        6,
        sj.LIFNode(
            tau=2.0,
            v_reset=0.0,
            detach_reset=True,
            decay_input=False,
            surrogate_function=surrogate.ATan(alpha=2.0),
        ),
        delay_init=0.0,
        sigma=1.5,
    ).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.rand(25, 3, 6, dtype=torch.float64) * 1.5
    s_ours, s_theirs = ours(x), theirs(x)
    assert s_ours.sum() > 0 and torch.equal(s_ours, s_theirs)
    # the node holds no membrane between calls: it kept the last one with its graph, and a
    # deepcopy of the layer failed ("Only Tensors created explicitly by the user …")
    assert not torch.is_tensor(theirs.neuron.node.v)
    copied = copy.deepcopy(theirs)
    assert torch.equal(copied(x), s_theirs)
    s_ours.sum().backward()
    s_theirs.sum().backward()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad)


@pytest.mark.parametrize("delay_type", ["axonal", "synaptic", "shared"])
def test_one_step_gives_zero_parameter_gradients_on_every_engine(delay_type):
    """With T = 1 no recurrent spike arrives: every engine gives zero gradients for the
    recurrent parameters (the reference gave None, which an optimizer treats differently)."""
    current = torch.rand(1, 2, 4) * 3
    for engine in ("reference", "auto"):
        layer = DelRec(4, delay_type=delay_type, engine=engine, learn_spread=True, sigma=1.0)
        layer(current).sum().backward()
        for name, parameter in layer.named_parameters():
            assert parameter.grad is not None, (engine, name)
            assert not parameter.grad.any(), (engine, name)


def test_frozen_delays_refuse_a_spread_they_would_ignore():
    for spread in (dict(sigma=5.0), dict(learn_spread=True)):
        with pytest.raises(ValueError, match="learn_delays=False .* would do nothing"):
            DelRec(4, learn_delays=False, **spread)
        DelRec(4, **spread)  # learned delays take it


def test_the_delays_follow_the_default_dtype():
    """Under torch.set_default_dtype(torch.float64) the delays are float64 like the weights, so
    a chunk from a returned state runs on every engine."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x = torch.rand(12, 2, 8, generator=torch.Generator().manual_seed(0)) * 2
        for delay_type in ("axonal", "synaptic", "shared"):
            layer = DelRec(8, delay_type=delay_type)
            assert layer.delay.dtype == layer.weight.dtype == torch.float64
            whole = layer(x)
            first, state = layer(x[:5], return_state=True)
            assert torch.equal(torch.cat([first, layer(x[5:], state)]), whole)
    finally:
        torch.set_default_dtype(previous)


def test_delays_below_zero_in_a_forward_warn_once_per_layer():
    """An optimizer step not followed by clamp_delays: training would cut the synapses of a
    delay <= -1 (and their gradients) where eval rounds it to 0; said once per layer."""
    import warnings

    from delrec.delays import DelayLimitWarning

    x = torch.rand(10, 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    layer = DelRec(6).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # delays in range: nothing said
    with torch.no_grad():
        layer.delay[0] = -2.0
    with pytest.warns(DelayLimitWarning, match=r"DelRec\(6\) go down to -2 steps.*clamp_delays"):
        layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # said once
    clamp_delays(layer)
    assert float(layer.delay.detach().min()) == 0.0


@pytest.mark.parametrize("delay_type", ["axonal", "synaptic", "shared"])
def test_a_weight_set_by_hand_gets_its_gradient_with_the_parameters_frozen(delay_type):
    """A hypernetwork's weight tensor in place of the parameter, in eval mode with every
    parameter frozen: the layer still takes a gradient path, and the weight's gradient is the
    reference engine's (it was silently lost on the no-gradient path)."""
    g = torch.Generator().manual_seed(3)
    current = torch.rand(12, 2, 6, generator=g, dtype=torch.float64) * 2
    source = torch.randn(6, 6, generator=g, dtype=torch.float64) * 0.5
    base = DelRec(6, delay_type=delay_type, delay_init="uniform:0:8", max_delay=8, generator=g)
    base = base.double().eval()
    grads = {}
    for engine in ("reference", "auto"):
        layer = copy.deepcopy(base).requires_grad_(False)
        layer.engine = engine
        del layer.weight
        weight = source.clone().requires_grad_()
        layer.weight = weight * 1.0  # a plain tensor computed from another
        (layer(current) * torch.arange(12.0, dtype=torch.float64).view(12, 1, 1)).sum().backward()
        assert weight.grad is not None and weight.grad.any(), engine
        grads[engine] = weight.grad
    assert_grad_close("weight", grads["auto"], grads["reference"])


def test_a_dropout_mask_that_requires_grad_is_refused():
    """The engines take the recurrent dropout mask as a constant: a mask that requires grad
    would silently get none, so it is refused with the fix (pass it detached)."""
    layer = DelRec(5).train()
    mask = torch.ones(3, 5, requires_grad=True)
    with pytest.raises(ValueError, match=r"dropout_mask requires grad, .* dropout_mask.detach\(\)"):
        layer(torch.rand(4, 3, 5), dropout_mask=mask)
    layer(torch.rand(4, 3, 5), dropout_mask=mask.detach())
    with torch.no_grad():
        layer(torch.rand(4, 3, 5), dropout_mask=mask)


@pytest.mark.parametrize("engine", ["reference", "auto"])
def test_autocast_leaves_every_engine_in_the_layers_dtype(engine):
    """Under bfloat16 autocast every engine gives the float32 spikes and gradients it gives
    without (the reference engine's products ran in bfloat16), and a bfloat16 input from a
    Linear under autocast is taken in the layer's dtype. The backward runs after the autocast
    block, as torch.amp prescribes."""
    from delrec.layers import FeedforwardDelay

    g = torch.Generator().manual_seed(5)
    x = torch.rand(30, 3, 16, generator=g) * 2
    for layer in (
        DelRec(16, delay_init="uniform:0:8", engine=engine, generator=g),
        FeedforwardDelay(16, 4, kernel_size=6, generator=g, engine=engine),
    ):
        plain = layer(x)
        (grad,) = torch.autograd.grad(plain.sum(), layer.weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = layer(x)
            half = layer(x.bfloat16())
        (mixed_grad,) = torch.autograd.grad(mixed.sum(), layer.weight)  # as AMP does: outside
        assert mixed.dtype == half.dtype == torch.float32
        assert torch.equal(mixed, plain) and torch.equal(mixed_grad, grad)
        assert torch.equal(half, layer(x.bfloat16().float()))


def test_torch_func_transforms_fail_as_layer_md_says():
    """docs/layer.md names the errors of ``torch.func`` transforms; they stay as it says."""
    layer = DelRec(4, delay_init="uniform:0:3")
    x = torch.randn(5, 2, 4)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda c: layer(c).sum())(x)
    with pytest.raises(RuntimeError, match="data-dependent control flow"):
        torch.func.vmap(layer, in_dims=1, out_dims=1)(x)


def test_delays_given_as_a_tensor_and_a_size_given_as_one():
    """``delay_init`` takes the delays themselves as a tensor of the layer's delay shape; a size
    given as a tensor is named as such (both were "unknown"/"not a whole number" alone)."""
    layer = DelRec(4, delay_init=torch.tensor([0.0, 1.5, 2, 3]))
    assert torch.equal(layer.delay.detach(), torch.tensor([0.0, 1.5, 2, 3]))
    synaptic = torch.rand(3, 3) * 5
    layer = DelRec(3, delay_type="synaptic", delay_init=synaptic)
    assert torch.equal(layer.delay.detach(), synaptic)
    with pytest.raises(ValueError, match=r"tensor of shape \(3,\), but the layer's delays are"):
        DelRec(4, delay_init=torch.tensor([0.0, 1, 2]))
    with pytest.raises(ValueError, match="out of range"):
        DelRec(2, delay_init=torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match=r"a Python int: int\(\.\.\.\) of the tensor"):
        DelRec(torch.tensor(4))


def test_warnings_name_the_line_that_called_the_layer():
    """A warning raised inside a forward, a constructor or a load names the user's line, not
    torch's ``Module.__call__`` or a line of delrec (``delrec.user_warnings``)."""
    from delrec.layers import FeedforwardDelay

    layer = DelRec(4, delay_init=1.0)
    with torch.no_grad():
        layer.delay.fill_(-0.5)
    feedforward = FeedforwardDelay(3, 3, kernel_size=5)
    saved = feedforward.state_dict()
    saved["position"] = saved["position"] + 10
    calls = {
        "forward": lambda: layer(torch.randn(5, 2, 4)),
        "constructor": lambda: DelRec(4, delay_init=9.0, max_delay=3),
        "load_state_dict": lambda: feedforward.load_state_dict(saved),
    }
    for name, call in calls.items():
        with pytest.warns(Warning) as record:
            call()
        delay_warnings = [w for w in record if "delay" in w.category.__name__.lower()]
        assert delay_warnings, name
        assert all(w.filename == __file__ for w in delay_warnings), (name, delay_warnings)
