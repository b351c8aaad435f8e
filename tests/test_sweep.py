"""End to end: the smoke sweep on Fashion-MNIST through the real CLI, real Ray and real training.

All tests here read the one session-wide sweep of ``conftest.smoke_sweep``.
"""

from __future__ import annotations

import pytest
from cli_helpers import sweep_study, trial_rows

pytestmark = pytest.mark.slow

TRIAL_FIELDS = {"trial_id", "config", "status", "epochs_trained", "last_metric_value"}


@pytest.fixture(scope="module")
def finished(smoke_sweep):
    assert smoke_sweep.returncode == 0, smoke_sweep.stderr[-3000:]
    return smoke_sweep


def test_the_cli_exits_0_and_says_where_results_are(finished):
    sweep_dir = finished.sweep_dir
    assert f"Sweep directory: {sweep_dir}" in finished.stdout
    assert f"tensorboard --logdir {sweep_dir / 'tensorboard'}" in finished.stdout
    assert f"Optuna study:    optuna-dashboard {sweep_dir / 'optuna.log'}" in finished.stdout
    assert (sweep_dir / "optuna.log").is_file()
    assert "Best 5 of 6 trials by val_accuracy (max); all in trials.csv:" in finished.stdout


def test_the_cli_started_its_own_ray(finished):
    """The positive control for test_config's "no Ray started": RAY_TMPDIR is where Ray goes."""
    assert list((finished.ray_tmpdir / "ray").glob("session_*"))


def test_summary_lists_every_configured_trial(finished):
    summary = finished.summary
    assert (summary["experiment"], summary["metric"], summary["mode"]) == (
        "smoke", "val_accuracy", "max")
    assert summary["num_trials"] == finished.num_trials == len(summary["trials"])
    assert len({trial["trial_id"] for trial in summary["trials"]}) == finished.num_trials
    for trial in summary["trials"]:
        assert set(trial) >= TRIAL_FIELDS
        assert set(trial["config"]) == {"train.lr"}
        assert 1e-4 <= trial["config"]["train.lr"] <= 3e-2
        assert 1 <= trial["epochs_trained"] <= finished.max_epochs
        assert 0.0 <= trial["last_metric_value"] <= 1.0
        assert trial["status"] in ("completed", "early_stopped")
        assert (trial["status"] == "completed") == (trial["epochs_trained"] == finished.max_epochs)


def test_asha_stops_some_trials_before_max_epochs(finished):
    trials = finished.summary["trials"]
    stopped = [t for t in trials if t["epochs_trained"] < finished.max_epochs]
    assert stopped and all(t["status"] == "early_stopped" for t in stopped)
    assert any(t["epochs_trained"] == finished.max_epochs for t in trials)
    # Tune marks the last result of a trial that ASHA stopped as done: what tells such a trial
    # from one cut off by an interruption when the sweep did not finish (test_results).
    rows = trial_rows(finished.sweep_dir)
    assert all(rows[t["trial_id"]][-1]["done"] for t in stopped)
    assert finished.summary["epochs_trained"] == sum(t["epochs_trained"] for t in trials)


def test_the_best_trial_is_clearly_above_chance(finished):
    summary = finished.summary
    best = summary["best"]
    assert {"config", "metric_value", "epochs_trained", "trial_id"} <= set(best)
    assert best["metric_value"] > 0.5  # chance is 0.1 for ten classes
    best_trial = next(t for t in summary["trials"] if t["trial_id"] == best["trial_id"])
    assert best["config"] == best_trial["config"]
    assert best["epochs_trained"] == best_trial["epochs_trained"]
    assert best["metric_value"] == max(t["best_metric_value"] for t in summary["trials"])


def test_the_sweep_directory_holds_trials_tensorboard_and_summary(finished):
    sweep_dir = finished.sweep_dir
    assert (sweep_dir / "summary.json").is_file()
    assert any((sweep_dir / "tensorboard").glob("events.out.tfevents.*"))
    trial_dirs = {path.name for path in (sweep_dir / "trials").glob("trial_*") if path.is_dir()}
    assert trial_dirs == {f"trial_{t['trial_id']}" for t in finished.summary["trials"]}
    # Each trial folder keeps Tune's result files, and TensorBoard events live only in
    # tensorboard/: `tensorboard --logdir` on the sweep folder shows every trial once.
    for trial_dir in trial_dirs:
        assert (sweep_dir / "trials" / trial_dir / "result.json").stat().st_size > 0
        assert (sweep_dir / "trials" / trial_dir / "progress.csv").stat().st_size > 0
    assert not list((sweep_dir / "trials").rglob("events.out.tfevents.*"))


def test_the_study_holds_every_epoch_of_every_trial(finished):
    """Issue 19: Optuna learns from what each trial really did. Ray calls the searcher's
    on_trial_result for no result on which ASHA says STOP, so before the fix trials stopped
    at the first rung reached the study with no value, and completed ones without their last.
    The real study (optuna.log) of the real sweep is compared with Tune's results, epoch by
    epoch."""
    from optuna.trial import TrialState

    study = sweep_study(finished.sweep_dir, "smoke")
    by_tune_id = {trial.user_attrs["ray_trial_id"]: trial for trial in study.trials}
    rows = trial_rows(finished.sweep_dir)
    assert set(by_tune_id) == set(rows)
    statuses = {t["trial_id"]: t["status"] for t in finished.summary["trials"]}
    for trial_id, results in rows.items():
        told = by_tune_id[trial_id]
        epochs = {int(row["training_iteration"]): row["val_accuracy"] for row in results}
        assert told.intermediate_values == pytest.approx(epochs), trial_id
        if statuses[trial_id] == "completed":
            assert told.state == TrialState.COMPLETE
            assert told.value == pytest.approx(epochs[finished.max_epochs])
        else:
            # Optuna gives a pruned trial the value of its last epoch: TPE ranks it by that.
            assert told.state == TrialState.PRUNED
            assert told.value == pytest.approx(epochs[max(epochs)])


def test_the_summary_records_the_schedulers_decisions_in_order(finished):
    decisions = finished.summary["scheduler_decisions"]
    rows = trial_rows(finished.sweep_dir)
    by_trial: dict[str, list[dict]] = {}
    for decision in decisions:
        by_trial.setdefault(decision["trial_id"], []).append(decision)
        # Each decision names the epoch's own value, as Tune recorded it.
        row = rows[decision["trial_id"]][decision["epoch"] - 1]
        assert decision["value"] == pytest.approx(row["val_accuracy"])
    for trial in finished.summary["trials"]:
        last = by_trial[trial["trial_id"]][-1]
        assert last["epoch"] == trial["epochs_trained"]
        expected = "full_budget" if trial["status"] == "completed" else "stop"
        assert last["decision"] == expected
        # Every decision before the last let the trial go on.
        assert all(d["decision"] == "continue" for d in by_trial[trial["trial_id"]][:-1])
    # In the order taken (the driver's clock), each after the report it judged. The reports'
    # own times come from the workers: two of them 0.4 ms apart reached the driver in the
    # other order in a CI run, so they are not the order.
    taken = [d["taken_at"] for d in decisions]
    assert taken == sorted(taken)
    for decision in decisions:
        reported = rows[decision["trial_id"]][decision["epoch"] - 1]["reported_at"]
        assert decision["taken_at"] >= reported - 0.01  # one machine's clock


def test_the_summary_data_block_describes_fashion_mnist(finished):
    """Issue 22: shapes and classes come from the data; 28x28 grayscale, ten classes named as
    Fashion-MNIST names them (issue 25), and the smoke experiment's subset sizes (3000
    training images split 0.8/0.2, 1000 test images)."""
    from sweeper.data import DATASET_CLASS_NAMES

    data = finished.summary["data"]
    assert data == {"name": "fashion_mnist", "input_shape": [28, 28], "num_classes": 10,
                    "class_names": list(DATASET_CLASS_NAMES["fashion_mnist"]),
                    "sizes": {"train": 2400, "val": 600, "test": 1000}}
    info = (finished.sweep_dir / "best_model.json").read_text()
    assert '"input_shape": [\n    28,\n    28\n  ]' in info


def test_the_study_named_for_optuna_dashboard_is_a_file_of_the_folder_or_nothing(finished):
    """The console's "Optuna study:" line: the journal by its path, a SQLite study of a sweep
    begun before the journal by an absolute URL, and no line for a database elsewhere (its
    URL may carry a password)."""
    import dataclasses

    from sweeper.layout import SweepLayout
    from sweeper.summary import Summary, study_file

    layout = SweepLayout(finished.sweep_dir)
    summary = Summary.read(layout.summary)
    assert study_file(summary, layout) == str(finished.sweep_dir / "optuna.log")
    for storage, shown in (("sqlite:///optuna.db", f"sqlite:///{finished.sweep_dir}/optuna.db"),
                           ("postgresql://user:secret@host/db", None)):
        other = dataclasses.replace(summary, study={"storage": storage, "study_name": "smoke"})
        assert study_file(other, layout) == shown


def test_the_exported_model_reads_floats_in_0_1_as_meant_and_refuses_a_wrong_size(
        finished, fashion_mnist_dir):
    """Issue 41: best_model.keras given floats in [0, 1] instead of uint8 pixels scored 0.10
    without a word (Keras cast them to uint8: 0 or 1, black images). In plain Keras, in a
    fresh process: floats in [0, 1] and in [0, 255], and the channel axis added, give what the
    uint8 pixels give; an image of another size is refused."""
    import json
    import subprocess
    import sys

    code = """
import json, sys
from pathlib import Path
import keras, numpy as np
from sweeper.data import load_idx_folder
pixels = load_idx_folder(Path(sys.argv[2]))["x_test"][:200]
reference = keras.models.load_model(sys.argv[1]).predict(pixels, verbose=0)
variants = {"floats_0_1": pixels / 255.0, "float32_0_255": pixels.astype("float32"),
            "channel_axis": pixels[..., None]}
# A fresh load for each, as a user's script would have (Keras' predict, traced for one rank,
# does not take another rank afterwards).
same = {name: float(np.abs(keras.models.load_model(sys.argv[1]).predict(images, verbose=0)
                           - reference).max()) for name, images in variants.items()}
try:
    keras.models.load_model(sys.argv[1]).predict(pixels[:, :20, :20], verbose=0)
    refused = False
except Exception:
    refused = True
print(json.dumps({"same": same, "refused": refused}))
"""
    out = subprocess.run([sys.executable, "-c", code, str(finished.sweep_dir / "best_model.keras"),
                          str(fashion_mnist_dir)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(difference < 1e-5 for difference in found["same"].values()), found
    assert found["refused"]
