"""Optuna is told the truth about trials ASHA stopped early: PRUNED, not COMPLETE.

Both searchers are driven through the calls Ray Tune makes (suggest, on_trial_result,
on_trial_complete); no cluster is needed to see what each tells Optuna.
"""

from __future__ import annotations

import math
import warnings

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from sweeper.searcher import PruningOptunaSearch, final_state, make_sampler

MAX_EPOCHS = 3
SPACE = {"train.lr": FloatDistribution(1e-4, 1e-1, log=True)}


def stock_searcher() -> OptunaSearch:
    return OptunaSearch(space=SPACE, metric="val_accuracy", mode="max",
                        sampler=optuna.samplers.RandomSampler(seed=0))


def pruning_searcher() -> PruningOptunaSearch:
    return PruningOptunaSearch(space=SPACE, metric="val_accuracy", mode="max",
                               sampler=optuna.samplers.RandomSampler(seed=0),
                               max_epochs=MAX_EPOCHS)


def result(epoch: int, val_accuracy: float) -> dict:
    return {"training_iteration": epoch, "epoch": epoch, "val_accuracy": val_accuracy}


def run_trial(searcher, trial_id: str, values: list[float], error: bool = False) -> dict:
    """One trial as Ray Tune drives it: suggest, one result per epoch, then completion."""
    params = searcher.suggest(trial_id)
    for epoch, value in enumerate(values, start=1):
        searcher.on_trial_result(trial_id, result(epoch, value))
    last = result(len(values), values[-1]) if values else None
    searcher.on_trial_complete(trial_id, last, error=error)
    return params


def a_sweep_with_an_early_stopped_trial(searcher) -> optuna.Study:
    """Trial "full" trains all 3 epochs to 0.80; ASHA stops "stopped" after 1 epoch at 0.90."""
    run_trial(searcher, "full", [0.60, 0.70, 0.80])
    run_trial(searcher, "stopped", [0.90])
    return searcher._ot_study


def test_stock_optuna_search_tells_an_early_stopped_trial_as_complete():
    study = a_sweep_with_an_early_stopped_trial(stock_searcher())
    stopped = study.trials[1]
    assert stopped.state == TrialState.COMPLETE
    assert stopped.value == 0.90
    # TPE and the user now see one epoch's score as if it were a full-budget result.
    assert study.best_trial.number == stopped.number


def test_pruning_search_tells_an_early_stopped_trial_as_pruned():
    searcher = pruning_searcher()
    study = a_sweep_with_an_early_stopped_trial(searcher)
    full, stopped = study.trials
    assert full.state == TrialState.COMPLETE
    assert full.value == 0.80
    assert full.intermediate_values == {1: 0.60, 2: 0.70, 3: 0.80}
    assert stopped.state == TrialState.PRUNED
    assert stopped.intermediate_values == {1: 0.90}
    assert study.best_trial.number == full.number
    assert searcher.study is study


def test_both_searchers_sample_the_same_points():
    """The difference is only in what they tell Optuna, not in what they ask."""
    stock, ours = stock_searcher(), pruning_searcher()
    assert run_trial(stock, "t1", [0.5]) == run_trial(ours, "t1", [0.5])
    lr = run_trial(ours, "t2", [0.5])["train.lr"]
    assert 1e-4 <= lr <= 1e-1


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_result_is_told_as_failed(bad):
    searcher = pruning_searcher()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna would warn if a NaN reached it
        run_trial(searcher, "diverged", [0.5, bad, bad])
    trial = searcher.study.trials[0]
    assert trial.state == TrialState.FAIL
    assert trial.intermediate_values == {1: 0.5}


def test_an_errored_or_empty_trial_is_told_as_failed():
    searcher = pruning_searcher()
    run_trial(searcher, "crashed", [0.4, 0.5], error=True)
    run_trial(searcher, "silent", [])
    assert [t.state for t in searcher.study.trials] == [TrialState.FAIL, TrialState.FAIL]


def retried_trial(searcher) -> optuna.trial.FrozenTrial:
    """A trial that fails during epoch 3, is restored from its epoch-1 checkpoint and finishes."""
    searcher.suggest("retried")
    for epoch, value in [(1, 0.5), (2, 0.6), (2, 0.65), (3, 0.7)]:
        searcher.on_trial_result("retried", result(epoch, value))
    searcher.on_trial_complete("retried", result(3, 0.7))
    return searcher._ot_study.trials[0]


def test_a_step_reported_again_after_a_retry_is_not_reported_twice():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trial = retried_trial(pruning_searcher())
    assert trial.intermediate_values == {1: 0.5, 2: 0.6, 3: 0.7}
    assert trial.state == TrialState.COMPLETE


def test_stock_optuna_search_reports_the_repeated_step_again():
    with pytest.warns(UserWarning, match="already reported"):
        retried_trial(stock_searcher())


def test_a_second_completion_changes_nothing():
    searcher = pruning_searcher()
    run_trial(searcher, "once", [0.5, 0.6, 0.7])
    searcher.on_trial_complete("once", result(1, 0.1), error=True)
    assert searcher.study.trials[0].state == TrialState.COMPLETE


@pytest.mark.parametrize(("value", "epochs", "error", "state"), [
    (0.8, 3, False, TrialState.COMPLETE),
    (0.8, 1, False, TrialState.PRUNED),
    (0.8, 3, True, TrialState.FAIL),
    (None, 3, False, TrialState.FAIL),
    (math.nan, 2, False, TrialState.FAIL),
])
def test_final_state(value, epochs, error, state):
    assert final_state(value, epochs, MAX_EPOCHS, error) == state


def test_make_sampler_is_seeded():
    tpe = make_sampler("tpe", seed=3, n_startup_trials=4)
    assert isinstance(tpe, optuna.samplers.TPESampler)
    assert isinstance(make_sampler("random", seed=3, n_startup_trials=0),
                      optuna.samplers.RandomSampler)

    def first_lrs(seed: int) -> list[float]:
        study = optuna.create_study(sampler=make_sampler("tpe", seed, 2))
        return [study.ask(SPACE).params["train.lr"] for _ in range(3)]

    assert first_lrs(3) == first_lrs(3) != first_lrs(4)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("cmaes", seed=0, n_startup_trials=0)



def test_multivariate_tpe_is_a_seeded_joint_model():
    """search.multivariate reaches the sampler: after the random start, the joint model
    proposes other points than one model per parameter would, from the same history."""
    space = {"optimizer": CategoricalDistribution(["sgd", "adam"]),
             "lr": FloatDistribution(0, 1)}

    def proposals(multivariate: bool) -> list[tuple[str, float]]:
        study = optuna.create_study(sampler=make_sampler("tpe", 0, 5, multivariate),
                                    direction="maximize")
        points = []
        for _ in range(15):
            trial = study.ask(space)
            best_lr = 0.9 if trial.params["optimizer"] == "sgd" else 0.1
            study.tell(trial, -abs(trial.params["lr"] - best_lr))
            points.append((trial.params["optimizer"], trial.params["lr"]))
        return points

    joint, independent = proposals(True), proposals(False)
    assert joint[:5] == independent[:5]  # the same seeded random start
    assert joint[5:] != independent[5:]
    assert proposals(True) == joint
