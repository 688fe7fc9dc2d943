"""Training: the loop, evaluation, checkpoints and resume, jobs (runs, seeds), figures.

>>> from delrec.training import Trainer, resolve
>>> config = resolve("digits-8x8", overrides=["epochs=2"])
>>> trainer = Trainer(config, "runs/demo")
>>> trainer.fit(); results = trainer.test()

The configuration (:class:`TrainConfig`, :func:`resolve`; the rest of it, e.g. ``preset``
and ``ConfigError``) lives in :mod:`delrec.config`; :mod:`delrec.training.jobs` trains runs
in locked run directories as ``delrec train`` does.
"""

from delrec.config import TrainConfig, resolve
from delrec.training.loop import Trainer, TrainingError

__all__ = ["TrainConfig", "Trainer", "TrainingError", "resolve"]
