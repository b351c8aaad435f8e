"""The persistent Optuna study, warm starts, and a diverging trial (real Ray, real training)."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading

import optuna
import pytest
from cli_helpers import sweep_study
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from sweeper.study import (
    earlier_trials,
    fits_space,
    open_storage,
    read_storage,
    resolve_warm_start,
    study_location,
    study_url_in_sweep,
)
from sweeper.sweep import run_sweep

TINY = ["+experiment=smoke", "data=fashion_mnist", "data.max_train_samples=1000",
        "train.epochs=2", "search.sampler=random"]


def test_sqlite_study_uses_write_ahead_logging(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db")
    optuna.create_study(storage=storage, study_name="s")
    with sqlite3.connect(tmp_path / "optuna.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_new_sweep_keeps_its_study_in_a_journal_and_an_older_sweep_keeps_its_sqlite_file(
        tmp_path):
    """Issue 26: new sweeps write Optuna's journal file; a folder begun before (optuna.db, no
    optuna.log) resumes on its SQLite file; search.storage's database wins over both."""
    assert study_location(None, tmp_path) == str(tmp_path / "optuna.log")
    optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="old")
    assert study_location(None, tmp_path) == f"sqlite:///{tmp_path}/optuna.db"
    assert study_url_in_sweep(study_location(None, tmp_path), tmp_path) == "sqlite:///optuna.db"
    (tmp_path / "optuna.log").touch()
    assert study_location(None, tmp_path) == str(tmp_path / "optuna.log")
    assert study_url_in_sweep(study_location(None, tmp_path), tmp_path) == "optuna.log"
    assert study_location("postgresql://host/db", tmp_path) == "postgresql://host/db"


def _journal_entries(path) -> list[str]:
    return path.read_bytes().decode().splitlines()


def test_a_journal_cut_by_a_killed_driver_is_mended_before_the_sweep_writes_again(tmp_path):
    """A driver killed in the middle of an append leaves half a line and the journal's lock.
    Optuna reads past the half line, but its next append is joined to it: that entry is never
    read back (Optuna 5.0 fails at once, its new trial unknown to its own replay), and readers
    fail from the next entry on; and it waits 30 s on the lock. The sweep's own open drops
    both (a lock only once it is older than a live append holds one); the entries before the
    cut are kept."""
    path = tmp_path / "optuna.log"
    study = optuna.create_study(storage=open_storage(str(path)), study_name="s")
    study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), 0.5)
    whole = path.read_bytes()
    cut = whole + _journal_entries(path)[-1].encode()[:25]  # half of a further entry

    # Without mending: Optuna's own storage on the cut file, one more write, then a reader.
    path.write_bytes(cut)
    unmended = optuna.load_study(study_name="s", storage=JournalStorage(
        JournalFileBackend(str(path))))
    with pytest.raises((ValueError, AttributeError, KeyError)):  # Optuna 5.0: AttributeError
        unmended.ask()  # its entry, joined to the half line, is never read back

    path.write_bytes(cut)
    lock = tmp_path / "optuna.log.lock"
    lock.symlink_to(tmp_path / "no-such-owner")
    open_storage(str(path))
    assert lock.is_symlink()  # just taken: perhaps a live append's
    os.utime(lock, (1, 1), follow_symlinks=False)
    mended = optuna.load_study(study_name="s", storage=open_storage(str(path)))
    assert not lock.is_symlink()
    assert path.read_bytes() == whole
    mended.tell(mended.ask(), 0.7)
    again = optuna.load_study(study_name="s", storage=read_storage(str(path)))
    assert [trial.value for trial in again.trials] == [0.5, 0.7]


def test_the_pickled_study_journal_does_not_grow_with_the_study(tmp_path):
    """Ray's OptunaSearch pickles the searcher, the study's storage included, at every save
    of the experiment state: the journal's index of line offsets is left out of the pickle
    (it would grow by an entry a line), and the unpickled storage reads the whole study."""
    import pickle

    storage = open_storage(str(tmp_path / "optuna.log"))
    study = optuna.create_study(storage=storage, study_name="s")
    empty = len(pickle.dumps(storage))
    for epoch in range(300):
        trial = study.ask()
        trial.report(0.5, epoch)
        study.tell(trial, 0.5)
    assert len(pickle.dumps(storage)) < empty + 100
    restored = optuna.load_study(study_name="s", storage=pickle.loads(pickle.dumps(storage)))
    assert len(restored.trials) == 300 and restored.trials[-1].intermediate_values == {299: 0.5}


def test_epochs_of_a_trial_another_writer_finished_are_dropped_from_the_batch(tmp_path):
    """optuna-dashboard can mark a running trial failed while the sweep writes its epochs:
    the batch keeps the other trial's epochs and raises nothing."""
    from sweeper import compat

    storage = open_storage(str(tmp_path / "optuna.log"))
    study = optuna.create_study(storage=storage, study_name="s")
    finished_elsewhere, running = study.ask(), study.ask()
    dashboard = optuna.load_study(study_name="s", storage=read_storage(str(tmp_path /
                                                                           "optuna.log")))
    dashboard.tell(finished_elsewhere.number, state=TrialState.FAIL)
    compat.add_intermediate_values(storage, [(compat.storage_id(finished_elsewhere), 1, 0.4),
                                             (compat.storage_id(running), 1, 0.6)])
    again = optuna.load_study(study_name="s", storage=read_storage(str(tmp_path / "optuna.log")))
    assert [trial.intermediate_values for trial in again.trials] == [{}, {1: 0.6}]


@pytest.mark.parametrize("source, study, needle", [
    ("{tmp}/nothing-here", None, "search.warm_start="),
    ("sqlite:///{tmp}/two.db", None, "search.warm_start_study=None"),
    ("sqlite:///{tmp}/two.db", "third", "search.warm_start_study='third'"),
    ("{tmp}/sweep", None, "search.warm_start_study=None"),  # its optuna.log
    ("{tmp}/sweep/optuna.log", "third", "search.warm_start_study='third'"),
    ("{tmp}/two.db", None, "search.warm_start_study=None"),  # a SQLite file, by its header
])
def test_warm_start_sources_are_checked(tmp_path, source, study, needle):
    from sweeper.config import ConfigError

    (tmp_path / "sweep").mkdir()
    journal = JournalStorage(JournalFileBackend(str(tmp_path / "sweep" / "optuna.log")))
    for name in ("first", "second"):
        optuna.create_study(storage=f"sqlite:///{tmp_path}/two.db", study_name=name)
        optuna.create_study(storage=journal, study_name=name)
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
        journal = root / "sweep" / "optuna.log"
        while not stop.is_set():
            try:
                if journal.exists():  # optuna-dashboard opens a journal file the same way
                    storage = JournalStorage(JournalFileBackend(str(journal)))
                    optuna.load_study(study_name="smoke", storage=storage).get_trials()
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
    assert read_errors == []  # the reader never saw half an entry or a locked file
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["study"] == {"storage": "optuna.log", "study_name": "smoke"}
    study = sweep_study(sweep_dir, "smoke")
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
@pytest.mark.parametrize("earlier_study_file", ["optuna.log", "optuna.db"])
def test_warm_started_sweep_samples_with_the_earlier_trials(diverging_sweep, compose, tmp_path,
                                                            earlier_study_file):
    """From an earlier sweep's folder, its journal or, for a folder of a sweep made before
    issue 26, its SQLite study (the journal's study copied there by Optuna's copy_study)."""
    _, earlier, _ = diverging_sweep
    if earlier_study_file == "optuna.db":
        old = tmp_path / "old-sweep"
        old.mkdir()
        optuna.copy_study(from_study_name="smoke",
                          from_storage=read_storage(str(earlier / "optuna.log")),
                          to_storage=f"sqlite:///{old}/optuna.db")
        earlier = old
    cfg = compose(*TINY, f"sweep_dir={tmp_path}/warm", "name=warm", "search.num_trials=1",
                  "scheduler=none", "train.optimizer=sgd", f"search.warm_start={earlier}",
                  "search.space.train.lr=choice(0.05, 0.01)")  # 1e6 trials do not fit: left out
    run_sweep(cfg)
    study = sweep_study(tmp_path / "warm", "warm")
    earlier_study = optuna.load_study(study_name="smoke", storage=read_storage(
        resolve_warm_start(str(earlier), None)[0]))
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


@pytest.mark.slow
@pytest.mark.parametrize("overrides, needle", [
    (["search.metric=val_loss", "search.mode=min"],
     "its trials measured val_accuracy (max), this sweep searches val_loss (min)"),
    (["search.mode=min"], "its trials measured val_accuracy (max), this sweep searches "
                          "val_accuracy (min)"),
    (["train.epochs=3"], "its trials had train.epochs=2, this sweep 3"),
])
def test_a_warm_start_measuring_something_else_is_refused_before_ray(
        diverging_sweep, compose, tmp_path, overrides, needle):
    """Issue 41: a warm start from a sweep that maximized val_accuracy put its accuracies into
    a loss study without a word. Optuna adds any such trial (it checks only that parameters
    fit their distributions): sweeper compares what the study says its values measure."""
    from sweeper.config import ConfigError
    from sweeper.sweep import validate

    _, earlier, _ = diverging_sweep
    cfg = compose(*TINY, f"sweep_dir={tmp_path}/warm", "name=warm", "scheduler=none",
                  "train.optimizer=sgd", f"search.warm_start={earlier}",
                  "search.space.train.lr=choice(0.05, 0.01)", *overrides)
    with pytest.raises(ConfigError) as raised:
        validate(cfg)
    message = str(raised.value)
    assert message.startswith(f"search.warm_start='{earlier}' is invalid: ")
    assert needle in message and "\n" not in message
    assert not (tmp_path / "warm").exists()


@pytest.mark.slow
def test_a_warm_start_from_another_dataset_is_refused_before_anything_is_written(
        diverging_sweep, compose, tmp_path, fashion_npz):
    """The same metric on other data: the earlier sweep's data digest (kept in its study)
    differs from this sweep's, found once the data is loaded, before Ray and before the new
    sweep's folder is made. A smaller subset of the same data is the same data set."""
    from sweeper.config import ConfigError

    _, earlier, _ = diverging_sweep
    cfg = compose(*TINY, "data=npz", f"data.path={fashion_npz}", f"sweep_dir={tmp_path}/warm",
                  "name=warm", "scheduler=none", "train.optimizer=sgd",
                  f"search.warm_start={earlier}", "search.space.train.lr=choice(0.05, 0.01)")
    with pytest.raises(ConfigError) as raised:
        run_sweep(cfg)
    assert "its trials trained on other data (fashion_mnist at /usr/share/datasets/" \
           f"fashion-mnist; this sweep npz at {fashion_npz})" in str(raised.value)
    assert not (tmp_path / "warm").exists()
    attrs = sweep_study(earlier, "smoke").user_attrs["sweeper_sweep"]
    assert attrs["metric"] == "val_accuracy" and attrs["epochs"] == 2
    assert len(attrs["data_digest"]) == 32


def _earlier_sweep_folder(compose, folder, direction, *overrides):
    """A sweep folder as sweeper made it before studies said what they measure: its
    sweep_config.yaml and an optuna.log whose study has no sweeper attributes."""
    import yaml

    from sweeper.config import to_sweep_config
    from sweeper.sweep import config_fingerprint

    folder.mkdir()
    earlier = to_sweep_config(compose(*TINY, *overrides))
    (folder / "sweep_config.yaml").write_text(yaml.safe_dump(config_fingerprint(earlier)))
    study = optuna.create_study(storage=open_storage(str(folder / "optuna.log")),
                                study_name="old", direction=direction)
    study.add_trial(optuna.trial.create_trial(
        params={"train.lr": 0.001}, value=0.5,
        distributions={"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)}))


@pytest.mark.parametrize("earlier, now, refused", [
    # An older sweep's folder: its sweep_config.yaml says what its values measured.
    (["search.metric=val_loss", "search.mode=min"], [], "its trials measured val_loss (min)"),
    (["data=npz", "data.path=/elsewhere/x.npz"], [], "its trials trained on other data (npz "
                                                     "at /elsewhere/x.npz"),
    ([], ["data.max_train_samples=500"], None),  # a subset of the same data: the same data set
])
def test_an_older_sweeps_warm_start_is_checked_against_its_sweep_config(
        compose, tmp_path, earlier, now, refused):
    from sweeper.config import ConfigError
    from sweeper.sweep import validate

    mode = "min" if "search.mode=min" in earlier else "max"
    _earlier_sweep_folder(compose, tmp_path / "old", "minimize" if mode == "min" else "maximize",
                          *earlier)
    cfg = compose(*TINY, f"search.warm_start={tmp_path / 'old'}", *now)
    if refused is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as raised:
        validate(cfg)
    assert refused in str(raised.value)


@pytest.mark.parametrize("direction, refused", [("maximize", False), ("minimize", True)])
def test_a_study_that_does_not_say_what_it_measured_must_have_the_sweeps_direction(
        compose, tmp_path, direction, refused):
    """A study not made by sweeper (no attributes, no sweep folder around it): its values are
    taken as this sweep's metric, so its direction must be this sweep's mode."""
    from sweeper.config import ConfigError
    from sweeper.sweep import validate

    url = f"sqlite:///{tmp_path}/other.db"
    optuna.create_study(storage=url, study_name="other", direction=direction)
    cfg = compose(*TINY, f"search.warm_start={url}")
    if not refused:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as raised:
        validate(cfg)
    assert "its trials measured values (min), this sweep searches val_accuracy (max)" in str(
        raised.value)


def test_earlier_trials_are_added_in_this_spaces_distributions_and_types(tmp_path):
    """Optuna adds a trial whatever distributions the study's other trials used (a float
    parameter may come back as categorical or integer) and refuses only a value outside the
    trial's own distribution: the carried trials get this space's distributions, with their
    values in its types, and those outside it are left out."""
    from optuna.distributions import FloatDistribution, IntDistribution

    path = str(tmp_path / "optuna.log")
    earlier = optuna.create_study(storage=open_storage(path), study_name="old")
    for blocks, lr in ((3.0, 0.001), (2.5, 0.001), (2.0, 0.5)):
        earlier.add_trial(optuna.trial.create_trial(
            params={"model.blocks": blocks, "train.lr": lr}, value=0.5,
            distributions={"model.blocks": FloatDistribution(1, 4),
                           "train.lr": FloatDistribution(1e-4, 1.0)}))
    space = {"model.blocks": IntDistribution(1, 4),
             "train.lr": FloatDistribution(1e-4, 1e-2, log=True)}
    carried = earlier_trials(path, "old", space)
    assert [trial.params for trial in carried] == [{"model.blocks": 3, "train.lr": 0.001}]
    assert type(carried[0].params["model.blocks"]) is int
    assert carried[0].distributions == space
