"""Training: configuration and presets, the loop, checkpoints and resume, figures, CLI.

>>> from delrec.training import Trainer, resolve
>>> config = resolve("digits-8x8", overrides=["epochs=2"])
>>> trainer = Trainer(config, "runs/demo")
>>> trainer.fit(); results = trainer.test()
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
