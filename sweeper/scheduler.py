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

Every decision at a rung (and a trial's arrival at the full budget) is recorded in order in
``decisions``, with the trial, epoch, value and who decided; the sweep's summary keeps them, so
two runs of one sweep can be compared decision by decision.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from sweeper import compat
from sweeper.compat import end_tune_run_gracefully
from sweeper.progress import EVENTS_LOGGER, trial_number

events = logging.getLogger(EVENTS_LOGGER)

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


def earlier_cutoff(others_best: list[float], reduction_factor: float) -> float | None:
    """The value a trial must reach to be in the top 1/reduction_factor of ``others_best``,
    the quantile ASHA uses for its rungs (larger is better; None without others)."""
    if not others_best:
        return None
    return float(np.nanpercentile(others_best, (1 - 1 / reduction_factor) * 100))


def behind_earlier_results(own_best: float, others_best: list[float],
                           reduction_factor: float) -> bool:
    """True when ``own_best`` is below :func:`earlier_cutoff` (no others: never behind)."""
    cutoff = earlier_cutoff(others_best, reduction_factor)
    return cutoff is not None and own_best < cutoff


# Who took a recorded decision: Ray's ASHA at its rung, the comparison with earlier epochs,
# or the budget (the trial trained all train.epochs).
BY_ASHA, BY_EARLIER_EPOCHS, BY_BUDGET = "asha", "earlier_epochs", "budget"
CONTINUE, STOP, FULL_BUDGET = "continue", "stop", "full_budget"


class TimeBudget:
    """``search.time_budget_s`` of the sweep this driver runs: seconds from the first time
    the searcher is asked for a trial or the scheduler for a trial to start (a resumed sweep
    gets its budget anew).

    One per driver process (:data:`TIME_BUDGET`), armed by the sweep before ``fit``: the
    searcher and the schedulers read it, so the budget of a re-run applies to a sweep
    restored from its folder, whose searcher and scheduler Tune unpickles as they were.
    """

    def __init__(self) -> None:
        self.arm(None)

    def arm(self, seconds: float | None) -> None:
        """Start counting anew, with ``seconds`` (None: no limit)."""
        self.seconds, self.started, self.spent = seconds, None, False
        self.announced = False  # the console was told it is spent
        self.ended = False  # the run was told to end

    def expired(self) -> bool:
        """Whether the budget is spent (starts the clock on its first call)."""
        if self.seconds is None:
            return False
        if self.started is None:
            self.started = time.monotonic()
        self.spent = self.spent or time.monotonic() - self.started >= self.seconds
        return self.spent


TIME_BUDGET = TimeBudget()


class BudgetedScheduling:
    """What a scheduler does once the sweep's :data:`TIME_BUDGET` is spent: no trial starts
    any more, the running ones pause at their next epoch, and when none runs the run ends.

    At the first step after the budget ran out, one console line says what may still finish:
    the trials running then (each finishes the epoch it trains and pauses there; Tune keeps
    its checkpoint, a re-run resumes it). Every trial not yet running is paused before it
    starts: the ones Tune had queued (up to its ``max_pending_trials``, waiting for a
    worker or for their worker to come up) and a failed one waiting for its retry. Choosing
    no trial to run is not enough, as Tune starts its queued trials on freed workers without
    asking the scheduler (Ray 2.60, ``TuneController._maybe_add_actors`` steps 2 and 3);
    Tune's own way for a scheduler to hold a trial back is to set it PAUSED (its HyperBand
    does). The searcher proposes no new trial (:class:`sweeper.searcher.BudgetedSearch`).
    When none runs any more, the run ends the way Ctrl-C ends it, so the experiment is
    saved for a resume. Mixed into the schedulers below.
    """

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        if not TIME_BUDGET.expired():
            return super().choose_trial_to_run(tune_controller)
        trials = tune_controller.get_trials()
        running = [trial for trial in trials if trial.status == Trial.RUNNING]
        waiting = [trial for trial in trials if trial.status == Trial.PENDING]
        if not TIME_BUDGET.announced:
            TIME_BUDGET.announced = True
            events.info("The time budget of %g s is spent: no trial starts from now on%s%s",
                        TIME_BUDGET.seconds, _running_phrase(trials, running),
                        f"; {len(waiting)} waiting to start stay paused" if waiting else "")
        for trial in waiting:
            tune_controller.pause_trial(trial, should_checkpoint=False)  # stops its worker
            if trial.status == Trial.PENDING:  # it had no worker yet
                tune_controller._set_trial_status(trial, Trial.PAUSED)
        if not running and not TIME_BUDGET.ended:
            events.info("The time budget of %g s is spent and no trial runs: ending the sweep "
                        "with its results so far", TIME_BUDGET.seconds)
            TIME_BUDGET.ended = True
            end_tune_run_gracefully()
        return None

    def take_notes(self, trial_id: str) -> list[str]:
        """What this scheduler has to say of a trial's last result (``paused after epoch 2:
        ...``), once: the console's event callback prints it after the epoch's own line
        (Tune asks the scheduler before it tells the callbacks)."""
        notes = getattr(self, "_notes", {})
        return notes.pop(trial_id, [])

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.CONTINUE and TIME_BUDGET.expired():
            if not hasattr(self, "_notes"):  # set lazily: older pickles lack it
                self._notes: dict[str, list[str]] = {}
            self._notes.setdefault(trial.trial_id, []).append(
                f"paused after epoch {result.get(TRAINING_ITERATION)}: the time budget of "
                f"{TIME_BUDGET.seconds:g} s is spent")
            action = TrialScheduler.PAUSE
        return action


def _running_phrase(trials: list[Trial], running: list[Trial]) -> str:
    """``; trials 1 and 2 finish the epoch they train, then pause`` (empty: none runs)."""
    if not running:
        return ""
    numbers = [str(number) for number in sorted(trial_number(trials, t) for t in running)]
    if len(numbers) == 1:
        return f"; trial {numbers[0]} finishes the epoch it trains, then pauses"
    return (f"; trials {', '.join(numbers[:-1])} and {numbers[-1]} finish the epoch they "
            "train, then pause")


class BudgetedFIFO(BudgetedScheduling, FIFOScheduler):
    """Ray's FIFO scheduler (``scheduler=none``: every trial trains all its epochs) that
    keeps the sweep's time budget."""


class EarlierEpochsASHA(AsyncHyperBandScheduler):
    """ASHA (one bracket, budget in epochs) that also compares a trial reaching a rung with
    the best results the other trials reached in no more epochs than the rung's, and records
    every decision it takes.

    Args:
        metric: The result key to compare.
        mode: "max" or "min".
        max_t: Epochs of a full trial.
        grace_period: Epochs before a trial can first be stopped.
        reduction_factor: A rung keeps the top 1/reduction_factor.
        compare_earlier_epochs: False decides exactly as Ray's ASHA (the decisions are still
            recorded).

    Attributes:
        decisions: One dict per decision, in the order taken: ``trial_id``, ``epoch``,
            ``rung`` (1-based; None at a full budget off the rung grid), ``decision``
            (``continue``, ``stop`` or ``full_budget``), ``by`` (``asha``,
            ``earlier_epochs`` or ``budget``), ``value`` (the epoch's metric) and ``cutoff``
            (the value the earlier-epochs comparison asked for, when it was made) and
            ``asha_cutoff`` (the value Ray's ASHA compared with at the rung; None while the
            rung held no other trial).
    """

    def __init__(self, *, metric: str, mode: str, max_t: int, grace_period: int,
                 reduction_factor: float, compare_earlier_epochs: bool = True) -> None:
        super().__init__(time_attr=TRAINING_ITERATION, metric=metric, mode=mode, max_t=max_t,
                         grace_period=grace_period, reduction_factor=reduction_factor)
        self._sign = 1.0 if mode == "max" else -1.0  # stored values: larger is better
        self._keep_one_in = reduction_factor
        self._full_budget = max_t
        self._compare_earlier_epochs = compare_earlier_epochs
        self._milestones = rung_milestones(grace_period, max_t, reduction_factor)
        # trial id -> {rung: best signed value within the rung's epochs}, kept per rung so a
        # decision reads one number per trial. Stopped trials stay: they are evidence too.
        self._bests: dict[str, dict[int, float]] = {}
        self._last_epoch: dict[str, int] = {}
        self.decisions: list[dict] = []

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
        if not crossed and epoch < self._full_budget:
            return action  # between rungs ASHA decides nothing
        by, cutoff = (BY_BUDGET if epoch >= self._full_budget else BY_ASHA), None
        if action == TrialScheduler.CONTINUE and crossed and self._compare_earlier_epochs:
            rung = crossed[-1]
            others = [other[rung] for trial_id, other in self._bests.items()
                      if trial_id != trial.trial_id and rung in other]
            signed_cutoff = earlier_cutoff(others, self._keep_one_in)
            if signed_cutoff is not None:
                cutoff = self._sign * signed_cutoff
                if bests[rung] < signed_cutoff:
                    compat.count_stopped(self)
                    action, by = TrialScheduler.STOP, BY_EARLIER_EPOCHS
        asha_cutoff = self._asha_cutoff(crossed[-1], trial.trial_id) if crossed else None
        decision = (FULL_BUDGET if by == BY_BUDGET else
                    CONTINUE if action == TrialScheduler.CONTINUE else STOP)
        self.decisions.append({
            "trial_id": trial.trial_id, "epoch": epoch,
            "rung": self._milestones.index(crossed[-1]) + 1 if crossed else None,
            "decision": decision, "by": by, "value": float(value), "cutoff": cutoff,
            "asha_cutoff": asha_cutoff,
            # The driver's clock: the workers' report times come from other processes, so two
            # reports a fraction of a millisecond apart may reach the driver in either order.
            "taken_at": time.time(),
        })
        return action

    def _asha_cutoff(self, milestone: int, trial_id: str) -> float | None:
        """The cutoff Ray's ASHA compared ``trial_id`` with at ``milestone``: the rung's quantile
        over the other trials recorded there (Ray's private rungs: sweeper.compat.asha_rungs)."""
        bracket, rungs = compat.asha_rungs(self)
        for rung_milestone, recorded in rungs:
            if rung_milestone == milestone:
                others = {key: value for key, value in recorded.items() if key != trial_id}
                cutoff = bracket.cutoff(others)
                return None if cutoff is None else float(self._metric_op * cutoff)
        return None


class BudgetedASHA(BudgetedScheduling, EarlierEpochsASHA):
    """:class:`EarlierEpochsASHA` that keeps the sweep's time budget: its decisions are
    taken (and recorded) first, and a trial it lets go on pauses once the budget is spent."""
