"""What the Triton kernel tests share: the device they run on, and the reference they meet.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``
is set here, before any kernel module is imported; the engine selector still never picks the
Triton paths for CPU tensors, the tests run them by name). With a GPU they run compiled on
CUDA, at sizes that cross the GPU's larger blocks. Without the ``triton`` package the tests
skip, saying so.
"""

import math
import os

import pytest
import torch

from delrec.delays import kernel_length, triangle_kernel
from delrec.engine import reference_recurrence
from delrec.engine import triton as gpu

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

needs_triton = pytest.mark.skipif(
    not gpu.installed(), reason="the Triton kernels need the optional package 'triton'"
)


def sizes(interpreted, compiled):
    """A test size: small under the interpreter (slow, small blocks), larger compiled (crossing
    the GPU's blocks)."""
    return compiled if CUDA else interpreted


def random_problem(steps, batch, n, *, max_delay, sigma, dtype, seed, dropout, integer_share=0.3):
    """Current, weight, delays ``(N,)``, spread logits, mask and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    current = torch.randn(steps, batch, n, generator=g, dtype=torch.float64) * 0.8 + 0.45
    weight = torch.randn(n, n, generator=g, dtype=torch.float64) * 1.5 / math.sqrt(n)
    delay = torch.rand(n, generator=g, dtype=torch.float64) * max_delay
    integer = torch.rand(n, generator=g) < integer_share
    delay[integer] = delay[integer].round()
    logits = torch.randn(n, generator=g, dtype=torch.float64)
    mask = (
        torch.bernoulli(torch.full((batch, n), 0.7, dtype=torch.float64), generator=g) / 0.7
        if dropout
        else None
    )
    grad_out = torch.randn(steps, batch, n, generator=g, dtype=torch.float64)

    def to(x):
        return None if x is None else x.to(DEVICE, dtype)

    return (*map(to, (current, weight, delay, logits, mask, grad_out)), sigma)


def width_of(logits, sigma, learn_spread):
    """Kernel half-width: ``1 + 2σ·sigmoid(p)`` per neuron, or ``1 + σ``."""
    return 1.0 + 2.0 * sigma * torch.sigmoid(logits) if learn_spread else 1.0 + sigma


def spikes_and_grads(run, current, weight, delay, logits, sigma, learn_spread, grad_out):
    """Spikes of ``run(current, weight, delay, width)`` and the gradients of
    ``Σ spikes·grad_out`` w.r.t. current, weight, delay and (learned spreads) the logits."""
    inputs = [x.detach().clone().requires_grad_() for x in (current, weight, delay, logits)]
    if not learn_spread:
        inputs = inputs[:3]
    width = width_of(inputs[3] if learn_spread else None, sigma, learn_spread)
    spikes = run(*inputs[:3], width)
    grads = torch.autograd.grad((spikes * grad_out).sum(), inputs, allow_unused=True)
    return spikes.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def reference_run(neuron, mask):
    """``run`` of the reference loop with the triangle kernel (autograd)."""

    def run(current, weight, delay, width):
        max_width = float(torch.as_tensor(width).detach().max())
        length = kernel_length(float(delay.detach().max()), max_width)
        kernel = triangle_kernel(delay, width, length)
        return reference_recurrence(current, weight, kernel, neuron, mask)

    return run


def assert_grads_close(actual, expected, dtype, names=("current", "weight", "delay", "spread")):
    """Equal within ``rtol`` of the largest entry: 1e-6 in float64, 2e-4 in float32."""
    rtol = 1e-6 if dtype == torch.float64 else 2e-4
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape, name
        scale = float(e.abs().max()) if e.numel() else 0.0
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale + 1e-12, msg=name)


def assert_same_spikes(actual, expected):
    """Spikes identical; else say how many differ and from which step (in float32 a membrane
    within rounding of the threshold can flip one spike, and with it its sample's future)."""
    differ = actual != expected
    if differ.any():
        first = int(differ.flatten(1).any(1).nonzero()[0])
        raise AssertionError(
            f"{int(differ.sum())} of {differ.numel()} spikes differ, the first at step {first} "
            f"({int(differ[first].sum())} there), dtype {actual.dtype}"
        )
