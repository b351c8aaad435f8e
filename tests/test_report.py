"""What a finished sweep leaves a user: test scores, the exported model and config, the report.

The slow tests read the session's one smoke sweep on Fashion-MNIST (``conftest.smoke_sweep``,
run through the real CLI); the all-failed sweep runs the CLI once more, on a tiny subset.
"""

from __future__ import annotations

import csv
import ipaddress
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from sweeper.layout import SweepLayout
from sweeper.report import (
    MIN_TRIALS_FOR_IMPORTANCE,
    PLOTS,
    draw_plots,
    most_important_parameter,
    report_markdown,
)
from sweeper.results import COMPLETED, EARLY_STOPPED, TrialRecord, build_summary

TEST_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished(smoke_sweep):
    assert smoke_sweep.returncode == 0, smoke_sweep.stderr[-3000:]
    return smoke_sweep


@pytest.fixture(scope="module")
def smoke_config(finished, fashion_mnist_dir):
    """The smoke sweep's composed config, typed, as the CLI composed it."""
    import sweeper

    return sweeper.compose(["+experiment=smoke", "data=fashion_mnist",
                            f"data.path={fashion_mnist_dir}", f"sweep_dir={finished.sweep_dir}"])


@pytest.fixture(scope="module")
def smoke_splits(smoke_config):
    from sweeper.data import load_splits

    return load_splits(smoke_config.data, smoke_config.train.validation_fraction,
                       smoke_config.train.seed)


@pytest.mark.slow
def test_summary_holds_the_best_trials_test_scores(finished, smoke_config, smoke_splits):
    test = finished.summary["test"]
    for name in TEST_METRICS:
        assert 0.0 <= test[name] <= 1.0, name
    matrix = np.array(test["confusion_matrix"])
    assert matrix.shape == (10, 10)
    assert matrix.sum() == test["num_samples"] == len(smoke_splits.y_test)
    assert len(smoke_splits.y_test) == smoke_config.data.max_test_samples
    assert test["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert test["per_class"]["support"] == np.bincount(smoke_splits.y_test, minlength=10).tolist()
    for name in ("precision", "recall", "f1"):
        assert len(test["per_class"][name]) == 10
    best = finished.summary["best"]
    assert (test["trial_id"], test["epoch"], test["source"]) == (
        best["trial_id"], best["epoch"], "checkpoint")
    assert test["accuracy"] > 0.5  # ten classes: well above chance after 3 epochs


@pytest.mark.slow
def test_the_test_scores_stand_beside_the_majority_class_baseline(finished, smoke_splits):
    """summary.json's baseline is scikit-learn's most-frequent DummyClassifier fit on the
    training labels, scored on the validation and test splits; the smoke sweep's model is
    clearly better, so it and its report carry no warning."""
    from sklearn.dummy import DummyClassifier

    def flat(images):
        return images.reshape(len(images), -1)

    dummy = DummyClassifier(strategy="most_frequent").fit(flat(smoke_splits.x_train),
                                                          smoke_splits.y_train)
    label = int(dummy.predict(flat(smoke_splits.x_test[:1]))[0])
    summary = finished.summary
    assert summary["baseline"] == {
        "strategy": "most_frequent", "class_index": label,
        "class_name": smoke_splits.class_names[label],
        "val_accuracy": pytest.approx(dummy.score(flat(smoke_splits.x_val), smoke_splits.y_val)),
        "test_accuracy": pytest.approx(dummy.score(flat(smoke_splits.x_test),
                                                   smoke_splits.y_test)),
        "val_samples": len(smoke_splits.y_val), "test_samples": len(smoke_splits.y_test)}
    assert summary["warnings"] == []
    baseline = (f"accuracy {summary['test']['accuracy']:.4f} (always predicting "
                f"{smoke_splits.class_names[label]!r}, the training split's most frequent class: "
                f"{summary['baseline']['test_accuracy']:.4f})")
    assert baseline in finished.stdout
    report = (finished.sweep_dir / "report" / "report.md").read_text()
    assert baseline.replace(repr(smoke_splits.class_names[label]),
                            f"`{smoke_splits.class_names[label]}`") in report
    assert not any(line.startswith("warning:") for line in finished.stdout.splitlines())
    # Said before the first trial too: every val_accuracy on the console has its reference.
    assert (f"Baseline: always predicting {smoke_splits.class_names[label]!r}, the training "
            f"split's most frequent class, scores validation accuracy "
            f"{summary['baseline']['val_accuracy']:.4f}") in finished.stdout + finished.stderr
    assert "**Warning:**" not in report


@pytest.mark.slow
def test_the_printout_states_test_scores_compute_saved_and_files(finished):
    summary, out = finished.summary, finished.stdout
    assert f"accuracy {summary['test']['accuracy']:.4f}" in out
    assert (f"Epochs trained: {summary['epochs_trained']} of {summary['epochs_full_budget']}"
            in out)
    assert summary["epochs_trained"] == sum(t["epochs_trained"] for t in summary["trials"])
    assert summary["epochs_full_budget"] == finished.num_trials * finished.max_epochs
    assert summary["epochs_saved"] == summary["epochs_full_budget"] - summary["epochs_trained"]
    for key in ("best_model", "best_config", "report", "trials_csv"):
        path = finished.sweep_dir / summary["paths"][key]  # relative to the sweep folder
        assert str(path) in out and path.is_file(), key


@pytest.mark.slow
def test_best_model_reloads_and_reproduces_the_test_accuracy(finished, smoke_splits):
    import keras

    model = keras.models.load_model(finished.sweep_dir / "best_model.keras")
    predicted = np.argmax(model.predict(smoke_splits.x_test, verbose=0), axis=1)
    accuracy = float(np.mean(predicted == smoke_splits.y_test))
    assert abs(accuracy - finished.summary["test"]["accuracy"]) <= 1e-6


@pytest.mark.slow
def test_best_config_reproduces_the_composed_config(finished, smoke_config):
    from omegaconf import OmegaConf
    from optuna.distributions import CategoricalDistribution

    from sweeper.config import apply_params, to_sweep_config
    from sweeper.space import build_search_space

    best = finished.summary["best"]
    saved = to_sweep_config(_compose_best_config(finished.sweep_dir))
    expected = apply_params(smoke_config, best["config"])
    plain_saved = OmegaConf.to_container(OmegaConf.structured(saved))
    plain_expected = OmegaConf.to_container(OmegaConf.structured(expected))
    # What makes a re-run train exactly this trial, once, in a folder of its own:
    assert plain_saved.pop("name") == "smoke_best"
    assert plain_saved.pop("sweep_dir") == "sweeps/smoke_best"
    assert plain_saved["search"].pop("num_trials") == 1
    assert plain_saved["scheduler"].pop("name") == "none"  # one trial: nothing to compare with
    pinned = build_search_space(saved)
    assert {key: dist.choices for key, dist in pinned.items()} == {
        key: (value,) for key, value in best["config"].items()}
    assert all(isinstance(dist, CategoricalDistribution) for dist in pinned.values())
    del plain_saved["search"]["space"]
    for key in ("name", "sweep_dir"):
        plain_expected.pop(key)
    del plain_expected["search"]["num_trials"], plain_expected["search"]["space"]
    del plain_expected["scheduler"]["name"]
    assert plain_saved == plain_expected
    assert saved.train.lr == best["config"]["train.lr"]


@pytest.mark.slow
def test_best_config_trains_the_best_trial_without_the_searchs_limits(finished, smoke_config,
                                                                      tmp_path):
    """best_config.yaml of a sweep with a time budget, a warm start and a study database
    trains the best trial alone, to the end of the sweep's train.epochs: the budget of the
    search stopped "train the best configuration again" after 3 of 5 epochs."""
    import dataclasses

    from sweeper.config import apply_params
    from sweeper.evaluate import BEST_CONFIG_HEADER, write_best_config
    from sweeper.results import load_records
    from sweeper.sweep import validate

    records = load_records(finished.sweep_dir / "trials", "val_accuracy", "max",
                           smoke_config.train.epochs)
    best = next(r for r in records if r.trial_id == finished.summary["best"]["trial_id"])
    searched = dataclasses.replace(
        smoke_config, search=dataclasses.replace(
            smoke_config.search, time_budget_s=240.0, warm_start=str(finished.sweep_dir),
            storage=f"sqlite:///{tmp_path / 'studies.db'}"))
    path = write_best_config(searched, best, tmp_path)
    assert BEST_CONFIG_HEADER in path.read_text()
    saved, space = validate(_compose_best_config(tmp_path))  # as a re-run checks it
    assert {key: dist.choices for key, dist in space.items()} == {
        key: (value,) for key, value in best.config.items()}
    search = saved.search
    assert (search.num_trials, search.time_budget_s, search.warm_start, search.storage) == (
        1, None, None, None)
    assert saved.scheduler.name == "none"
    # Every trial-level setting is the best trial's: train.epochs the budget its schedule
    # spanned, trained to the end.
    trial = apply_params(smoke_config, best.config)
    assert (saved.train, saved.model, saved.data) == (trial.train, trial.model, trial.data)
    assert saved.train.epochs == smoke_config.train.epochs


def _compose_best_config(sweep_dir: Path):
    """best_config.yaml composed the way ``--config-dir SWEEP --config-name best_config`` does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sweeper.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(sweep_dir), version_base="1.3"):
            return compose(config_name="best_config")
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
def test_every_plot_is_a_valid_nontrivial_png_linked_from_the_report(finished):
    from matplotlib.image import imread

    folder = finished.sweep_dir / "report"
    markdown = (folder / "report.md").read_text()
    # The smoke sweep searches one parameter: importance is not drawn, and report.md says why.
    assert not (folder / "param_importance.png").exists()
    assert "Not drawn: one parameter was searched (train.lr)" in markdown
    for name in set(PLOTS) - {"param_importance"}:
        path = folder / f"{name}.png"
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", name
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 300 and height >= 200 and len(data) > 5000, name
        pixels = imread(path)
        assert pixels.reshape(-1, pixels.shape[-1]).std(axis=0).max() > 0.05, name  # not blank
        assert f"]({name}.png)" in markdown, name
    assert f"{finished.summary['test']['accuracy']:.4f}" in markdown


@pytest.mark.slow
def test_trials_csv_agrees_with_summary(finished):
    with (finished.sweep_dir / "trials.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    trials = {trial["trial_id"]: trial for trial in finished.summary["trials"]}
    assert len(rows) == len(trials) == finished.num_trials
    scored = [float(row["best_val_accuracy"]) for row in rows if row["best_val_accuracy"]]
    assert scored == sorted(scored, reverse=True)  # best first
    for row in rows:
        trial = trials[row["trial_id"]]
        assert row["status"] == trial["status"]
        assert int(row["epochs_trained"]) == trial["epochs_trained"]
        assert float(row["best_val_accuracy"]) == trial["best_metric_value"]
        assert float(row["last_val_accuracy"]) == trial["last_metric_value"]
        assert float(row["train.lr"]) == trial["config"]["train.lr"]
        assert float(row["wall_time_s"]) == trial["wall_time_s"] > 0
        assert float(row["val_loss"]) > 0 and ipaddress.ip_address(row["node"])
        assert int(row["trial"]) == trial["number"]
        started, ended = (datetime.fromisoformat(row[key]) for key in ("started_at", "ended_at"))
        assert started <= ended and (ended - started).total_seconds() >= trial["wall_time_s"] - 2


@pytest.mark.slow
def test_report_command_rebuilds_the_same_summary_without_training(finished, capsys):
    from sweeper.cli import main

    sweep_dir = finished.sweep_dir
    shutil.rmtree(sweep_dir / "report")
    (sweep_dir / "trials.csv").unlink()
    checkpoints = sorted(p.name for p in (sweep_dir / "trials").glob("*/checkpoint_*"))
    main(["report", str(sweep_dir)])
    assert json.loads((sweep_dir / "summary.json").read_text()) == finished.summary
    assert (sweep_dir / "trials.csv").is_file()
    assert {p.stem for p in (sweep_dir / "report").glob("*.png")} == set(PLOTS) - {
        "param_importance"}  # one searched parameter
    assert sorted(p.name for p in (sweep_dir / "trials").glob("*/checkpoint_*")) == checkpoints
    assert f"Report:          {sweep_dir / 'report' / 'report.md'}" in capsys.readouterr().out


def test_report_command_refuses_a_folder_that_is_no_sweep(tmp_path, capsys):
    from sweeper.cli import EXIT_USAGE, main

    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == EXIT_USAGE
    assert "summary.json does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_final_retrain_scores_a_model_trained_on_train_and_validation(
        finished, smoke_config, smoke_splits, tmp_path):
    import dataclasses

    import keras

    from sweeper.evaluate import export_best
    from sweeper.results import load_records

    records = load_records(finished.sweep_dir / "trials", "val_accuracy", "max",
                           smoke_config.train.epochs)
    best = next(r for r in records if r.trial_id == finished.summary["best"]["trial_id"])
    cfg = dataclasses.replace(smoke_config, final=dataclasses.replace(smoke_config.final,
                                                                      retrain=True))
    test = export_best(cfg, best, smoke_splits, tmp_path)
    info = json.loads((tmp_path / "best_model.json").read_text())
    assert test["source"] == info["source"] == "retrain" and info["checkpoint"] is None
    model = keras.models.load_model(tmp_path / "best_model.keras")
    predicted = np.argmax(model.predict(smoke_splits.x_test, verbose=0), axis=1)
    assert abs(float(np.mean(predicted == smoke_splits.y_test)) - test["accuracy"]) <= 1e-6
    assert test["accuracy"] > 0.5
    # A new model, not the checkpoint's copy: the weights differ.
    exported = keras.models.load_model(finished.sweep_dir / "best_model.keras")
    assert not np.array_equal(model.get_weights()[0], exported.get_weights()[0])


@pytest.mark.slow
def test_a_sweep_whose_every_trial_failed_writes_its_summary_and_exits_nonzero(
        tmp_path, fashion_mnist_dir):
    """SGD at lr >= 1000 with L2 = 1 grows the weights ~2000x a step: the loss overflows."""
    sweep_dir = tmp_path / "failing"
    args = ["+experiment=smoke", "data=fashion_mnist", f"data.path={fashion_mnist_dir}",
            f"sweep_dir={sweep_dir}", "search.num_trials=2", "train.epochs=2",
            "data.max_train_samples=200", "data.max_test_samples=100",
            "train.optimizer=sgd", "model.l2=1.0",
            "search.space.train.lr=tag(log, interval(1e3, 1e4))"]
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short socket paths
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    try:
        result = subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=tmp_path,
                                env={**env, "RAY_TMPDIR": str(ray_tmpdir)},
                                capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: all 2 trials failed (first error: training loss became" in result.stderr
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["best"] is None and summary["test"] is None
    assert summary["trial_counts"]["failed"] == 2
    assert summary["error"].startswith("all 2 trials failed")
    assert not (sweep_dir / "best_model.keras").exists()
    assert "The sweep failed" in (sweep_dir / "report" / "report.md").read_text()


def _records() -> list[TrialRecord]:
    def one(trial_id: str, lr: float, values: list[float], status: str) -> TrialRecord:
        history = [{"epoch": float(i + 1), "val_accuracy": v, "time_total_s": 1.0 + i,
                    "timestamp": 100.0 + 10 * int(trial_id) + i} for i, v in enumerate(values)]
        best = max(values)
        return TrialRecord(trial_id, {"train.lr": lr}, status, len(values), values[-1], best,
                           values.index(best) + 1, history, wall_time_s=float(len(values)))
    return [one("1", 1e-3, [0.6, 0.7, 0.8], COMPLETED), one("2", 1e-2, [0.5], EARLY_STOPPED)]


def test_a_plot_that_cannot_be_drawn_is_skipped_saying_why(tmp_path, caplog):
    """No test scores, one scored trial, and a search space that no longer parses."""
    records = _records()[:1]
    summary = build_summary("exp", "val_accuracy", "max", 3, records, SweepLayout(tmp_path),
                            search_space={"train.lr": "not(a, sweep"})
    skipped: dict[str, str] = {}
    with caplog.at_level(logging.INFO, logger="sweeper.report"):
        drawn = draw_plots(summary, records, tmp_path / "report", skipped)
    assert drawn == ["best_so_far", "learning_curves"]
    logged = {name for name in PLOTS if f"Skipped the {name} plot" in caplog.text}
    assert logged == set(skipped) == {"param_importance", "search_space", "confusion_matrix"}
    assert sorted(p.stem for p in (tmp_path / "report").glob("*.png")) == sorted(drawn)
    markdown = report_markdown(summary, drawn, skipped)
    assert "## Parameter importance\n\nNot drawn: one parameter was searched (train.lr)" in (
        markdown)


def _two_parameter_records() -> list[TrialRecord]:
    def one(trial_id: str, lr: float, dropout: float, value: float) -> TrialRecord:
        history = [{"epoch": 1.0, "val_accuracy": value, "time_total_s": 1.0,
                    "timestamp": 100.0 + int(trial_id)}]
        return TrialRecord(trial_id, {"train.lr": lr, "model.dropout": dropout}, COMPLETED, 1,
                           value, value, 1, history, wall_time_s=1.0)
    # The score follows the learning rate; dropout is noise.
    dropouts = [0.3, 0.1, 0.4, 0.2, 0.0, 0.35, 0.05, 0.25, 0.45, 0.15, 0.3, 0.1]
    return [one(str(i), 1e-3 * (i + 1) / 1.5, dropout, 0.5 + 40e-3 * (i + 1) / 1.5)
            for i, dropout in enumerate(dropouts)]


TWO_PARAMETERS = {"train.lr": "tag(log, interval(1e-4, 1e-2))", "model.dropout": "interval(0, 0.5)"}


def test_parameter_importance_needs_two_parameters_and_enough_trials(tmp_path):
    records = _two_parameter_records()
    summary = build_summary("exp", "val_accuracy", "max", 1, records, SweepLayout(tmp_path),
                            search_space=TWO_PARAMETERS)
    assert "param_importance" in draw_plots(summary, records, tmp_path)
    assert (tmp_path / "param_importance.png").stat().st_size > 5000
    skipped: dict[str, str] = {}
    few = records[:MIN_TRIALS_FOR_IMPORTANCE - 1]
    summary = build_summary("exp", "val_accuracy", "max", 1, few, SweepLayout(tmp_path),
                            search_space=TWO_PARAMETERS)
    assert "param_importance" not in draw_plots(summary, few, tmp_path, skipped)
    assert skipped["param_importance"].startswith(f"{len(few)} scored trials")


def test_learning_curves_are_coloured_by_the_most_important_parameter(tmp_path):
    records = _two_parameter_records()
    summary = build_summary("exp", "val_accuracy", "max", 1, records, SweepLayout(tmp_path),
                            search_space=TWO_PARAMETERS)
    assert most_important_parameter(summary, records) == "train.lr"
    figure = PLOTS["learning_curves"][1](summary, records)
    colourbars = [axes.get_ylabel() for axes in figure.axes[1:]]
    assert colourbars == ["train.lr"]


# (search space, each trial's sampled value, the axis labels). Issue 41: a user's setting typed
# by its builder's default (ratio=0.5) sampled 2.0 from choice(1, 2), which summary.json keeps
# as written: the plot was skipped ("'2.0' is not in list").
CHOICE_PLOTS = [
    ({"model.ratio": "choice(1, 2)"}, [2.0, 1.0, 2.0], ["1.0", "2.0"]),
    ({"model.dropout": "choice(0, 0.5)"}, [0.0, 0.5, 0.0], ["0.0", "0.5"]),
    ({"model.width": "choice(8, 16)"}, [8, 16, 16], ["8", "16"]),
    ({"model.flag": "choice(true, false)"}, [True, False, True], ["True", "False"]),
    ({"model.widths": "choice([16, 8], [4])"}, [[16, 8], [4], [4]], ["[16, 8]", "[4]"]),
]


@pytest.mark.parametrize(("space", "sampled", "labels"), CHOICE_PLOTS,
                         ids=[next(iter(space.values())) for space, _, _ in CHOICE_PLOTS])
def test_the_search_space_plot_places_each_choice_as_the_trials_got_it(
        tmp_path, space, sampled, labels):
    (key,) = space
    records = [TrialRecord(str(i), {key: value}, COMPLETED, 1, 0.5 + i / 10, 0.5 + i / 10, 1,
                           [{"epoch": 1.0, "val_accuracy": 0.5 + i / 10, "time_total_s": 1.0,
                             "timestamp": 100.0 + i}], wall_time_s=1.0)
               for i, value in enumerate(sampled)]
    summary = build_summary("exp", "val_accuracy", "max", 1, records, SweepLayout(tmp_path),
                            search_space=space)
    figure = PLOTS["search_space"][1](summary, records)
    axes = figure.axes[0]
    assert [label.get_text() for label in axes.get_xticklabels()] == labels
    positions = [labels.index(json.dumps(v) if isinstance(v, list) else str(v)) for v in sampled]
    assert axes.collections[0].get_offsets()[:, 0].tolist() == positions


def test_fashion_mnist_classes_have_their_names(fashion_mnist_dir):
    from sweeper.config import DataConfig
    from sweeper.data import load_splits

    splits = load_splits(DataConfig(name="fashion_mnist", path=str(fashion_mnist_dir),
                                    max_train_samples=100, max_test_samples=20), 0.2, 0)
    assert splits.class_names[0] == "T-shirt/top" and splits.class_names[9] == "Ankle boot"
