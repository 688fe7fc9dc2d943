"""Layers: the DelRec recurrent-delay layer and the feedforward-delay baseline."""

from torch import Tensor, nn

from delrec.delays import check_sigma
from delrec.layers.feedforward import FeedforwardDelay
from delrec.layers.recurrent import DelRec, DelRecState
from delrec.neurons import LeakyIntegrator, SequenceNeuron

# modules whose forward takes (x, state, return_state=...): their state between chunks
STATEFUL = (DelRec, FeedforwardDelay, SequenceNeuron, LeakyIntegrator)


def run_chunk(module: nn.Module, x: Tensor, state, stateful: bool = True):
    """``(module(x), None)``, or for a :data:`STATEFUL` module run from ``state`` when
    ``stateful``, ``module(x, state, return_state=True)``: one chunk of a sequence."""
    if stateful and isinstance(module, STATEFUL):
        return module(x, state, return_state=True)
    return module(x), None


def clamp_delays(model: nn.Module) -> None:
    """Project every delay of ``model`` back into its range (``[0, max_delay]`` of each layer,
    feedforward positions also into their window); call after each optimizer step."""
    for module in model.modules():
        if isinstance(module, (DelRec, FeedforwardDelay)):
            module.clamp_delays_()


def delay_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The delay parameters that ``model`` learns, in module order: the delays and spread
    logits of each DelRec layer built with ``learn_delays=True``, each FeedforwardDelay's
    positions (usually trained at a higher learning rate than the weights, without weight
    decay). Also those frozen for now with ``requires_grad_(False)`` (a warm-up of the
    weights): an optimizer split made while they are frozen keeps them out of the weights'
    group, and an optimizer skips them while they have no gradient."""
    found = []
    for module in model.modules():
        if isinstance(module, DelRec) and module.learn_delays:
            found += [p for p in (module.delay, module.spread_logits) if p is not None]
        elif isinstance(module, FeedforwardDelay):
            found.append(module.position)
    return [p for p in found if isinstance(p, nn.Parameter)]


def rounding_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose eval mode rounds their delays (DelRec, FeedforwardDelay):
    each has an ``integer_eval`` flag, ``False`` to evaluate with real-valued delays."""
    return [m for m in model.modules() if isinstance(m, (DelRec, FeedforwardDelay))]


def set_spread(model: nn.Module, sigma: float) -> None:
    """Set the kernel spread σ (steps, in ``[0, MAX_DELAY]``) of every DelRec layer of ``model``
    that learns delays."""
    sigma = check_sigma(sigma)
    for module in model.modules():
        if isinstance(module, DelRec) and module.learn_delays:
            module.sigma.fill_(sigma)


__all__ = [
    "STATEFUL",
    "DelRec",
    "DelRecState",
    "FeedforwardDelay",
    "clamp_delays",
    "delay_parameters",
    "rounding_layers",
    "run_chunk",
    "set_spread",
]
