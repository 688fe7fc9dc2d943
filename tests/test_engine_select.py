"""The one engine selector: which path runs a configuration, and the errors when forced."""

import os
from unittest import mock

import pytest
import torch

from delrec.engine import PATHS, EnginePath, kernel_reach, native, register, select, synaptic
from delrec.layers import DelRec
from delrec.neurons import LIF, AdLIF

TRAINING, EVAL, EVAL_WITH_GRAD = (False, True), (True, False), (True, True)  # (integer, grad)


@pytest.mark.parametrize(
    "delay_type, mode, native, expected",
    [
        ("axonal", TRAINING, "1", "cpp-axonal"),
        ("shared", TRAINING, "1", "cpp-axonal"),
        ("synaptic", TRAINING, "1", "cpp-synaptic"),
        ("axonal", EVAL_WITH_GRAD, "1", "cpp-axonal"),
        ("axonal", EVAL, "1", "cpp-ring"),
        ("synaptic", EVAL, "1", "cpp-ring"),
        ("axonal", TRAINING, "0", "torch-axonal"),
        ("synaptic", TRAINING, "0", "torch-synaptic"),
        ("synaptic", EVAL, "0", "ring"),
    ],
)
def test_the_builtin_lif_runs_the_first_available_path(delay_type, mode, native, expected):
    integer, grad = mode
    with mock.patch.dict(os.environ, {"DELREC_NATIVE": native}):
        path = select(delay_type, LIF(), device="cpu", integer=integer, grad=grad)
    assert path.name == expected
    assert path.supports(delay_type, LIF(), integer, grad)


@pytest.mark.parametrize("mode", [TRAINING, EVAL])
def test_other_neurons_run_the_reference_and_fast_refuses_them(mode):
    integer, grad = mode
    assert select("synaptic", AdLIF(), device="cpu", integer=integer, grad=grad).name == (
        "reference"
    )
    with pytest.raises(ValueError, match="engine='fast' runs only the built-in LIF"):
        select("axonal", AdLIF(), device="cpu", integer=integer, grad=grad, engine="fast")


def test_a_forced_path_runs_or_says_why_not():
    forced = select("axonal", LIF(), device="cpu", integer=False, grad=True, engine="reference")
    assert forced.name == "reference"
    with pytest.raises(ValueError, match="'ring' does not run axonal delays"):
        select("axonal", LIF(), device="cpu", integer=False, grad=True, engine="ring")
    with pytest.raises(ValueError, match="'torch-synaptic' does not run axonal"):
        select("axonal", LIF(), device="cpu", integer=False, grad=True, engine="torch-synaptic")
    with mock.patch.dict(os.environ, {"DELREC_NATIVE": "0"}):
        with pytest.raises(RuntimeError, match="'cpp-axonal' is not available on cpu"):
            select("axonal", LIF(), device="cpu", integer=False, grad=True, engine="cpp-axonal")
    with pytest.raises(ValueError, match="engine must be one of"):
        DelRec(4, engine="fastest")


def test_a_layer_forced_onto_a_path_gives_the_same_spikes_as_auto():
    current = torch.rand(12, 2, 6, dtype=torch.float64) * 1.5
    layers = [
        DelRec(6, sigma=2.0, engine=engine, generator=torch.Generator().manual_seed(0)).double()
        for engine in ("auto", "torch-axonal")
    ]
    assert torch.equal(layers[0](current), layers[1](current))


@pytest.fixture
def restored_paths():
    saved = dict(PATHS)
    yield
    PATHS.clear()
    PATHS.update(saved)


def test_a_registered_path_is_preferred_to_those_it_is_put_before(restored_paths):
    gpu_only = EnginePath(
        "test-axonal", PATHS["torch-axonal"].run, ("axonal",), runs_on=lambda d: d.type == "cuda"
    )
    register(gpu_only, before="cpp-axonal")
    names = list(PATHS)
    assert names.index("test-axonal") == names.index("cpp-axonal") - 1
    assert select("axonal", LIF(), device="cuda", integer=False, grad=True).name == "test-axonal"
    assert select("axonal", LIF(), device="cpu", integer=False, grad=True).name == "cpp-axonal"
    with pytest.raises(ValueError, match="exists already"):
        register(gpu_only)
    with pytest.raises(ValueError, match="no engine path named 'nope'"):
        register(EnginePath("other", gpu_only.run), before="nope")


def test_an_unusable_kernel_cache_falls_back_with_a_warning(tmp_path, monkeypatch):
    from delrec.engine import native

    if not native.enabled():
        pytest.skip("DELREC_NATIVE=0: no C++ kernels are built here")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("DELREC_CACHE", str(blocker / "cache"))  # a folder cannot go there
    native.build.cache_clear()
    native._built_or_warned.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built or loaded.*Not a directory"):
            assert native.load("ring") is None
    finally:  # the other tests load the kernels from the real cache again
        native.build.cache_clear()
        native._built_or_warned.cache_clear()


@pytest.mark.skipif(
    not PATHS["cpp-synaptic"].available("cpu"), reason=native.unavailable("synaptic")
)
def test_delays_beyond_the_cpp_synaptic_plan_run_torch_synaptic():
    """The C++ synaptic plan takes max|1 + d| + max w below CPP_REACH = 30 000 steps, short of
    MAX_DELAY: 'auto' passes such a layer to torch-synaptic, and a layer forced onto
    cpp-synaptic is told to use it (the kernel's own error before)."""
    limit = synaptic.CPP_REACH
    below = DelRec(3, delay_type="synaptic", delay_init=limit - 2.5)  # reach limit - 0.5
    assert type(below(torch.rand(4, 2, 3)).grad_fn).__name__ == "_SynapticSlotsBackward"
    layer = DelRec(3, delay_type="synaptic", delay_init=limit - 2.0)  # reach = limit
    current = torch.rand(4, 2, 3) * 2
    spikes = layer(current)
    assert type(spikes.grad_fn).__name__ == "_LagStackedBackward"
    spikes.sum().backward()
    assert layer.weight.grad is not None
    layer.engine = "cpp-synaptic"
    with pytest.raises(ValueError, match="reach 30000; use engine='torch-synaptic'"):
        layer(current)
    layer.engine = "torch-synaptic"
    assert torch.equal(layer(current), spikes)
    assert kernel_reach(layer.delay, 1.0) == limit
