"""First derivatives only: the guard of every hand-written backward of the engines.

The hand-written backward loops (the recurrent paths, the fused network, the two-tap feedforward
delays) compute first derivatives into preallocated buffers, outside autograd. A double
backward through them (``torch.autograd.grad(..., create_graph=True)`` then a backward through
that gradient) would either crash inside PyTorch ("functions with out=... arguments don't support
automatic differentiation") or, worse, return a gradient that silently misses their part of the
second derivative (what ``torch.autograd.function.once_differentiable`` leaves when only the
saved tensors, not the incoming gradient, require grad). :func:`first_order` refuses the
``create_graph`` backward itself, with the setting that computes second derivatives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def first_order(name: str, fix: str) -> Callable[[Callable], Callable]:
    """Decorator of the ``backward`` of a custom ``torch.autograd.Function``: raises a
    RuntimeError naming ``name`` (what runs the backward) and ``fix`` (the setting with second
    derivatives) when autograd asks for a differentiable gradient (``create_graph=True``), and
    runs the backward as it is otherwise."""

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():  # autograd runs a backward with create_graph this way
                raise RuntimeError(
                    f"{name} computes first derivatives only, and this backward asks for a "
                    "differentiable gradient (create_graph=True: double backward, gradient "
                    f"penalties, Hessian-vector products); {fix}"
                )
            return backward(ctx, *grads)

        return checked

    return decorate


# what the recurrent paths' errors say (every DelRec path has a hand-written backward but one)
RECURRENT = (
    "this DelRec layer's engine path (a hand-written backward: every path but 'reference')",
    "build the layer with engine='reference' (DelRec(..., engine='reference')), whose autograd "
    "loop has second derivatives",
)
