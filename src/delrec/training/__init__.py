"""Training: the loop, evaluation, checkpoints and resume, jobs (runs, seeds), figures.

>>> from delrec.training import Trainer, resolve
>>> config = resolve("digits-8x8", overrides=["epochs=2"])
>>> trainer = Trainer(config, "runs/demo")
>>> trainer.fit(); results = trainer.test()

The configuration (:class:`TrainConfig`, :func:`resolve`, :func:`preset`) lives in
:mod:`delrec.config` and is offered here too; :mod:`delrec.training.jobs` trains runs in
locked run directories as ``delrec train`` does.
"""

from delrec.config import (
    ConfigError,
    OptimConfig,
    SpreadConfig,
    TrainConfig,
    preset,
    resolve,
)
from delrec.training.loop import Trainer, TrainingError, parameter_groups

__all__ = [
    "ConfigError",
    "OptimConfig",
    "SpreadConfig",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "parameter_groups",
    "preset",
    "resolve",
]
