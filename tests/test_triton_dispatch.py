"""Which path the engine selector picks for CUDA tensors, with and without triton, and which
kernels the fused network finds there; the layer on a GPU runs the Triton kernels."""

import warnings

import pytest
import torch
from triton_helpers import CUDA, needs_triton

from delrec.engine import PATHS, fused, select
from delrec.engine import triton as gpu
from delrec.layers import DelRec
from delrec.neurons import LIF, AdLIF


def test_without_triton_cuda_layers_keep_the_pytorch_op_paths_with_one_warning(monkeypatch):
    monkeypatch.setattr(gpu, "installed", lambda: False)
    gpu._warn_missing.cache_clear()
    with pytest.warns(RuntimeWarning, match="'triton' package") as caught:
        axonal = select("axonal", LIF(), device="cuda", integer=False, grad=True)
        synaptic = select("synaptic", LIF(), device="cuda", integer=False, grad=True)
        ring = select("shared", LIF(), device="cuda", integer=True, grad=False)
    assert (axonal.name, synaptic.name, ring.name) == ("torch-axonal", "torch-synaptic", "ring")
    assert len(caught) == 1
    gpu._warn_missing.cache_clear()


def test_cpu_layers_never_run_the_interpreted_kernels():
    """Even under TRITON_INTERPRET=1 (set for these tests without a GPU) the CPU keeps its
    paths; the Triton paths run on the CPU only by name."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for delay_type in ("axonal", "shared", "synaptic"):
            for integer, grad in ((False, True), (True, False)):
                path = select(delay_type, LIF(), device="cpu", integer=integer, grad=grad)
                assert not path.name.startswith("triton"), (delay_type, integer, path.name)
    assert select("axonal", AdLIF(), device="cpu", integer=False, grad=True).name == "reference"


@needs_triton
def test_cuda_tensors_find_the_triton_kernels_where_they_run_compiled(monkeypatch):
    """The fused network's kernels for CUDA tensors where Triton runs compiled (CUDA with
    ``triton``; pretended here, so that the choice is checked without a GPU): the Triton module.
    CPU tensors keep the C++ kernels."""
    from delrec.engine.triton import fused as kernels

    monkeypatch.setattr(gpu, "available", lambda device: torch.device(device).type == "cuda")
    assert fused.kernels_for(torch.device("cuda")) is kernels
    assert fused.kernels_for(torch.device("cpu")) is not kernels


@needs_triton
@pytest.mark.skipif(not CUDA, reason="the selector's choice for CUDA tensors needs a GPU")
def test_on_cuda_the_triton_paths_are_picked():
    def picked(delay_type, integer, grad):
        return select(delay_type, LIF(), device="cuda", integer=integer, grad=grad).name

    assert picked("axonal", False, True) == "triton-axonal"
    assert picked("shared", False, True) == "triton-axonal"
    assert picked("synaptic", False, True) == "triton-synaptic"
    assert picked("synaptic", True, False) == "triton-ring"
    assert select("axonal", AdLIF(), device="cuda", integer=False, grad=True).name == "reference"


@needs_triton
@pytest.mark.skipif(not CUDA, reason="a layer on a GPU needs a GPU")
@pytest.mark.parametrize("delay_type", ["axonal", "shared", "synaptic"])
def test_a_layer_on_the_gpu_trains_and_evaluates_like_on_the_cpu(delay_type):
    """The same float64 layer on the CPU (C++ loops) and on the GPU (Triton kernels): same
    spikes and gradients in training, same spikes in integer-delay eval."""
    torch.manual_seed(0)
    cpu = DelRec(
        40,
        LIF(tau=2.0),
        delay_type=delay_type,
        delay_init="uniform:0:8",
        sigma=2.0,
        learn_spread=True,
        recurrent_dropout=0.2,
    ).double()
    cuda = (
        DelRec(
            40,
            LIF(tau=2.0),
            delay_type=delay_type,
            delay_init="uniform:0:8",
            sigma=2.0,
            learn_spread=True,
            recurrent_dropout=0.2,
        )
        .double()
        .cuda()
    )
    cuda.load_state_dict(cpu.state_dict())
    current = torch.rand(50, 20, 40, dtype=torch.float64) * 1.2
    mask = (torch.rand(20, 40, dtype=torch.float64) < 0.8).double() / 0.8
    grad_out = torch.randn(50, 20, 40, dtype=torch.float64)
    results = []
    for layer in (cpu, cuda):
        device = layer.weight.device
        x = current.detach().to(device).requires_grad_()
        spikes = layer(x, dropout_mask=mask.to(device))
        (spikes * grad_out.to(device)).sum().backward()
        grads = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
        with torch.no_grad():
            evaluated = layer.eval()(current.to(device))
        results.append([spikes.detach(), evaluated, *grads])
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-6, atol=1e-9)
    assert PATHS["triton-axonal"].available("cuda")


@needs_triton
def test_a_triton_path_on_cpu_tensors_without_the_interpreter_says_so():
    """Without the interpreter a Triton path called by name on CPU tensors failed inside Triton
    ("0 active drivers"); with TRITON_INTERPRET set only after the kernels were imported, the
    selector offered them and an ordinary eval forward failed so. Now the path says what it
    needs, and the selector keeps the CPU paths for kernels loaded compiled."""
    import os
    import subprocess
    import sys

    script = (
        "import os, torch\n"
        "from delrec.engine import PATHS\n"
        "from delrec.engine.triton import ring\n"
        "from delrec.layers import DelRec\n"
        "from delrec.neurons import LIF\n"
        "x, w = torch.rand(5, 2, 4), torch.rand(4, 4)\n"
        "try:\n"
        "    PATHS['triton-ring'].run(x, w, torch.ones(4), 1.0, LIF())\n"
        "except RuntimeError as error:\n"
        "    print('refused:', error)\n"
        "os.environ['TRITON_INTERPRET'] = '1'  # too late for the kernels imported above\n"
        "from delrec.engine import triton as gpu\n"
        "gpu.offer_interpreted_paths()\n"
        "with torch.no_grad():\n"
        "    print('eval:', tuple(DelRec(4).eval()(x).shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: the Triton paths run on CUDA tensors" in done.stdout, done.stdout
    assert "TRITON_INTERPRET=1" in done.stdout and "engine='auto'" in done.stdout
    assert "eval: (5, 2, 4)" in done.stdout
