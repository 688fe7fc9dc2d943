"""The network around the delays on the GPU: the Triton kernels of the fused engine
(``delrec.engine.triton.fused``, registered as ``fused.KERNELS["cuda"]``) against the reference.
Dropout masks bit for bit the PyTorch ops' (the same masks on every device), the feedforward
LIF layer with its masks, the leaky-integrator readout, BatchNorm over frames, and whole
preset-shaped networks in training.

With a GPU the kernels run compiled on CUDA, as the network picks them. Without one they run
under Triton's interpreter on CPU tensors, put in the place of the CPU's C++ kernels for the
test (the :func:`triton_kernels` fixture): the same functions, called by the same autograd
code of :mod:`delrec.engine.fused`.
"""

import dataclasses

import pytest
import torch
from engine_harness import NEURONS, assert_close_relative
from fused_helpers import (
    Sigmoid,
    assert_batch_norm_like_the_module,
    assert_lif_layer_like_the_loop,
    assert_trains_alike,
    grads_of,
    network_pair,
    reference_layer,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_helpers import CUDA, DEVICE, assert_same_spikes, needs_triton, sizes

from delrec.engine import dropout as masks
from delrec.engine import fused
from delrec.neurons import LIF, ATan, LeakyIntegrator, Triangle

pytestmark = needs_triton


@pytest.fixture(scope="module")
def triton_kernels():
    """The Triton kernels, where :func:`fused.kernels_for` finds them for ``DEVICE``: on CUDA
    the registered ones (checked), on the CPU in place of the C++ ones for these tests."""
    from delrec.engine.triton import fused as kernels

    if CUDA:
        assert fused.kernels_for(DEVICE) is kernels
        yield kernels
        return
    cpu = fused.KERNELS["cpu"]
    fused.KERNELS["cpu"] = lambda: kernels
    try:
        yield kernels
    finally:
        fused.KERNELS["cpu"] = cpu


def on_device(x):
    return x.to(DEVICE)


class Recorder:
    """A kernel module that records which of its functions run."""

    def __init__(self, module):
        self.module, self.ran = module, set()

    def __getattr__(self, name):
        function = getattr(self.module, name)

        def run(*args, **kwargs):
            self.ran.add(name)
            return function(*args, **kwargs)

        return run


# --------------------------------------------------------------------------- masks
@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 150)),
    key=st.integers(0, 2**63 - 1),
    keep=st.floats(0.05, 0.99),
    offset=st.integers(0, 2**31),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_the_kernels_draw_the_masks_of_the_pytorch_ops_bit_for_bit(
    triton_kernels, shape, key, keep, offset, dtype
):
    """Triton's Philox4x32-10 with the counter and key layout of delrec.engine.dropout: the
    PyTorch ops' masks, on this device and on the CPU."""
    draw = masks.MaskDraw(key, keep, offset)
    expected = masks.reference_mask(shape, draw, dtype, DEVICE)
    assert torch.equal(expected.cpu(), masks.reference_mask(shape, draw, dtype))
    assert torch.equal(fused.dropout_mask(shape, draw, dtype, DEVICE), expected)
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    assert torch.equal(fused.dropped(x, draw), x * expected)


def test_a_shard_draws_its_rows_and_large_masks_match(triton_kernels):
    """Rows ``[offset, offset + B)`` of the whole batch's mask; a mask larger than a tile in
    every direction (compiled: thousands of tiles)."""
    shape = sizes((3, 9, 130), (300, 256, 700))
    draw = masks.MaskDraw(2**63 - 1, 0.4)
    whole = fused.dropout_mask(shape, draw, device=DEVICE)
    assert torch.equal(whole, masks.reference_mask(shape, draw, device=DEVICE))
    shard = fused.dropout_mask(
        (shape[0], 3, shape[2]), dataclasses.replace(draw, batch_offset=4), device=DEVICE
    )
    assert torch.equal(shard, whole[:, 4:7])
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    (grad,) = grads_of(fused.dropped(x, draw), [x], torch.ones_like(whole))
    assert torch.equal(grad, whole)


# --------------------------------------------------------------------------- LIF layer
# compiled on CUDA, each new combination of flags is a kernel variant to compile: fewer there
@settings(max_examples=sizes(20, 12), deadline=None, derandomize=True)
@given(
    steps=st.integers(1, 10),
    batch=st.integers(1, 5),
    size=st.integers(1, 140),
    neuron=NEURONS,
    other_surrogate=st.booleans(),
    dropout_in=st.booleans(),
    dropout_out=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lif_layer_matches_the_autograd_loop(
    triton_kernels, steps, batch, size, neuron, other_surrogate, dropout_in, dropout_out, seed
):
    """Every reset, detach_reset, decay_input, Triangle and ATan (computed in the kernel) and a
    surrogate the kernels don't know, masks on the input and the output, float64."""
    shape = (steps, batch, size)
    args = (neuron, other_surrogate, dropout_in, dropout_out, seed, DEVICE)
    assert_lif_layer_like_the_loop(shape, *args)


LAYERS = [  # (neuron, masks in/out): both resets, both detach_reset, every surrogate kind
    (LIF(tau=2.0, v_reset=0.0, detach_reset=True, surrogate=ATan(5.0)), (False, True)),
    (LIF(tau=1.5, v_reset=None, surrogate=Triangle(1.0)), (True, False)),
    (LIF(tau=5.0, v_reset=-0.3, decay_input=True, surrogate=Sigmoid()), (True, True)),
]


@pytest.mark.parametrize("case", range(len(LAYERS)))
def test_lif_layer_in_float32(triton_kernels, case):
    """float32 at a size that crosses many tiles: the float32 reference's spikes, gradients
    within 1e-5 of the float64 reference's."""
    neuron, (dropout_in, dropout_out) = LAYERS[case]
    shape = sizes((16, 5, 130), (100, 64, 300))
    g = torch.Generator().manual_seed(case)
    scale = neuron.p.tau if neuron.p.decay_input else 1.0
    current = on_device((torch.randn(*shape, generator=g) * 0.8 + 0.5) * scale)
    grad_out = on_device(torch.randn(*shape, generator=g))
    mask_in = masks.MaskDraw(3, 0.8) if dropout_in else None
    mask_out = masks.MaskDraw(4, 0.6) if dropout_out else None
    x = current.clone().requires_grad_()
    spikes = fused.lif_layer(x, neuron.p, mask_in, mask_out)
    (grad,) = grads_of(spikes, [x], grad_out)
    reference = reference_layer(neuron, current, mask_in, mask_out)
    x64 = current.double().requires_grad_()
    exact = reference_layer(neuron, x64, mask_in, mask_out)
    (exact_grad,) = grads_of(exact, [x64], grad_out.double())
    assert 0.05 < float(spikes.ne(0).float().mean()) < 0.95
    assert_same_spikes(spikes, reference)
    assert_same_spikes(spikes.ne(0), exact.detach().ne(0))  # no threshold tie in this draw
    assert_close_relative(grad.double(), exact_grad, rtol=1e-5)


KINKS = [  # (LIF keyword arguments, mask on the output): every h below lies on a dyadic grid
    (dict(tau=2.0, v_reset=0.0, surrogate=Triangle(1.0)), False),
    (dict(tau=4.0, v_reset=None, decay_input=True, surrogate=Triangle(0.5)), True),
    (dict(tau=2.0, v_reset=-0.5, detach_reset=True, surrogate=ATan(2.0)), False),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", range(len(KINKS)))
def test_lif_layer_at_the_kinks(triton_kernels, case, dtype):
    """Currents in quarters and leaks of 1/2 or 3/4 put membranes exactly on the threshold (a
    spike: ``h ≥ θ``) and on the Triangle's corners ``θ ± 1/γ``, every number exact in both
    dtypes: the reference's spikes, and its gradients within 1e-6, in float32 as in float64."""
    kwargs, dropout_out = KINKS[case]
    g = torch.Generator().manual_seed(case)
    shape = (12, 3, 70)
    current = torch.randint(-4, 9, shape, generator=g).to(dtype) / 4
    if kwargs.get("decay_input"):
        current *= kwargs["tau"]
    current, grad_out = on_device(current), on_device(torch.randn(shape, generator=g, dtype=dtype))
    mask_out = masks.MaskDraw(5, 0.5) if dropout_out else None
    neuron = LIF(**kwargs)
    x = current.clone().requires_grad_()
    expected = reference_layer(neuron, x, None, mask_out)
    (expected_grad,) = grads_of(expected, [x], grad_out)
    x = current.clone().requires_grad_()
    spikes = fused.lif_layer(x, neuron.p, None, mask_out)
    assert_same_spikes(spikes, expected.detach())
    assert_close_relative(grads_of(spikes, [x], grad_out)[0], expected_grad)
    above = reference_layer(LIF(**kwargs, v_threshold=1.0 + 2**-10), current, None, mask_out)
    assert not torch.equal(above, expected)  # some membranes sit on the threshold


def test_an_empty_batch_and_bad_input(triton_kernels):
    empty = torch.zeros(5, 0, 7, device=DEVICE, requires_grad=True)
    spikes = fused.lif_layer(empty, LIF().p, masks.MaskDraw(1, 0.5))
    assert spikes.shape == empty.shape and grads_of(spikes, [empty], spikes)[0].shape == (5, 0, 7)
    out = torch.empty(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"contiguous \(T, B, N\)"):
        triton_kernels.dropout(None, out, masks.MaskDraw(1, 0.5).native(out.dtype))
    out = torch.empty(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="threshold"):
        triton_kernels.dropout(None, out, (True, 1, 2**32, 1.0, 0))


# --------------------------------------------------------------------------- readout, norm
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decay_input", [False, True])
@pytest.mark.parametrize("tau", [1.05, 20.0])
def test_leaky_integrator_matches_the_module(triton_kernels, tau, decay_input, dtype):
    shape = sizes((30, 5, 7), (250, 128, 35))
    g = torch.Generator().manual_seed(2)
    current = on_device(torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()
    grad_out = on_device(torch.randn(*shape, generator=g, dtype=dtype))
    expected = LeakyIntegrator(tau, decay_input)(current)
    out = fused.integrate(current, tau, decay_input)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close_relative(out.detach(), expected.detach(), rtol)
    assert_close_relative(
        grads_of(out, [current], grad_out)[0], grads_of(expected, [current], grad_out)[0], rtol
    )
    start = on_device(torch.randn(*shape[1:], generator=g, dtype=dtype)).requires_grad_()
    out = fused.integrate(current, tau, decay_input, start)
    expected, _ = LeakyIntegrator(tau, decay_input)(current, (start,), return_state=True)
    assert_close_relative(out.detach(), expected.detach(), rtol)
    actual = grads_of(out, [current, start], grad_out)
    for a, e in zip(actual, grads_of(expected, [current, start], grad_out)):
        assert_close_relative(a, e, rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("with_shift", [False, True])
def test_batch_norm_matches_the_module(triton_kernels, dtype, momentum, with_shift):
    """Frames across more than one chunk of 256, channels across blocks; the running
    statistics over two updates; eval mode runs the module."""
    shape = sizes((20, 15, 40), (100, 256, 300))
    assert_batch_norm_like_the_module(shape, dtype, momentum, with_shift, DEVICE)


# --------------------------------------------------------------------------- whole networks
KERNEL_NAMES = {
    "lif_forward",
    "lif_backward",
    "dropout",
    "integrator_forward",
    "integrator_backward",
    "batch_norm_forward",
    "batch_norm_backward",
}
NO_NORM = KERNEL_NAMES - {"batch_norm_forward", "batch_norm_backward"}


@pytest.mark.parametrize(
    ("task", "model", "dtype", "kernels"),
    [
        ("shd", "delrec", torch.float64, KERNEL_NAMES),
        ("shd", "rsnn", torch.float64, KERNEL_NAMES),
        ("shd", "snn", torch.float64, KERNEL_NAMES),
        ("ssc", "delrec", torch.float64, {"dropout"}),  # recurrent layers, summed readout
        ("mackey-glass", "snn", torch.float64, NO_NORM),
        ("shd", "delrec", torch.float32, KERNEL_NAMES),
    ],
    ids=["shd-delrec", "shd-rsnn", "shd-snn", "ssc-delrec", "mackey-glass-snn", "shd-delrec-f32"],
)
def test_preset_networks_train_like_the_reference(
    triton_kernels, monkeypatch, task, model, dtype, kernels
):
    """One training step of small preset-shaped networks (every block kind and readout:
    SHD's BatchNorm blocks and LIF readout, SSC's dropout blocks and summed readout,
    Mackey-Glass's exponential readout) on variable-length sequences, fused on the Triton
    kernels against the reference: same spikes, readout and gradients to rounding; the
    network ran ``kernels``, each of them a Triton kernel."""
    recorder = Recorder(triton_kernels)
    monkeypatch.setitem(fused.KERNELS, DEVICE.type, lambda: recorder)
    hidden = {"shd": (12, 10), "ssc": (9, 9, 11), "mackey-glass": (13,)}[task]
    if CUDA:  # the SHD preset's own sizes
        hidden = {"shd": (256, 256), "ssc": (64, 64, 64), "mackey-glass": (128,)}[task]
    config, (fused_net, reference_net) = network_pair(
        task, model, dtype, DEVICE, hidden_sizes=hidden
    )
    lengths = torch.tensor(sizes([12, 5, 9, 12, 1, 7], [100, 17, 64, 100, 1, 80] * 4))
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    assert_trains_alike(task, config, fused_net, reference_net, lengths, rtol)
    assert recorder.ran == kernels


def test_without_triton_cuda_networks_run_the_reference_with_one_warning(monkeypatch):
    from delrec.engine import triton as gpu

    monkeypatch.setattr(gpu, "installed", lambda: False)
    gpu._warn_missing.cache_clear()
    with pytest.warns(RuntimeWarning, match="'triton' package") as caught:
        for _ in range(3):  # the block, the dropout, the readout: each asks
            assert fused.kernels_for(torch.device("cuda")) is None
    assert len(caught) == 1
    gpu._warn_missing.cache_clear()


@pytest.mark.skipif(not CUDA, reason="the network's choice of kernels for CUDA needs a GPU")
def test_on_cuda_the_network_runs_the_triton_kernels():
    from delrec.engine.triton import fused as kernels

    config, (network, reference) = network_pair("shd", "snn", torch.float32, DEVICE)
    assert fused.kernels_for(DEVICE) is kernels
    x = torch.rand(5, 2, config.input_size, device=DEVICE)
    assert type(network(x).grad_fn).__name__ == "_IntegratorBackward"
    assert type(reference(x).grad_fn).__name__ != "_IntegratorBackward"
