"""sweeper: distributed hyperparameter search for Keras models (Hydra, Ray Tune, Optuna, ASHA).

The public API (see the README's "API" section); importing it starts neither Ray nor
TensorFlow:

- :func:`compose` -> a validated :class:`SweepConfig` (raises :class:`ConfigError`)
- :func:`run` -> the :class:`SweepResult` of running (or resuming) that sweep
- :func:`load` -> the :class:`SweepResult` of a finished or interrupted sweep folder
"""

from sweeper.api import SweepResult, compose, load, run
from sweeper.config import ConfigError, SweepConfig

__all__ = ["ConfigError", "SweepConfig", "SweepResult", "compose", "load", "run"]
