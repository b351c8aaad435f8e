"""ASHA that also weighs what the other trials reached with fewer epochs.

Ray's ASHA compares a trial arriving at a rung only with the trials that arrived there
before it. Early in a sweep a rung is empty or nearly so, and ASHA promotes whatever arrives
first: with two trials running from the start, the first to reach epoch 3 goes on to the full
budget even when it is still near chance while the other trial passed it after one epoch. In
the search benchmark's seed 2, an SGD trial at 0.14 accuracy after 3 epochs (the other first
trial: 0.53 after 2) trained all 9 epochs that way.

Here a trial at a rung is also stopped when its best value so far is below the top
1/reduction_factor of the best values every other trial reached within the rung's epochs
(trials still below the rung, and trials stopped below it, included). Those are results for
the same or a smaller budget, so a trial behind them is behind on equal terms or worse. ASHA's
own comparison at the rung still applies, so nothing Ray's ASHA would stop goes on; once rungs
fill up, its cutoff is mostly the higher one and decides alone.
"""

from __future__ import annotations

import math

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler


def rung_milestones(grace_period: int, max_t: int, reduction_factor: float) -> list[int]:
    """The epochs at which ASHA (one bracket) decides: grace_period * reduction_factor**k."""
    milestones, epochs = [], float(grace_period)
    while epochs <= max_t:
        milestones.append(round(epochs))
        epochs *= reduction_factor
    return milestones


def raise_bests(bests: dict[int, float], milestones: list[int], epoch: int,
                value: float) -> None:
    """Fold one epoch's value into a trial's best value within each rung's epochs (larger is
    better): every rung at or after ``epoch`` can count it."""
    for milestone in milestones:
        if milestone >= epoch:
            bests[milestone] = max(bests.get(milestone, -math.inf), value)


def behind_earlier_results(own_best: float, others_best: list[float],
                           reduction_factor: float) -> bool:
    """True when ``own_best`` is below the top 1/reduction_factor of ``others_best``, the
    quantile ASHA uses for its rungs (larger is better; no others: never behind)."""
    if not others_best:
        return False
    cutoff = np.nanpercentile(others_best, (1 - 1 / reduction_factor) * 100)
    return bool(own_best < cutoff)


class EarlierEpochsASHA(AsyncHyperBandScheduler):
    """ASHA (one bracket, budget in epochs) that also compares a trial reaching a rung with
    the best results the other trials reached in no more epochs than the rung's.

    Args:
        metric: The result key to compare.
        mode: "max" or "min".
        max_t: Epochs of a full trial.
        grace_period: Epochs before a trial can first be stopped.
        reduction_factor: A rung keeps the top 1/reduction_factor.
    """

    def __init__(self, *, metric: str, mode: str, max_t: int, grace_period: int,
                 reduction_factor: float) -> None:
        super().__init__(time_attr=TRAINING_ITERATION, metric=metric, mode=mode, max_t=max_t,
                         grace_period=grace_period, reduction_factor=reduction_factor)
        self._sign = 1.0 if mode == "max" else -1.0  # stored values: larger is better
        self._keep_one_in = reduction_factor
        self._milestones = rung_milestones(grace_period, max_t, reduction_factor)
        # trial id -> {rung: best signed value within the rung's epochs}, kept per rung so a
        # decision reads one number per trial. Stopped trials stay: they are evidence too.
        self._bests: dict[str, dict[int, float]] = {}
        self._last_epoch: dict[str, int] = {}

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        value, epoch = result.get(self.metric), result.get(TRAINING_ITERATION)
        if value is None or epoch is None or not math.isfinite(float(value)):
            return action
        last_epoch, epoch = self._last_epoch.get(trial.trial_id, 0), int(epoch)
        if epoch <= last_epoch:
            return action  # a retried epoch (restored from a checkpoint): its first value stands
        self._last_epoch[trial.trial_id] = epoch
        bests = self._bests.setdefault(trial.trial_id, {})
        raise_bests(bests, self._milestones, epoch, self._sign * float(value))
        crossed = [m for m in self._milestones if last_epoch < m <= epoch]
        if action != TrialScheduler.CONTINUE or not crossed:  # at max_t ASHA has said STOP
            return action
        rung = crossed[-1]
        others = [other[rung] for trial_id, other in self._bests.items()
                  if trial_id != trial.trial_id and rung in other]
        if behind_earlier_results(bests[rung], others, self._keep_one_in):
            self._num_stopped += 1
            return TrialScheduler.STOP
        return action
