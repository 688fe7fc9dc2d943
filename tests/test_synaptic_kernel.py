"""Synaptic delays by slot traces (delrec.engine.synaptic): what the engine paths of
``test_engine_paths.py`` do not see (a delay at the clamp, 3000 float32 steps, the fallback)."""

import pytest
import torch
from engine_harness import native_kernels

from delrec.delays import kernel_length, triangle_kernel
from delrec.engine import PATHS, native, select
from delrec.engine.synaptic import cpp_recurrence
from delrec.neurons import LIF, ATan


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The C++ kernels compile here; a build error fails every test with the compiler's message."""
    return native.build("synaptic")


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
    with native_kernels(False):
        current = torch.rand(5, 2, 3)
        assert not PATHS["cpp-synaptic"].available("cpu")
        path = select("synaptic", LIF(), device="cpu", integer=False, grad=True)
        assert path.name == "torch-synaptic"
        with pytest.raises(RuntimeError, match="DELREC_NATIVE=0"):
            cpp_recurrence(current, torch.eye(3), torch.ones(3, 3), 2.0, LIF())
