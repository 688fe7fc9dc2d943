"""Layers: the DelRec recurrent-delay layer and the feedforward-delay baseline."""

from torch import nn

from delrec.delays import check_sigma
from delrec.layers.feedforward import FeedforwardDelay
from delrec.layers.recurrent import DelRec


def clamp_delays(model: nn.Module) -> None:
    """Project every delay of ``model`` back into its range (``[0, max_delay]`` of each layer,
    feedforward positions also into their window); call after each optimizer step."""
    for module in model.modules():
        if isinstance(module, (DelRec, FeedforwardDelay)):
            module.clamp_delays_()


def set_spread(model: nn.Module, sigma: float) -> None:
    """Set the kernel spread σ (steps, in ``[0, MAX_DELAY]``) of every DelRec layer of ``model``
    that learns delays."""
    sigma = check_sigma(sigma)
    for module in model.modules():
        if isinstance(module, DelRec) and module.learn_delays:
            module.sigma.fill_(sigma)


__all__ = ["DelRec", "FeedforwardDelay", "clamp_delays", "set_spread"]
