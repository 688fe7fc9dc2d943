"""The two-tap feedforward-delay paths against the reference convolution, and against DCLS.

Every two-tap path (C++ kernels, PyTorch sparse ops) must give the reference's output and every
gradient (input, weight, position, bias) to 1e-6 relative in float64, including positions on
the integers (the interpolation's kinks), at the window's ends and outside it. The C++ kernels
are checked in both their versions: the one built for this CPU (AVX-512 where it has them) and
the portable vectors that CPUs without AVX-512 run (built without AVX-512 here if need be).
"""

import math
import re
import warnings

import pytest
import torch
from engine_harness import assert_close_relative, assert_grad_close
from hypothesis import given, settings
from hypothesis import strategies as st

from delrec.bench import saved_bytes
from delrec.delays import DelayLimitWarning
from delrec.engine import feedforward as engines
from delrec.engine import native
from delrec.layers import FeedforwardDelay
from delrec.models import build_network, preset_network

TWO_TAPS = ("cpp-feedforward", "torch-feedforward")
PORTABLE = "cpp-feedforward, portable vectors"


def portable_kernels():
    """The C++ kernels as a CPU without AVX-512 runs them: the default build where it is
    portable already, else a build without AVX-512 (x86)."""
    kernels = native.build("feedforward")
    if kernels.simd != "portable":
        kernels = native.build("feedforward", native.PORTABLE)
    assert kernels.simd == "portable"
    return kernels


PATHS = {
    **engines.PATHS,
    PORTABLE: engines.FeedforwardPath(
        PORTABLE,
        engines._two_taps(lambda: engines._NativeTaps(portable_kernels())),
        lambda device: device.type == "cpu",
    ),
}
KERNELS = (*TWO_TAPS, PORTABLE)  # every two-tap implementation, the C++ in both versions


def run(path, x, weight, position, bias, kernel_size, grad_y):
    """Output and the gradients of ``Σ y·grad_y`` with respect to every input that needs one."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, weight, position)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    y = PATHS[path].run(*inputs, b, kernel_size)
    (y * grad_y).sum().backward()
    grads = [t.grad for t in inputs if t.requires_grad] + ([] if b is None else [b.grad])
    return [y.detach(), *grads]


def assert_paths_match_reference(x, weight, position, bias, kernel_size):
    """Output and every gradient entry by entry at the engine harness's tolerance for the dtype
    (``assert_grad_close``)."""
    grad_y = torch.randn(x.shape[0], x.shape[1], weight.shape[0], dtype=x.dtype)
    expected = run("reference", x, weight, position, bias, kernel_size, grad_y)
    for path in KERNELS:
        actual = run(path, x, weight, position, bias, kernel_size, grad_y)
        assert len(actual) == len(expected)
        for name, a, e in zip(["output", "x", "weight", "position", "bias"], actual, expected):
            assert_grad_close(f"{path}: {name}", a, e)


def kink_positions(kernel_size: int) -> list[float]:
    """Integers inside and just outside the window, its ends, and points next to them."""
    ends = [0.0, kernel_size - 1.0, -1.0, float(kernel_size), -0.5, kernel_size - 0.5]
    inner = [float(k) for k in range(kernel_size)] + [k + 0.5 for k in range(kernel_size - 1)]
    near = [k + e for k in (1.0, kernel_size - 2.0) for e in (1e-9, -1e-9)]
    return ends + inner + near + [-3.0, kernel_size + 2.5]


@st.composite
def layers(draw, dtype=torch.float64):
    kernel_size = draw(st.integers(1, 14))
    outputs, inputs = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    steps, batch = draw(st.integers(1, 20)), draw(st.integers(1, 35))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor(kink_positions(kernel_size), dtype=dtype)
    position = torch.empty(outputs, inputs, dtype=dtype).uniform_(
        -1.5, kernel_size + 0.5, generator=g
    )
    pick = torch.rand(outputs, inputs, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    position[pick] = special[torch.randint(len(special), (int(pick.sum()),), generator=g)]
    weight = torch.randn(outputs, inputs, dtype=dtype, generator=g)
    bias = torch.randn(outputs, dtype=dtype, generator=g) if draw(st.booleans()) else None
    x = torch.randn(steps, batch, inputs, dtype=dtype, generator=g)
    return x, weight.requires_grad_(), position.requires_grad_(), bias, kernel_size


@settings(max_examples=150, deadline=None, derandomize=True)
@given(layers())
def test_two_tap_paths_match_the_convolution_float64(layer):
    x, weight, position, bias, kernel_size = layer
    x.requires_grad_()
    assert_paths_match_reference(x, weight, position, bias, kernel_size)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(layers(dtype=torch.float32))
def test_two_tap_paths_match_the_convolution_float32(layer):
    x, weight, position, bias, kernel_size = layer
    x.requires_grad_()
    assert_paths_match_reference(x, weight, position, bias, kernel_size)


def test_transposed_parameters_run_on_every_path():
    """Weights and positions stored transposed (a view of an (I, O) tensor: what an exchange
    format or a hand-made layer may give) were refused by the C++ kernels with a bare error."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(12, 3, 5, dtype=torch.float64, generator=generator).requires_grad_()
    weight = torch.randn(5, 4, dtype=torch.float64, generator=generator).t().requires_grad_()
    position = (6 * torch.rand(5, 4, dtype=torch.float64, generator=generator)).t()
    bias = torch.randn(4, dtype=torch.float64, generator=generator)
    assert not weight.is_contiguous() and not position.clone().is_contiguous()
    assert_paths_match_reference(x, weight, position.requires_grad_(), bias, 7)


def test_loading_positions_beyond_the_window_warns():
    """Weights and positions have the same shapes whatever the window, so a state dict of a
    wider layer loaded without a word, and its positions beyond the window counted nothing."""
    wide, narrow = FeedforwardDelay(3, 4, 50), FeedforwardDelay(3, 4, 5)
    with torch.no_grad():
        wide.position.fill_(20.0)
        wide.position[0, 0] = 2.0
    network = torch.nn.Sequential(narrow)
    with pytest.warns(
        DelayLimitWarning,
        match=r"11 of the 12 positions loaded into "
        r"FeedforwardDelay\(3, 4, kernel_size=5\) lie at or beyond the window",
    ):
        network.load_state_dict({f"0.{k}": v for k, v in wide.state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        narrow.load_state_dict(FeedforwardDelay(3, 4, 5).state_dict())  # inside: no warning


@pytest.mark.parametrize("kernel_size", [1, 2, 5, 26])
def test_every_kink_and_window_end_in_one_layer(kernel_size):
    """Each output row holds every kink position once, a batch that spans several vectors and
    a sequence longer than the window (window 5: two channel blocks of 16, the last partial)."""
    torch.manual_seed(kernel_size)
    positions = torch.tensor(kink_positions(kernel_size), dtype=torch.float64)
    position = positions.repeat(3, 1).requires_grad_()
    weight = torch.randn(position.shape, dtype=torch.float64).requires_grad_()
    x = torch.randn(kernel_size + 9, 37, position.shape[1], dtype=torch.float64).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64)
    assert_paths_match_reference(x, weight, position, bias, kernel_size)


@pytest.mark.parametrize("kernel_size", [30, 90])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_past_every_blocking_of_the_kernels(dtype, kernel_size):
    """Sizes past the C++ kernels' blockings: several channel blocks (of 32, the delays
    spreading over more than two tiles; the last one partial) in both passes, tiles of 10 steps
    (the last partial), several chunks of steps in
    the dots (window 30; one chunk for the wide spread of delays of window 90), batch rows of one
    and of two vectors (float64 / float32), delays up to the window."""
    torch.manual_seed(4)
    position = torch.empty(37, 45, dtype=dtype).uniform_(-0.5, kernel_size - 0.5)
    position[::5, ::3] = position[::5, ::3].round()  # kinks among them
    weight = torch.randn(37, 45, dtype=dtype).requires_grad_()
    x = torch.randn(83, 19, 45, dtype=dtype).requires_grad_()
    bias = torch.randn(37, dtype=dtype)
    assert_paths_match_reference(x, weight, position.requires_grad_(), bias, kernel_size)


def test_position_gradient_at_the_kinks_is_autograds_convention():
    """One synapse, one input spike: C(j) is the output gradient j steps after the spike, so the
    position gradient is w·(C(k+1) - C(k)) between integers, w·(C(k+1) - C(k-1)) on one, and
    one-sided at the window's ends."""
    kernel_size, w = 5, 2.0
    x = torch.zeros(12, 1, 1, dtype=torch.float64)
    x[0] = 1.0
    grad_y = torch.arange(1.0, 13.0, dtype=torch.float64).pow(2).view(12, 1, 1)  # C(j) = (j+1)²
    c = {j: (j + 1.0) ** 2 if 0 <= j < kernel_size else 0.0 for j in range(-2, 8)}
    expected = {
        0.0: w * c[1],
        2.0: w * (c[3] - c[1]),
        2.5: w * (c[3] - c[2]),
        4.0: -w * c[3],
        4.5: -w * c[4],
        -0.5: w * c[0],
    }
    for p, grad in expected.items():
        for path in ("reference", *KERNELS):
            weight = torch.tensor([[w]], dtype=torch.float64, requires_grad=True)
            position = torch.tensor([[p]], dtype=torch.float64, requires_grad=True)
            y = PATHS[path].run(x, weight, position, None, kernel_size)
            (y * grad_y).sum().backward()
            assert position.grad.item() == pytest.approx(grad, rel=1e-12), (path, p)


@pytest.mark.parametrize("engine", TWO_TAPS)
def test_the_layer_in_eval_rounds_positions_like_the_reference(engine):
    torch.manual_seed(1)
    fast = FeedforwardDelay(6, 4, kernel_size=7, engine=engine).double().eval()
    reference = FeedforwardDelay(6, 4, kernel_size=7, engine="reference").double().eval()
    reference.load_state_dict(fast.state_dict())
    with torch.no_grad():
        fast.position[0, :4] = torch.tensor([0.5, 1.5, 2.5, 6.4])  # ties round to even
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(15, 3, 6, dtype=torch.float64)
    for layer in (fast, reference):
        layer(x).square().sum().backward()
    assert_close_relative(fast(x).detach(), reference(x).detach())
    assert_close_relative(fast.weight.grad, reference.weight.grad)
    assert fast.position.grad is None and reference.position.grad is None


def test_the_temporal_kernel_is_two_taps_around_the_position_and_one_in_eval():
    layer = FeedforwardDelay(2, 1, kernel_size=6, engine="reference").double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0]]))
        layer.position.copy_(torch.tensor([[1.25, 4.5]]))
    expected = torch.zeros(1, 2, 6, dtype=torch.float64)
    expected[0, 0, 1:3] = torch.tensor([0.75 * 2.0, 0.25 * 2.0])
    expected[0, 1, 4:6] = torch.tensor([0.5 * -1.0, 0.5 * -1.0])
    assert torch.equal(layer.temporal_kernel(), expected)
    rounded = torch.zeros(1, 2, 6, dtype=torch.float64)
    rounded[0, 0, 1], rounded[0, 1, 4] = 2.0, -1.0  # 1.25 → 1; 4.5 → 4 (ties to even)
    assert torch.equal(layer.eval().temporal_kernel(), rounded)


@pytest.mark.parametrize("engine", TWO_TAPS)
def test_padding_does_not_leak_backward_in_time(engine):
    """A variable-length batch: sequence b ends at lengths[b]; whatever follows (padding) changes
    neither the outputs before it nor the gradients reaching the steps before it."""
    torch.manual_seed(2)
    layer = FeedforwardDelay(5, 3, kernel_size=6, engine=engine).double()
    lengths = torch.tensor([4, 11, 7])
    steps = torch.arange(12).view(12, 1, 1)
    valid = steps < lengths.view(1, 3, 1)
    x = torch.randn(12, 3, 5, dtype=torch.float64) * valid
    junk = x + torch.randn(12, 3, 5, dtype=torch.float64) * ~valid * 100
    grad_y = torch.randn(12, 3, 3, dtype=torch.float64) * valid
    results = []
    for inputs in (x, junk):
        inputs = inputs.clone().requires_grad_()
        layer.zero_grad()
        y = layer(inputs)
        (y * grad_y).sum().backward()
        results.append((y * valid, inputs.grad, layer.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert (results[0][1][~valid.expand(12, 3, 5)] == 0).all()  # nothing flows into padding
    assert_close_relative(results[1][2], results[0][2], rtol=1e-12)


@pytest.mark.parametrize("shape", [(20, 4, 8), (60, 16, 8)])
@pytest.mark.parametrize("engine", TWO_TAPS)
def test_saved_memory_is_the_input_whatever_the_window(engine, shape):
    """The input, or the C++ kernels' channel-major copy of it where that is at most 1.5 times
    as large (a batch of whole vectors, steps well past the tiles: the second shape)."""
    x = torch.randn(*shape, requires_grad=True)
    saved = []
    for kernel_size in (3, 60):
        layer = FeedforwardDelay(8, 6, kernel_size=kernel_size, engine=engine)
        saved.append(saved_bytes(lambda layer=layer: layer(x)))
    parameters = (2 * 6 * 8 + 6) * 4  # weight and position (the bias is not saved)
    assert saved[0] == saved[1] <= 1.5 * x.numel() * 4 + parameters


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_from_the_forwards_channel_major_copy(dtype):
    """A batch of whole vectors and a long sequence: backward reads the forward's channel-major
    copy of the input (the other tests keep the input itself) and is still exact."""
    torch.manual_seed(7)
    kernel_size = 12
    position = torch.empty(18, 20, dtype=dtype).uniform_(-0.5, kernel_size - 0.5)
    position[::4, ::3] = position[::4, ::3].round()
    weight = torch.randn(18, 20, dtype=dtype).requires_grad_()
    x = torch.randn(70, 16, 20, dtype=dtype).requires_grad_()
    for path in ("cpp-feedforward", PORTABLE):
        y = PATHS[path].run(x, weight, position.requires_grad_(), None, kernel_size)
        assert y.grad_fn.saved_tensors[0].shape != x.shape  # the copy, not x
    assert_paths_match_reference(x, weight, position, torch.randn(18, dtype=dtype), kernel_size)


def test_auto_takes_the_cpp_kernels_on_the_cpu_and_pytorch_ops_without_them(monkeypatch):
    assert native.build("feedforward") is not None  # fails loudly if the kernels don't build
    assert engines.select(torch.device("cpu")).name == "cpp-feedforward"
    monkeypatch.setenv("DELREC_NATIVE", "0")
    assert engines.select(torch.device("cpu")).name == "torch-feedforward"
    with pytest.raises(RuntimeError, match="can't run on cpu"):
        engines.select(torch.device("cpu"), "cpp-feedforward")


@pytest.mark.parametrize("model", ["ffdelay", "ff+rec"])
def test_the_ablation_networks_run_the_two_tap_engine(model, monkeypatch):
    net = build_network(preset_network("shd", model), seed=0)
    layers = [m for m in net.modules() if isinstance(m, FeedforwardDelay)]
    assert layers and all(layer.engine == "auto" for layer in layers)
    ran = []
    original = engines.PATHS["cpp-feedforward"]
    monkeypatch.setitem(
        engines.PATHS,
        "cpp-feedforward",
        engines.FeedforwardPath(
            original.name, lambda *a: ran.append(1) or original.run(*a), original.runs_on
        ),
    )
    net(torch.rand(6, 2, 140))
    assert len(ran) == len(layers)


def test_bad_engine_and_dtype_mix_are_named():
    with pytest.raises(ValueError, match="unknown feedforward-delay engine 'fast'"):
        FeedforwardDelay(2, 2, engine="fast")
    layer = FeedforwardDelay(2, 2)
    with pytest.raises(TypeError, match="must share one dtype"):
        layer(torch.zeros(3, 1, 2, dtype=torch.float64))


@pytest.mark.parametrize("engine", ["reference", *TWO_TAPS])
@pytest.mark.parametrize(
    "name, value, problem",
    [
        ("bias", torch.full((1,), 0.5), "bias has shape (1,), the layer's is (3,)"),
        ("position", torch.rand(4) * 4, "position has shape (4,), the layer's is (3, 4)"),
        ("position", torch.rand(3, 1) * 4, "position has shape (3, 1), the layer's is (3, 4)"),
        ("weight", torch.rand(1, 4), "weight has shape (1, 4), the layer's is (3, 4)"),
        ("bias", torch.zeros(3, dtype=torch.float64), "bias is torch.float64, the layer's"),
    ],
)
def test_a_tensor_replaced_by_hand_with_another_shape_or_dtype_is_named(
    engine, name, value, problem
):
    """Some broadcast: a bias of one value ran on the C++ and sparse paths, a row of positions
    on the reference, each path giving another result; the others failed with bare errors."""
    layer = FeedforwardDelay(4, 3, 5, engine=engine)
    setattr(layer, name, torch.nn.Parameter(value))
    with pytest.raises(ValueError, match=re.escape(f"FeedforwardDelay(4, 3).{problem}")):
        layer(torch.randn(8, 2, 4))


# --------------------------------------------------------------------------- DCLS
def dcls_layer(layer: FeedforwardDelay):
    """The ``DCLS`` package's ``Dcls1d`` (version "v1", one weight and position per synapse)
    holding ``layer``'s parameters: DCLS's tap ``j`` reads ``x[t - (K-1-j)]`` after causal left
    padding ``K-1``, and its positions are centred (``j = P_dcls + K // 2``), so
    ``P_dcls = K - 1 - K // 2 - P``."""
    dcls = pytest.importorskip("DCLS.construct.modules", reason="needs the `dcls` package")
    k = layer.kernel_size
    other = dcls.Dcls1d(
        layer.in_features,
        layer.out_features,
        kernel_count=1,
        dilated_kernel_size=k,
        padding=0,
        bias=layer.bias is not None,
        version="v1",
    ).to(layer.weight.dtype)
    with torch.no_grad():
        other.weight.copy_(layer.weight.unsqueeze(-1))
        other.P.copy_((k - 1 - k // 2 - layer.position).view(1, *layer.weight.shape, 1))
        if layer.bias is not None:
            other.bias.copy_(layer.bias)
    return other


def dcls_forward(other, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    signal = torch.nn.functional.pad(x.permute(1, 2, 0), (kernel_size - 1, 0))
    return other(signal).permute(2, 0, 1)


@pytest.mark.parametrize("kernel_size", [7, 26])
def test_the_layer_computes_what_dcls_computes_inside_the_window(kernel_size):
    """Positions strictly inside the window, off the integers: same output and gradients up to
    DCLS's normalisation (it divides the kernel by its sum + 1e-7; ours sums to 1 there)."""
    torch.manual_seed(3)
    layer = FeedforwardDelay(9, 5, kernel_size=kernel_size).double()
    with torch.no_grad():
        layer.position.uniform_(0.01, kernel_size - 1.01)
    other = dcls_layer(layer)
    x = torch.randn(40, 4, 9, dtype=torch.float64)
    grad_y = torch.randn(40, 4, 5, dtype=torch.float64)
    (layer(x) * grad_y).sum().backward()
    (dcls_forward(other, x, kernel_size) * grad_y).sum().backward()
    rtol = 3e-7  # DCLS's epsilon, 1e-7, relative to a kernel sum of 1
    with torch.no_grad():
        assert_close_relative(layer(x), dcls_forward(other, x, kernel_size), rtol=rtol)
    assert_close_relative(layer.weight.grad, other.weight.grad.squeeze(-1), rtol=rtol)
    assert_close_relative(layer.position.grad, -other.P.grad.view(5, 9), rtol=rtol)
    assert_close_relative(layer.bias.grad, other.bias.grad, rtol=rtol)


def test_at_the_window_ends_dcls_agrees_on_the_output_not_on_the_position_gradient():
    """Positions clamped to the window's ends (0 and K-1): same output; DCLS's position gradient
    is 0 there (ReLU and |·| both flat at their kinks), ours the one-sided difference that can
    move the delay back inside (docs/feedforward-delays.md)."""
    kernel_size = 7
    layer = FeedforwardDelay(1, 2, kernel_size=kernel_size, bias=False).double()
    with torch.no_grad():
        layer.weight.fill_(1.5)
        layer.position.copy_(torch.tensor([[0.0], [kernel_size - 1.0]]))
    other = dcls_layer(layer)
    x = torch.randn(30, 2, 1, dtype=torch.float64)
    grad_y = torch.randn(30, 2, 2, dtype=torch.float64)
    (layer(x) * grad_y).sum().backward()
    (dcls_forward(other, x, kernel_size) * grad_y).sum().backward()
    with torch.no_grad():
        assert_close_relative(layer(x), dcls_forward(other, x, kernel_size), rtol=3e-7)
    assert other.P.grad.abs().max() == 0
    dots = [(grad_y[j:, :, o] * x[: 30 - j, :, 0]).sum() for o, j in ((0, 1), (1, kernel_size - 2))]
    expected = torch.stack([1.5 * dots[0], -1.5 * dots[1]]).view(2, 1)
    assert_close_relative(layer.position.grad, expected, rtol=1e-12)
    assert math.isfinite(float(layer.position.grad.abs().sum()))


# --------------------------------------------------------------------------- refused inputs
@pytest.mark.parametrize("engine", ["reference", *TWO_TAPS])
def test_inputs_and_states_that_would_go_wrong_are_named_on_every_path(engine):
    """A dtype mix (the convolution's own error before), NaN in the input or the state (passed
    silently) and a state of another kind (AttributeError) get errors saying what to do."""
    layer = FeedforwardDelay(3, 2, kernel_size=4, engine=engine)
    if not engines.PATHS[engine].runs_on(torch.device("cpu")):
        pytest.skip(native.unavailable("feedforward"))
    with pytest.raises(TypeError, match="must share one dtype; convert the layer or the input"):
        layer(torch.rand(5, 2, 3, dtype=torch.float64))
    x = torch.rand(5, 2, 3)
    x[3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in the input of FeedforwardDelay\(3, 2\)"):
        layer(x)
    state = torch.zeros(3, 2, 3)
    state[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf in the state of FeedforwardDelay\(3, 2\)"):
        layer(torch.rand(5, 2, 3), state)
    with pytest.raises(
        ValueError, match=r"state must be the tensor of the last K-1 inputs .*tuple"
    ):
        layer(torch.rand(5, 2, 3), (torch.zeros(3, 2, 3),))
    with pytest.raises(ValueError, match=r"torch.float32 that return_state=True gave, got .*64"):
        layer(torch.rand(5, 2, 3), torch.zeros(3, 2, 3, dtype=torch.float64))


@pytest.mark.parametrize("engine", TWO_TAPS)
def test_double_backward_through_two_taps_names_the_reference(engine):
    """The two-tap paths have hand-written first derivatives: create_graph=True is refused (it
    gave a gradient without its second-order part), naming engine='reference'."""
    if not engines.PATHS[engine].runs_on(torch.device("cpu")):
        pytest.skip(native.unavailable("feedforward"))
    layer = FeedforwardDelay(3, 2, kernel_size=4, engine=engine).double()
    x = torch.rand(5, 2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="first derivatives only.*engine='reference'"):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


def test_the_reference_convolution_has_exact_second_derivatives():
    layer = FeedforwardDelay(3, 2, kernel_size=4, engine="reference").double()
    x = torch.rand(5, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(layer, (x,))
