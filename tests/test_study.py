"""The persistent Optuna study, warm starts, and a diverging trial (real Ray, real training)."""

from __future__ import annotations

import json
import math
import sqlite3
import threading

import optuna
import pytest
from optuna.trial import TrialState

from sweeper.study import fits_space, open_storage, resolve_warm_start
from sweeper.sweep import run_sweep

TINY = ["+experiment=smoke", "data=fashion_mnist", "data.max_train_samples=1000",
        "train.epochs=2", "search.sampler=random"]


def test_sqlite_study_uses_write_ahead_logging(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db")
    optuna.create_study(storage=storage, study_name="s")
    with sqlite3.connect(tmp_path / "optuna.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("source, study, needle", [
    ("{tmp}/nothing-here", None, "search.warm_start="),
    ("sqlite:///{tmp}/two.db", None, "search.warm_start_study=None"),
    ("sqlite:///{tmp}/two.db", "third", "search.warm_start_study='third'"),
])
def test_warm_start_sources_are_checked(tmp_path, source, study, needle):
    from sweeper.config import ConfigError

    for name in ("first", "second"):
        optuna.create_study(storage=f"sqlite:///{tmp_path}/two.db", study_name=name)
    with pytest.raises(ConfigError) as raised:
        resolve_warm_start(source.format(tmp=tmp_path), study)
    assert str(raised.value).startswith(needle)


@pytest.fixture(scope="module")
def diverging_sweep(tmp_path_factory, ray_local):
    """Three trials, one with an lr that makes SGD diverge, while a reader polls the study."""
    from sweeper.overrides import compose_config, quote_space_overrides

    root = tmp_path_factory.mktemp("study")
    overrides = [*TINY, f"sweep_dir={root}/sweep", "search.num_trials=3", "scheduler=none",
                 "train.optimizer=sgd", "search.space.train.lr=choice(0.05, 1e6)"]
    cfg = compose_config(quote_space_overrides(overrides))
    read_errors, stop = [], threading.Event()

    def dashboard_like_reader():  # what optuna-dashboard does while the sweep writes
        url = f"sqlite:///{root}/sweep/optuna.db"
        while not stop.is_set():
            try:
                if (root / "sweep" / "optuna.db").exists():
                    optuna.load_study(study_name="smoke", storage=url).get_trials()
            except KeyError:
                pass  # the study is not created yet
            except Exception as error:
                read_errors.append(error)
            stop.wait(0.2)

    reader = threading.Thread(target=dashboard_like_reader)
    reader.start()
    try:
        outcome = run_sweep(cfg)
    finally:
        stop.set()
        reader.join()
    return outcome, root / "sweep", read_errors


@pytest.mark.slow
def test_diverged_trial_fails_with_reason_and_the_others_finish(diverging_sweep):
    outcome, sweep_dir, _ = diverging_sweep
    trials = json.loads((sweep_dir / "summary.json").read_text())["trials"]
    diverged = [t for t in trials if t["config"]["train.lr"] == 1e6]
    healthy = [t for t in trials if t["config"]["train.lr"] != 1e6]
    assert diverged and healthy
    for trial in diverged:
        assert trial["status"] == "failed"
        assert "nan" in trial["error"].lower()
        assert trial["epochs_trained"] == 1  # stopped at once, not trained on, not retried
    assert all(trial["status"] == "completed" for trial in healthy)
    assert outcome.best.config["train.lr"] == 0.05


@pytest.mark.slow
def test_study_has_one_optuna_trial_per_tune_trial(diverging_sweep):
    _, sweep_dir, read_errors = diverging_sweep
    assert read_errors == []  # the reader never saw "database is locked"
    summary = json.loads((sweep_dir / "summary.json").read_text())
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{sweep_dir}/optuna.db")
    by_tune_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert len(study.trials) == len(by_tune_id) == summary["num_trials"] == 3
    for trial in summary["trials"]:
        optuna_trial = by_tune_id[trial["trial_id"]]
        assert optuna_trial.params == trial["config"]
        if trial["status"] == "failed":
            assert optuna_trial.state == TrialState.FAIL and optuna_trial.value is None
        else:
            assert optuna_trial.state == TrialState.COMPLETE
            assert math.isclose(optuna_trial.value, trial["last_metric_value"])
            assert sorted(optuna_trial.intermediate_values) == [1, 2]


@pytest.mark.slow
def test_warm_started_sweep_samples_with_the_earlier_trials(diverging_sweep, compose, tmp_path):
    _, earlier, _ = diverging_sweep
    cfg = compose(*TINY, f"sweep_dir={tmp_path}/warm", "name=warm", "search.num_trials=1",
                  "scheduler=none", "train.optimizer=sgd", f"search.warm_start={earlier}",
                  "search.space.train.lr=choice(0.05, 0.01)")  # 1e6 trials do not fit: left out
    run_sweep(cfg)
    study = optuna.load_study(study_name="warm", storage=f"sqlite:///{tmp_path}/warm/optuna.db")
    earlier_study = optuna.load_study(study_name="smoke",
                                      storage=f"sqlite:///{earlier}/optuna.db")
    carried = [t for t in study.trials if "warm_start_from" in t.user_attrs]
    finished_before = [t for t in earlier_study.trials if t.state == TrialState.COMPLETE]
    # The earlier finished trials are in the new study before its own trial was sampled.
    assert [(t.params, t.value) for t in carried] == [(t.params, t.value) for t in finished_before]
    own = [t for t in study.trials if "ray_trial_id" in t.user_attrs]
    assert len(own) == 1 and own[0].number > max(t.number for t in carried)


def test_earlier_trials_outside_the_space_are_not_carried():
    space = {"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    inside = optuna.trial.create_trial(params={"train.lr": 1e-3}, distributions=space, value=0.5)
    outside = optuna.trial.create_trial(
        params={"train.lr": 0.5},
        distributions={"train.lr": optuna.distributions.FloatDistribution(1e-4, 1.0)}, value=0.9)
    other_keys = optuna.trial.create_trial(
        params={"model.dropout": 0.1},
        distributions={"model.dropout": optuna.distributions.FloatDistribution(0, 0.5)},
        value=0.9)
    assert fits_space(inside, space)
    assert not fits_space(outside, space)
    assert not fits_space(other_keys, space)
