"""ASHA that also weighs what the other trials reached with fewer epochs.

The scheduler is driven through the calls Ray Tune makes (on_trial_add, on_trial_result) with
real Tune trial objects, side by side with Ray's own ASHA fed the same results.
"""

from __future__ import annotations

import math
import pickle

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from sweeper.config import to_sweep_config
from sweeper.scheduler import (
    EarlierEpochsASHA,
    behind_earlier_results,
    raise_bests,
    rung_milestones,
)
from sweeper.tuner import SchedulerStateCallback, make_scheduler

STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


def both_schedulers(mode: str = "max", metric: str = "val_accuracy", max_t: int = 9):
    settings = dict(metric=metric, mode=mode, max_t=max_t, grace_period=1, reduction_factor=3)
    return (EarlierEpochsASHA(**settings),
            ASHAScheduler(time_attr="training_iteration", **settings))


def feed(schedulers, events, metric: str = "val_accuracy") -> list[tuple[str, ...]]:
    """Send (trial, epoch, value) results to each scheduler; each one's decision per result.
    A trial a scheduler stopped gets no more results there, as in Tune."""
    stopped: list[set[str]] = [set() for _ in schedulers]
    decisions = []
    for trial, epoch, value in events:
        row = []
        for scheduler, gone in zip(schedulers, stopped, strict=True):
            if trial.trial_id in gone:
                row.append("-")
                continue
            if epoch == 1:
                scheduler.on_trial_add(None, trial)
            action = scheduler.on_trial_result(
                None, trial, {"training_iteration": epoch, metric: value})
            if action == STOP:
                gone.add(trial.trial_id)
            row.append(action)
        decisions.append(tuple(row))
    return decisions


def trials(count: int) -> list[Trial]:
    return [Trial("__fake", stub=True) for _ in range(count)]


@pytest.mark.parametrize("grace_period, max_t, reduction_factor", [
    (1, 9, 3), (1, 10, 3), (1, 3, 3), (2, 20, 2), (1, 100, 4), (3, 3, 2),
])
def test_rungs_are_the_epochs_at_which_rays_asha_decides(grace_period, max_t,
                                                         reduction_factor):
    asha = ASHAScheduler(time_attr="training_iteration", metric="m", mode="max", max_t=max_t,
                         grace_period=grace_period, reduction_factor=reduction_factor)
    rays = sorted(milestone for milestone, _ in asha._brackets[0]._rungs)
    assert rung_milestones(grace_period, max_t, reduction_factor) == rays


@pytest.mark.parametrize("own, others, expected", [
    (0.1, [], False),  # nothing to compare with
    (0.1, [0.5], True),  # one other: behind it
    (0.6, [0.5], False),
    (0.4, [0.1, 0.2, 0.3, 0.5, 0.6, 0.7], True),  # ASHA's quantile: the top third is ~0.53+
    (0.55, [0.1, 0.2, 0.3, 0.5, 0.6, 0.7], False),
])
def test_behind_means_below_the_top_third_of_the_others(own, others, expected):
    assert behind_earlier_results(own, others, 3) is expected


def test_a_rung_counts_the_best_value_of_its_epochs_and_no_later_one():
    bests: dict[int, float] = {}
    for epoch, value in [(1, 0.3), (2, 0.6), (3, 0.5), (4, 0.9)]:
        raise_bests(bests, [1, 3, 9], epoch, value)
    assert bests == {1: 0.3, 3: 0.6, 9: 0.9}


def test_a_trial_at_chance_first_at_a_rung_is_stopped_where_rays_asha_promotes_it():
    """Two trials from the start (the search benchmark's seed 3): "chance" stays at 0.09, and
    reaches epoch 3 while "learning" has 0.41 and 0.53 after one and two epochs."""
    chance, learning = trials(2)
    events = [(chance, 1, 0.093), (learning, 1, 0.41), (chance, 2, 0.093),
              (learning, 2, 0.53), (chance, 3, 0.093), (learning, 3, 0.62)]
    ours, rays = zip(*feed(both_schedulers(), events), strict=True)
    assert ours[4] == STOP  # chance at its rung: behind what learning reached in 2 epochs
    assert rays[4] == CONTINUE  # Ray's ASHA: the rung was empty, so it promotes
    assert rays[1] == ours[1] == CONTINUE  # learning is ahead everywhere


def test_the_comparison_follows_the_mode():
    """With val_loss (smaller is better) the same story, mirrored."""
    stuck, learning = trials(2)
    events = [(stuck, 1, 2.30), (learning, 1, 1.2), (stuck, 2, 2.30), (learning, 2, 0.9),
              (stuck, 3, 2.30)]
    ours, rays = zip(*feed(both_schedulers(mode="min", metric="val_loss"), events,
                           metric="val_loss"), strict=True)
    assert (ours[4], rays[4]) == (STOP, CONTINUE)
    # and a trial ahead on loss is kept
    ahead, behind = trials(2)
    events = [(behind, 1, 1.5), (ahead, 1, 1.45), (behind, 2, 1.4), (ahead, 2, 0.7),
              (ahead, 3, 0.6)]
    ours, _ = zip(*feed(both_schedulers(mode="min", metric="val_loss"), events,
                        metric="val_loss"), strict=True)
    assert ours[4] == CONTINUE


def test_whatever_rays_asha_stops_is_stopped_too():
    first, second = trials(2)
    events = [(first, 1, 0.50), (second, 1, 0.40)]
    assert feed(both_schedulers(), events)[1] == (STOP, STOP)  # behind at rung 1 either way


def test_a_trial_behind_only_at_an_epoch_between_rungs_is_not_stopped_there():
    leader, slow = trials(2)
    events = [(leader, 1, 0.5), (slow, 1, 0.6), (leader, 2, 0.8), (slow, 2, 0.61)]
    ours, _ = zip(*feed(both_schedulers(), events), strict=True)
    assert ours == (CONTINUE, CONTINUE, CONTINUE, CONTINUE)  # epoch 2 is no rung


def test_a_retried_epoch_keeps_its_first_value_and_nan_is_no_evidence():
    scheduler, _ = both_schedulers()
    retried, other = trials(2)
    feed([scheduler], [(retried, 1, 0.8), (other, 1, math.nan)])
    scheduler.on_trial_result(None, retried, {"training_iteration": 1, "val_accuracy": 0.2})
    assert scheduler._bests == {retried.trial_id: {1: 0.8, 3: 0.8, 9: 0.8}}


def test_the_curves_are_saved_and_restored_with_the_experiment_state():
    scheduler, _ = both_schedulers()
    chance, learning = trials(2)
    feed([scheduler], [(chance, 1, 0.09), (learning, 1, 0.4), (learning, 2, 0.5)])
    state = pickle.loads(pickle.dumps(SchedulerStateCallback(scheduler).get_state()))
    restored, _ = both_schedulers()
    SchedulerStateCallback(restored).set_state(state)
    restored.on_trial_add(None, chance)  # Tune adds the restored trials again
    restored.on_trial_result(None, chance, {"training_iteration": 2, "val_accuracy": 0.09})
    action = restored.on_trial_result(None, chance,
                                      {"training_iteration": 3, "val_accuracy": 0.09})
    assert action == STOP  # learning's epochs from before the restore still count


def test_the_sweep_uses_it_and_decides_as_rays_asha_when_asked(compose):
    def scheduler_of(*overrides: str):
        cfg = to_sweep_config(compose("+experiment=smoke", *overrides))
        return make_scheduler(cfg.scheduler, cfg.search.metric, cfg.search.mode, cfg.train.epochs)

    chosen = scheduler_of()
    assert isinstance(chosen, EarlierEpochsASHA)
    plain = scheduler_of("scheduler.compare_earlier_epochs=false")
    assert isinstance(plain, EarlierEpochsASHA)
    rays = ASHAScheduler(time_attr="training_iteration", metric="val_accuracy", mode="max",
                         max_t=3, grace_period=1, reduction_factor=2)
    chance, learning = trials(2)
    # The story where sweeper's comparison stops `chance` and Ray's ASHA promotes it.
    events = [(chance, 1, 0.09), (learning, 1, 0.5), (chance, 2, 0.1), (learning, 2, 0.6)]
    assert feed([plain, rays, chosen], events) == [
        (CONTINUE, CONTINUE, CONTINUE), (CONTINUE, CONTINUE, CONTINUE),
        (CONTINUE, CONTINUE, STOP), (CONTINUE, CONTINUE, CONTINUE)]
    assert all(d["by"] == "asha" for d in plain.decisions)


def test_every_decision_is_recorded_in_order_with_who_took_it():
    scheduler, _ = both_schedulers(max_t=9)
    chance, learning, late = trials(3)
    feed([scheduler], [(chance, 1, 0.09), (learning, 1, 0.5), (chance, 2, 0.1), (chance, 3, 0.1),
                       *((learning, epoch, 0.5 + epoch / 100) for epoch in range(2, 10)),
                       (late, 1, 0.05)])
    assert [(d["trial_id"], d["epoch"], d["rung"], d["decision"], d["by"])
            for d in scheduler.decisions] == [
        (chance.trial_id, 1, 1, "continue", "asha"),
        (learning.trial_id, 1, 1, "continue", "asha"),
        (chance.trial_id, 3, 2, "stop", "earlier_epochs"),
        (learning.trial_id, 3, 2, "continue", "asha"),
        (learning.trial_id, 9, 3, "full_budget", "budget"),
        (late.trial_id, 1, 1, "stop", "asha"),
    ]
    assert scheduler.decisions[0]["cutoff"] is None  # nobody to compare with yet
    assert scheduler.decisions[2]["value"] == 0.1
    assert scheduler.decisions[2]["cutoff"] == pytest.approx(0.5)


class FakeController:
    """What the budget uses of Tune's controller (as Tune hands it to a scheduler): its
    trials, and pausing one, which Tune ignores for a trial that has no worker yet."""

    def __init__(self, trials_: list[Trial]) -> None:
        self.trials = trials_

    def get_trials(self) -> list[Trial]:
        return self.trials

    def pause_trial(self, trial: Trial, should_checkpoint: bool = True) -> None:
        pass  # these trials have no worker

    def _set_trial_status(self, trial: Trial, status: str) -> None:
        trial.set_status(status)


def test_a_spent_time_budget_pauses_trials_asha_lets_go_on_and_starts_none(monkeypatch):
    from sweeper import scheduler as scheduler_module
    from sweeper.scheduler import TIME_BUDGET, BudgetedASHA

    ended = []
    monkeypatch.setattr(scheduler_module, "end_tune_run_gracefully", lambda: ended.append(1))
    asha = BudgetedASHA(metric="val_accuracy", mode="max", max_t=9, grace_period=1,
                        reduction_factor=3)
    first, second, queued = trials(3)
    controller = FakeController([first, second, queued])
    try:
        TIME_BUDGET.arm(3600)
        assert asha.choose_trial_to_run(controller) is first  # PENDING trials start in order
        first.set_status(Trial.RUNNING)
        assert asha.choose_trial_to_run(controller) is second
        second.set_status(Trial.RUNNING)
        for trial in (first, second):
            asha.on_trial_add(None, trial)
        assert asha.on_trial_result(controller, first, {"training_iteration": 1,
                                                        "val_accuracy": 0.8}) == CONTINUE
        TIME_BUDGET.arm(1e-9)
        # The queued trial (Tune would start it on the next free worker without asking the
        # scheduler: issue 41) is paused before it starts; the run goes on while two run.
        assert asha.choose_trial_to_run(controller) is None and not ended
        assert queued.status == Trial.PAUSED
        # ASHA's own decision stands and is recorded; only a trial it lets go on pauses.
        assert asha.on_trial_result(controller, second, {"training_iteration": 1,
                                                         "val_accuracy": 0.1}) == STOP
        second.set_status(Trial.TERMINATED)
        assert asha.on_trial_result(controller, first, {"training_iteration": 2,
                                                        "val_accuracy": 0.9}) == \
            TrialScheduler.PAUSE
        assert [d["decision"] for d in asha.decisions] == ["continue", "stop"]
        assert asha.choose_trial_to_run(controller) is None and not ended  # first: RUNNING
        first.set_status(Trial.PAUSED)
        assert asha.choose_trial_to_run(controller) is None and ended == [1]
        asha.choose_trial_to_run(controller)
        assert ended == [1]  # told once
    finally:
        TIME_BUDGET.arm(None)
