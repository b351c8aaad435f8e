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


STORES = ["journal", "sqlite"]  # the default study file (optuna.log); search.storage's database


def _location(tmp_path, store: str) -> str:
    return (str(tmp_path / "optuna.log") if store == "journal"
            else f"sqlite:///{tmp_path / 'optuna.db'}")


def _stored_searcher(tmp_path, store: str) -> PruningOptunaSearch:
    from sweeper.study import open_storage

    return PruningOptunaSearch(space=SPACE, metric="val_accuracy", mode="max",
                               sampler=optuna.samplers.RandomSampler(seed=0),
                               storage=open_storage(_location(tmp_path, store)),
                               study_name="s", max_epochs=MAX_EPOCHS)


def _read_study(tmp_path, store: str) -> optuna.Study:
    """The study as a reader of the file (optuna-dashboard) sees it now, read by Optuna's own
    storage classes."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = (JournalStorage(JournalFileBackend(str(tmp_path / "optuna.log")))
               if store == "journal" else _location(tmp_path, store))
    return optuna.load_study(study_name="s", storage=storage)


def _stored_epochs(tmp_path, store: str) -> dict[int, float]:
    return _read_study(tmp_path, store).trials[0].intermediate_values


@pytest.mark.parametrize("store", STORES)
def test_epochs_reach_the_study_in_a_batch_a_second_and_before_every_save(tmp_path, store):
    """Issue 26: epochs are written in one transaction at most every STUDY_WRITE_EVERY_S,
    before the trial is told finished and before the searcher is saved (Tune saves it with the
    experiment state that a resume restores from), so a resume never lacks an epoch."""
    searcher = _stored_searcher(tmp_path, store)
    searcher.suggest("a")
    searcher.on_trial_result("a", result(1, 0.5))  # the first write of this driver: at once
    searcher.on_trial_result("a", result(2, 0.6))  # within the second: buffered
    assert _stored_epochs(tmp_path, store) == {1: 0.5}
    searcher.save(str(tmp_path / "searcher.pkl"))
    assert _stored_epochs(tmp_path, store) == {1: 0.5, 2: 0.6}
    searcher.on_trial_result("a", result(3, 0.7))
    searcher.on_trial_complete("a", result(3, 0.7))
    study = _read_study(tmp_path, store)
    assert study.trials[0].state == TrialState.COMPLETE
    assert study.trials[0].intermediate_values == {1: 0.5, 2: 0.6, 3: 0.7}


@pytest.mark.parametrize("store", STORES)
def test_a_restored_searcher_reads_the_epochs_the_study_holds(tmp_path, store):
    """A searcher restored from an older save learns the epochs from the study, not from its
    save: an epoch reported after the save and re-trained after the resume is kept once."""
    searcher = _stored_searcher(tmp_path, store)
    searcher.suggest("a")
    searcher.on_trial_result("a", result(1, 0.5))
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.on_trial_result("a", result(2, 0.6))
    searcher.write_study()
    restored = _stored_searcher(tmp_path, store)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("a", result(2, 0.65))  # epoch 2 trained again after the resume
    restored.on_trial_complete("a", result(3, 0.7))
    assert _stored_epochs(tmp_path, store) == {1: 0.5, 2: 0.6, 3: 0.7}


@pytest.mark.parametrize("store", STORES)
def test_a_restored_searcher_tells_each_trial_once_whatever_its_save_says(tmp_path, store):
    """The searcher knows which trials it may still tell without reading each back (issue 26:
    a read of a running trial was a query of its params, attributes and epochs). After a
    restore from a save older than a tell, the study decides: trial "a", told PRUNED after
    the save, is not told again when the resumed sweep ends it; "b", still running, is."""
    searcher = _stored_searcher(tmp_path, store)
    searcher.suggest("a")
    searcher.suggest("b")
    searcher.on_trial_result("a", result(1, 0.5))
    searcher.on_trial_result("b", result(1, 0.4))
    searcher.save(str(tmp_path / "searcher.pkl"))  # both running in this save
    searcher.on_trial_complete("a", result(1, 0.5))  # ASHA stopped it: PRUNED
    restored = _stored_searcher(tmp_path, store)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("a", result(2, 0.9))  # the resumed sweep ends "a" again
    restored.on_trial_result("b", result(2, 0.6))
    restored.on_trial_complete("b", result(3, 0.7))
    study = _read_study(tmp_path, store)
    a, b = study.trials
    assert (a.state, a.value, a.intermediate_values) == (TrialState.PRUNED, 0.5, {1: 0.5})
    assert (b.state, b.value, b.intermediate_values) == (
        TrialState.COMPLETE, 0.7, {1: 0.4, 2: 0.6, 3: 0.7})


def _finished_trials(count: int) -> list:
    """``count`` finished trials; trial 7 is the best by far, the others pruned or middling."""
    trials = []
    for number in range(count):
        value = 0.99 if number == 7 else 0.5 + (number % 10) / 100
        state = TrialState.PRUNED if number % 3 == 0 and number != 7 else TrialState.COMPLETE
        trials.append(optuna.trial.create_trial(
            state=state, value=value if state == TrialState.COMPLETE else None,
            params={"train.lr": 10 ** -(1 + number % 30 / 10)}, distributions=SPACE,
            intermediate_values={1: value}))
    return trials


def test_tpe_models_a_window_of_the_best_and_the_most_recent_trials():
    """Issue 26: past TPE_WINDOW finished trials, TPE sees the best 25 completed ones and the
    most recent others (its cost then stays flat as the study grows), plus running trials."""
    from sweeper.compat import TPE_GOOD_TRIALS, tpe_window

    study = optuna.create_study(direction="maximize")
    study.add_trials(_finished_trials(1200))
    running = study.ask().number
    trials = study.get_trials(deepcopy=False)
    assert tpe_window(trials, 1500, maximize=True) == trials  # small studies: all of them
    window = tpe_window(trials, 1000, maximize=True)
    finished = [trial for trial in window if trial.state != TrialState.RUNNING]
    assert len(finished) == 1000
    assert 7 in {trial.number for trial in window}  # the best, long ago
    assert running in [trial.number for trial in window]  # the constant liar's
    recent = {trial.number for trial in trials[-(1000 - TPE_GOOD_TRIALS):]}
    assert recent <= {trial.number for trial in window}


def test_sweeper_tpe_suggests_from_its_window_on_a_large_study():
    """The sampler sweeper builds samples inside the space on a study past its window, and
    models the window's trials, not all of them."""
    from unittest import mock

    from sweeper import compat
    from sweeper.searcher import TPE_WINDOW

    sampler = make_sampler("tpe", seed=0, n_startup_trials=5)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.add_trials(_finished_trials(TPE_WINDOW + 200))
    modelled = []

    def window(trials, size, maximize):
        modelled.append(len(chosen := compat_window(trials, size, maximize)))
        return chosen

    compat_window = compat.tpe_window
    with mock.patch.object(compat, "tpe_window", window):
        trial = study.ask(SPACE)
    assert SPACE["train.lr"].low <= trial.params["train.lr"] <= SPACE["train.lr"].high
    assert modelled and all(count <= TPE_WINDOW + 1 for count in modelled)  # + itself, running
