"""Losses and metrics: regression (MSE; NMSE, NRMSE, R²) and classification (the readouts of
docs/design.md#losses-and-readouts; accuracy).

An objective maps the network's readout sequence ``(T, B, K)``, the true lengths ``(B,)`` and
the targets ``(B,)`` to a scalar loss and a per-sample output (prediction or class scores);
its meter (:class:`RegressionMeter`, :class:`ClassificationMeter`) accumulates a split's
metrics over batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from delrec.models import readout_reduce


class Regression:
    """One scalar target per sequence; the prediction is the last valid readout value.

    Loss: MSE on the scale the network sees. Metrics over a split: ``mse`` in the data's
    units (``scale`` = the std the targets were divided by), ``nmse = mse / Var(target)``
    (variance of the split's targets), ``nrmse = sqrt(nmse)`` and ``r2 = 1 - nmse``, none of
    which depends on the scale. Lower NMSE is better.
    """

    task = "regression"
    metric = "nmse"
    higher_is_better = False

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, output: Tensor, lengths: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """→ (MSE loss, predictions ``(B,)``)."""
        prediction = readout_reduce(output, "ema", lengths)[:, 0]
        return F.mse_loss(prediction, targets.to(prediction.dtype)), prediction

    def meter(self) -> RegressionMeter:
        return RegressionMeter(self.scale)


class RegressionMeter:
    """Sums of squared errors and target moments (float64) over the batches of a split."""

    SUMS = ("count", "squared_error", "target_sum", "target_square_sum")  # additive over shards

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.count, self.squared_error, self.target_sum, self.target_square_sum = 0, 0.0, 0.0, 0.0

    def update(self, loss: Tensor, prediction: Tensor, targets: Tensor) -> None:
        prediction, targets = prediction.detach().double(), targets.detach().double()
        self.count += len(targets)
        self.squared_error += float((prediction - targets).pow(2).sum())
        self.target_sum += float(targets.sum())
        self.target_square_sum += float(targets.pow(2).sum())

    def result(self) -> dict[str, float]:
        mse = self.squared_error / self.count
        variance = self.target_square_sum / self.count - (self.target_sum / self.count) ** 2
        nmse = mse / variance if variance > 0 else math.nan
        return {
            "loss": mse,
            "mse": mse * self.scale**2,
            "nmse": nmse,
            "nrmse": math.sqrt(nmse),
            "r2": 1.0 - nmse,
        }


class Classification:
    """A class label per sequence, scored by the readout (docs/design.md#losses-and-readouts).

    ``"lif"``: ŷ = Σ_t softmax(V[t]) (Eq. S1), then the cross-entropy on that sum taken as
    the class scores, ``-log softmax(ŷ)[label]`` (as the authors' published code computes
    Eq. S2); ``"sum"``: cross-entropy of Σ_t output[t]; ``"ema"``: cross-entropy of the last
    valid output. The sums run over each sample's true steps (the padding of a batch does not
    count). Metric: accuracy of the arg-max; higher is better.
    """

    task = "classification"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, readout: str):
        self.readout = readout

    def __call__(self, output: Tensor, lengths: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """→ (loss, class scores ``(B, K)``)."""
        scores = readout_reduce(output, self.readout, lengths)
        return F.cross_entropy(scores, targets), scores

    def meter(self) -> ClassificationMeter:
        return ClassificationMeter()


class ClassificationMeter:
    """Loss (weighted by batch size) and correct arg-max predictions over a split."""

    SUMS = ("count", "loss_sum", "correct")  # additive over shards

    def __init__(self):
        self.count, self.loss_sum, self.correct = 0, 0.0, 0

    def update(self, loss: Tensor, scores: Tensor, targets: Tensor) -> None:
        self.count += len(targets)
        self.loss_sum += float(loss.detach()) * len(targets)
        self.correct += int((scores.detach().argmax(-1) == targets).sum())

    def result(self) -> dict[str, float]:
        return {"loss": self.loss_sum / self.count, "accuracy": self.correct / self.count}


def make_objective(
    task: str,
    readout: str,
    standardization: Tensor | None = None,
) -> Regression | Classification:
    """The objective of a data set's task kind (``"regression"`` or ``"classification"``);
    ``standardization``: the ``[mean, std]`` regression targets were standardised with."""
    if task == "classification":
        return Classification(readout)
    return Regression(1.0 if standardization is None else float(standardization[1]))


def rounding_cost(metric: str, real: float, rounded: float) -> float:
    """What rounding the delays cost on ``metric`` (``"accuracy"`` or ``"nmse"``), from its
    values with real-valued and with rounded delays: accuracy lost or NMSE gained (> 0: worse)."""
    return real - rounded if metric == "accuracy" else rounded - real


def spike_penalty(spikes: list[Tensor]) -> Tensor:
    """The firing-rate penalty of a batch's hidden spikes (``(T, B, N)`` per layer): the mean
    over layers of ``0.5 Σ s² / (T·B·N)``."""
    return torch.stack([0.5 * s.pow(2).mean() for s in spikes]).mean()
