"""The Optuna searcher, told the truth about trials that ASHA stopped early.

Ray's stock ``OptunaSearch`` reports each epoch to Optuna but then tells Optuna
that an early-stopped trial is COMPLETE with its last value, as if that value
were a full-budget result. TPE then ranks a trial stopped after one epoch among
the finished ones, and ``study.best_trial`` can be a trial that never trained
to the end. Here such a trial is told as PRUNED (Optuna keeps its per-epoch
values, and TPE ranks pruned trials by how far they got, then by their last
value), and a trial whose metric is missing or not finite is told as FAILED.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)


def make_sampler(name: str, seed: int, n_startup_trials: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named by ``search.sampler``, seeded."""
    if name == "tpe":
        # constant_liar keeps parallel workers from all sampling the same point.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials,
                                          constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}")


def final_state(value: Any, epochs: int, max_epochs: int, error: bool) -> TrialState:
    """How Optuna should see a trial that Ray Tune reports as ended."""
    if error or value is None or not math.isfinite(float(value)):
        return TrialState.FAIL
    if epochs < max_epochs:
        return TrialState.PRUNED
    return TrialState.COMPLETE


class PruningOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells early-stopped trials as PRUNED and bad ones as FAILED.

    Args:
        max_epochs: The full budget of a trial; a trial that ends with fewer epochs was
            stopped early by the scheduler.
        *args, **kwargs: As for ``ray.tune.search.optuna.OptunaSearch``.
    """

    def __init__(self, *args: Any, max_epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_epochs = max_epochs

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value = result.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return  # Optuna refuses NaN intermediate values; the trial will be told FAILED
        ot_trial = self._ot_trials.get(trial_id)
        step = result[TRAINING_ITERATION]
        # A trial retried from its checkpoint reports its epochs again: keep the first value.
        if ot_trial is not None and step in self._reported_steps(trial_id):
            return
        super().on_trial_result(trial_id, result)
        self._reported_steps(trial_id).add(step)

    def _reported_steps(self, trial_id: str) -> set[int]:
        steps = self.__dict__.setdefault("_steps_by_trial", {})
        return steps.setdefault(trial_id, set())

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value = result.get(self.metric) if result else None
        epochs = int(result.get(TRAINING_ITERATION, 0)) if result else 0
        state = final_state(value, epochs, self._max_epochs, error)
        ot_trial = self._ot_trials[trial_id]
        told_value = float(value) if state == TrialState.COMPLETE else None
        self._ot_study.tell(ot_trial, told_value, state=state)
        self._completed_trials.add(trial_id)
        logger.debug("Told Optuna trial %s %s after %d epochs", trial_id, state.name, epochs)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study
