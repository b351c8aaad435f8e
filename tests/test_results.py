"""Results from plain records: test-set scores, summary.json, trials.csv, the no-result message."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from sweeper.evaluate import classification_metrics
from sweeper.layout import SweepLayout
from sweeper.results import (
    COMPLETED,
    EARLY_STOPPED,
    FAILED,
    UNFINISHED,
    TrialRecord,
    all_trials_ended,
    build_summary,
    make_record,
    records_from_results,
)
from sweeper.summary import Summary, TestScores, outcome_lines, write_trials_csv

TEST_SCORES = TestScores(num_samples=4, accuracy=0.75, precision_macro=0.5, recall_macro=0.5,
                         f1_macro=0.5, per_class={}, confusion_matrix=[[3, 1], [0, 0]])


def record(trial_id: str, lr: float, values: list[float], status: str = COMPLETED,
           error: str | None = None) -> TrialRecord:
    history = [{"epoch": float(i + 1), "val_accuracy": v, "time_total_s": 2.0 * (i + 1),
                "timestamp": 1000.0 + i} for i, v in enumerate(values)]
    finite = [(v, i + 1) for i, v in enumerate(values) if math.isfinite(v)]
    best = max(finite) if finite else None
    return TrialRecord(trial_id=trial_id, config={"train.lr": lr}, status=status,
                       epochs_trained=len(values),
                       last_value=values[-1] if values else None,
                       best_value=best[0] if best else None, best_epoch=best[1] if best else None,
                       history=history, error=error,
                       wall_time_s=history[-1]["time_total_s"] if history else None)


def test_classification_metrics_match_hand_counts():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 1])
    scores = classification_metrics(y_true, y_pred, num_classes=3)
    assert scores["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert scores["accuracy"] == pytest.approx(4 / 6)
    # class 0: P=2/2 R=2/3; class 1: P=2/4 R=2/2; class 2: never predicted -> P=0, R=0.
    assert scores["per_class"]["precision"] == pytest.approx([1.0, 0.5, 0.0])
    assert scores["per_class"]["recall"] == pytest.approx([2 / 3, 1.0, 0.0])
    assert scores["per_class"]["f1"] == pytest.approx([0.8, 2 / 3, 0.0])
    assert scores["per_class"]["support"] == [3, 2, 1]
    assert scores["precision_macro"] == pytest.approx(0.5)
    assert scores["recall_macro"] == pytest.approx(5 / 9)
    assert scores["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 3)
    assert scores["num_samples"] == 6
    json.dumps(scores)  # plain Python types only, ready for summary.json


CLASS_SETS = [
    # (classes in the test labels, classes the model predicts): two-class data scored among
    # ten classes (issue 20: accuracy 0.98, macro F1 0.20), a class only ever predicted, all.
    ((3, 7), (3, 7)),
    ((0, 1), (0, 1, 5)),
    ((2, 4, 9), (2, 4)),
    (tuple(range(10)), tuple(range(10))),
]


@pytest.mark.parametrize(("true_classes", "predicted_classes"), CLASS_SETS)
def test_macro_averages_cover_the_classes_present_as_scikit_learn_does(true_classes,
                                                                       predicted_classes):
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(len(true_classes))
    y_true = rng.choice(true_classes, size=400)
    # Right most of the time, else any predicted class: a realistic, imperfect model.
    y_pred = np.where(rng.random(400) < 0.9, y_true, rng.choice(predicted_classes, size=400))
    y_pred = np.where(np.isin(y_pred, predicted_classes), y_pred, predicted_classes[0])
    scores = classification_metrics(y_true, y_pred, num_classes=10)
    expected = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert (scores["precision_macro"], scores["recall_macro"], scores["f1_macro"]) == (
        pytest.approx(expected[0]), pytest.approx(expected[1]), pytest.approx(expected[2]))
    present = set(true_classes) | set(np.unique(y_pred).tolist())
    assert scores["per_class"]["scored"] == [c in present for c in range(10)]


def test_summary_states_compute_saved_and_the_best_trial(tmp_path):
    records = [record("a", 1e-3, [0.5, 0.7, 0.8]), record("b", 1e-2, [0.4], EARLY_STOPPED),
               record("c", 1e-1, [0.3, math.nan], FAILED, "training loss became nan")]
    typed = build_summary("exp", "val_accuracy", "max", 3, records, SweepLayout(tmp_path),
                          search_space={"train.lr": "tag(log, interval(1e-4, 1))"},
                          test=TEST_SCORES)
    summary = typed.to_dict()
    assert (summary["epochs_trained"], summary["epochs_full_budget"]) == (6, 9)
    assert summary["epochs_saved"] == 3
    assert summary["epochs_ratio"] == pytest.approx(6 / 9, abs=1e-4)
    assert summary["best"]["trial_id"] == "a" and summary["best"]["metric_value"] == 0.8
    assert summary["error"] is None and summary["test"]["accuracy"] == 0.75
    assert summary["search_space"] == {"train.lr": "tag(log, interval(1e-4, 1))"}
    path = tmp_path / "summary.json"
    typed.write(path)
    # A diverged trial's NaN never reaches the file: strict JSON parsers must read it.
    json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))


def test_trials_csv_has_one_row_per_trial_best_first_with_scores_times_and_node(tmp_path):
    records = [record("a", 1e-3, [0.5, 0.7]), record("b", 1e-2, [0.4], EARLY_STOPPED),
               record("c", 1.0, [math.nan], FAILED, "training loss became nan in epoch 1"),
               record("d", 3e-3, [0.6, 0.9, 0.8])]
    for r in records:
        for row in r.history:
            row["val_loss"] = 1.0 - row["val_accuracy"]
    records[3].node = "10.0.0.7"
    summary = build_summary("exp", "val_accuracy", "max", 3, records, SweepLayout(tmp_path))
    path = tmp_path / "trials.csv"
    write_trials_csv(summary, path)
    with path.open() as stream:
        rows = list(csv.DictReader(stream))
    assert [row["trial_id"] for row in rows] == ["d", "a", "b", "c"]  # best first, failed last
    assert list(rows[0]) == ["trial", "trial_id", "train.lr", "status", "epochs_trained",
                             "best_val_accuracy", "last_val_accuracy", "best_epoch", "val_loss",
                             "wall_time_s", "started_at", "ended_at", "node", "error"]
    best = rows[0]
    assert float(best["train.lr"]) == 3e-3 and rows[2]["status"] == EARLY_STOPPED
    assert float(best["best_val_accuracy"]) == 0.9 and int(best["best_epoch"]) == 2
    assert float(best["last_val_accuracy"]) == 0.8 and int(best["epochs_trained"]) == 3
    assert float(best["val_loss"]) == pytest.approx(0.1)  # at the best epoch, not the last
    assert float(best["wall_time_s"]) == 6.0 and best["node"] == "10.0.0.7"
    # The first report came at 1000 s after 2 s of training; the last at 1002 s (UTC).
    assert best["started_at"] == "1970-01-01T00:16:38+00:00"
    assert best["ended_at"] == "1970-01-01T00:16:42+00:00"
    assert rows[3]["error"].startswith("training loss became nan")


def test_trials_csv_of_a_summary_written_before_its_new_columns_leaves_them_empty(tmp_path):
    content = build_summary("exp", "val_loss", "min", 2,
                            [record("a", 1e-3, [0.5, 0.3]), record("b", 1e-2, [0.2])],
                            SweepLayout(tmp_path)).to_dict()
    for trial in content["trials"]:
        for key in ("started_at", "ended_at", "node", "val_loss", "val_accuracy"):
            del trial[key]
    path = tmp_path / "trials.csv"
    write_trials_csv(Summary.from_dict(content), path)  # read back as an older summary.json
    with path.open() as stream:
        rows = list(csv.DictReader(stream))
    assert [row["trial_id"] for row in rows] == ["b", "a"]  # mode min: lowest first
    assert rows[0]["started_at"] == "" and rows[0]["node"] == "" and rows[0]["val_accuracy"] == ""


def test_a_sweep_whose_trials_all_failed_says_so(tmp_path):
    records = [record("a", 1.0, [math.nan], FAILED, "training loss became nan in epoch 1"),
               record("b", 2.0, [], FAILED, "worker died")]
    summary = build_summary("exp", "val_accuracy", "max", 3, records,
                            SweepLayout(tmp_path)).to_dict()
    assert summary["best"] is None and summary["test"] is None
    assert summary["trial_counts"][FAILED] == 2
    assert summary["error"] == ("all 2 trials failed "
                                "(first error: training loss became nan in epoch 1)")
    assert summary["paths"]["best_model"] is None


def test_no_finite_score_without_failures_is_named_too(tmp_path):
    summary = build_summary("exp", "val_accuracy", "max", 3,
                            [record("a", 1.0, [math.nan]), record("b", 1.0, [0.5], FAILED, "x")],
                            SweepLayout(tmp_path)).to_dict()
    # The failure's reason too (issue 41: a user saw none).
    assert summary["error"] == ("no trial produced a finite val_accuracy "
                                "(1 of 2 failed; first error: x)")


def tune_result(trial_id: str, values: list[float], done: bool,
                error: Exception | None = None, **metrics):
    """A trial's result as Ray Tune's ResultGrid hands it over (Tune's own Result class)."""
    import pandas as pd
    from ray.tune import Result

    frame = pd.DataFrame({"epoch": range(1, len(values) + 1), "val_accuracy": values})
    return Result(metrics={"trial_id": trial_id, "epoch": len(values), "done": done, **metrics},
                  checkpoint=None, error=error, path=f"/sweep/trials/trial_{trial_id}",
                  metrics_dataframe=frame)


@pytest.mark.parametrize("last, ended", [
    (tune_result("stopped", [0.3], done=True), True),  # the scheduler's stop: Tune marks done
    (tune_result("full", [0.5, 0.6, 0.7], done=False), True),  # restored: done stays false
    (tune_result("nan", [0.2], done=False, diverged=True), True),
    (tune_result("dead", [0.4], done=False, error=RuntimeError("worker died")), True),
    (tune_result("cut", [0.4, 0.5], done=False), False),  # Ctrl-C: TERMINATED, not ended
])
def test_a_sweep_has_ended_when_every_trial_has(last, ended):
    others = [tune_result("a", [0.5, 0.6, 0.7], done=True), tune_result("b", [0.1], done=True)]
    records = records_from_results([*others, last], "val_accuracy", "max", max_epochs=3,
                                   sweep_done=False)
    assert all_trials_ended(records, num_trials=3) is ended
    assert not all_trials_ended(records, num_trials=4)  # one to come


def test_an_interrupted_sweep_tells_early_stopped_trials_from_cut_off_ones():
    # Tune marks done the result on which the scheduler stopped a trial.
    grid = [tune_result("full", [0.5, 0.6, 0.7], done=True),
            tune_result("stopped", [0.3], done=True),
            tune_result("running", [0.4, 0.5], done=False)]
    interrupted = {r.trial_id: r.status for r in records_from_results(
        grid, "val_accuracy", "max", max_epochs=3, sweep_done=False)}
    assert interrupted == {"full": COMPLETED, "stopped": EARLY_STOPPED, "running": UNFINISHED}
    finished = {r.trial_id: r.status for r in records_from_results(
        grid, "val_accuracy", "max", max_epochs=3, sweep_done=True)}
    assert finished["running"] == EARLY_STOPPED


def test_the_outcome_does_not_count_epochs_cut_off_as_saved_by_early_stopping(tmp_path):
    """A trial ASHA stopped saved epochs; one cut off by a time budget or Ctrl-C (unfinished)
    or one that failed did not: the sentence keeps them apart (found by a new user's trial)."""
    from sweeper.summary import UNFINISHED, outcome_lines

    records = [record("a", 1e-3, [0.5, 0.6, 0.7]), record("b", 1e-2, [0.4], EARLY_STOPPED),
               record("c", 3e-3, [0.45], UNFINISHED)]
    summary = build_summary("exp", "val_accuracy", "max", 3, records, SweepLayout(tmp_path))
    line = next(text for text in outcome_lines(summary) if text.startswith("Epochs trained"))
    assert line.endswith("(56%); early stopping saved 2 epochs, 2 more were not trained by "
                         "failed or unfinished trials")
    complete = build_summary("exp", "val_accuracy", "max", 3, records[:2], SweepLayout(tmp_path))
    line = next(text for text in outcome_lines(complete) if text.startswith("Epochs trained"))
    assert line.endswith("(67%); early stopping saved 2 epochs")


@pytest.mark.parametrize("reported, done, status",
                         [(3, False, COMPLETED), (2, True, EARLY_STOPPED)])
def test_a_result_in_tunes_state_beyond_the_trial_folders_rows_counts(reported, done, status):
    """Tune's saved state is the record of what a trial reported; its folder's result.json can
    lag it when the driver died while copying them (CI, stop 30: a trial that trained all 3
    epochs came back with 2 rows and was counted unfinished, so the sweep never ended). Here
    the rows lack the last epoch: one trial trained all 3, one was stopped by the scheduler
    on its epoch 2 (Tune's ``done``)."""
    rows = [{"epoch": e, "val_accuracy": 0.5 + e / 10, "time_total_s": 2.0 * e}
            for e in range(1, reported)]
    last = {"epoch": reported, "val_accuracy": 0.9, "time_total_s": 2.0 * reported,
            "done": done, "trial_id": "a"}
    trial = make_record("a", {"train.lr": 0.01}, rows, "val_accuracy", "max", max_epochs=3,
                        error=None, done=done, last=last)
    assert trial.status == status
    assert trial.epochs_trained == reported
    assert [row["epoch"] for row in trial.history] == list(range(1, reported + 1))
    assert (trial.best_value, trial.best_epoch) == (0.9, reported)
    assert all_trials_ended([trial], num_trials=1)


def test_the_trials_by_status_read_as_words_without_statuses_no_trial_has(tmp_path):
    trials = [record("a", 0.01, [0.5, 0.6, 0.7]), record("b", 0.02, [0.4], EARLY_STOPPED),
              record("c", 0.03, [0.3], EARLY_STOPPED), record("d", 0.04, [0.2], UNFINISHED)]
    summary = build_summary("s", "val_accuracy", "max", 3, trials, SweepLayout(tmp_path))
    assert summary.counts_phrase() == "4 trials (1 completed, 2 early-stopped, 1 not yet ended)"


def test_of_equal_best_epochs_the_one_whose_checkpoint_tune_kept_is_the_best():
    """Tune keeps the newest of equally scored checkpoints; the first best epoch (2 here)
    has none, so the trial's best is epoch 3, same score, from its checkpoint, not a retrain
    (a smoke sweep's best trial logged "kept no checkpoint of epoch 2; retraining it")."""
    rows = [{"epoch": e, "val_accuracy": v} for e, v in ((1, 0.6), (2, 0.75), (3, 0.75))]
    kept = {3: "/sweep/trials/trial_a/checkpoint_000002"}
    trial = make_record("a", {}, rows, "val_accuracy", "max", max_epochs=3, error=None,
                        done=True, checkpoint_at=kept.get)
    assert (trial.best_value, trial.best_epoch, trial.best_checkpoint) == (0.75, 3, kept[3])
    untouched = make_record("a", {}, rows, "val_accuracy", "max", max_epochs=3, error=None,
                            done=True, checkpoint_at={2: "c2", 3: "c3"}.get)
    assert (untouched.best_epoch, untouched.best_checkpoint) == (2, "c2")


# --- the majority-class baseline and the warning (issue 42) ---------------------------------

LABEL_SETS = [
    # (training labels, validation labels, test labels): a clear majority that is not label 0,
    # a tie (the lowest label wins, as in scikit-learn), a class absent from training, and an
    # empty validation split.
    ([1, 1, 1, 0, 2], [1, 0, 0], [1, 2, 2, 2]),
    ([2, 2, 0, 0, 1], [0, 2, 1], [0, 0, 1, 2]),
    ([2, 2, 2, 1], [0, 0, 2], [2, 1]),
    ([0, 1, 1], [], [1, 0, 0]),
]


@pytest.mark.parametrize(("y_train", "y_val", "y_test"), LABEL_SETS)
def test_the_majority_baseline_is_scikit_learns_most_frequent_dummy(y_train, y_val, y_test):
    from sklearn.dummy import DummyClassifier

    from sweeper.data import Splits
    from sweeper.evaluate import majority_baseline

    def images(labels):
        return np.zeros((len(labels), 4, 4), dtype=np.uint8)

    splits = Splits(images(y_train), np.array(y_train), images(y_val), np.array(y_val, int),
                    images(y_test), np.array(y_test), class_names=("cat", "dog", "fox"))
    baseline = majority_baseline(splits)
    dummy = DummyClassifier(strategy="most_frequent").fit(images(y_train).reshape(-1, 16),
                                                          y_train)
    label = int(dummy.predict(np.zeros((1, 16)))[0])
    assert (baseline.class_index, baseline.class_name) == (label, splits.class_names[label])
    assert baseline.test_accuracy == pytest.approx(
        dummy.score(images(y_test).reshape(-1, 16), y_test))
    assert baseline.val_accuracy == (
        pytest.approx(dummy.score(images(y_val).reshape(-1, 16), y_val)) if y_val else None)
    assert (baseline.val_samples, baseline.test_samples) == (len(y_val), len(y_test))


def scored_summary(tmp_path, matrix: list[list[int]], baseline_test: float,
                   val_accuracy: float = 0.8, evaluated: bool = True) -> Summary:
    """A one-trial summary whose best model has this test confusion matrix, beside a baseline
    that always predicts class 0 ('cat') and scores ``baseline_test`` on the test split."""
    from sweeper.summary import Baseline

    pairs = [(true, predicted) for true, row in enumerate(matrix)
             for predicted, count in enumerate(row) for _ in range(count)]
    y_true, y_pred = np.array(pairs).T
    test = TestScores.from_dict(classification_metrics(y_true, y_pred, len(matrix),
                                                       ["cat", "dog", "fox"][:len(matrix)]))
    total = test.num_samples
    baseline = Baseline(class_index=0, class_name="cat", val_accuracy=0.5,
                        test_accuracy=baseline_test, val_samples=40, test_samples=total)
    return build_summary("exp", "val_accuracy", "max", 1, [record("a", 1e-3, [val_accuracy])],
                         SweepLayout(tmp_path), test=test if evaluated else None,
                         baseline=baseline)


def test_a_model_clearly_better_than_the_majority_class_has_no_warning(tmp_path):
    # 100 test images, baseline 0.5: clearly better is above 0.5 + 2 * sqrt(0.25 / 100) = 0.6.
    summary = scored_summary(tmp_path, [[40, 10], [10, 40]], baseline_test=0.5)
    assert summary.test.accuracy == 0.8 and summary.warnings == []
    assert summary.to_dict()["warnings"] == []
    best_line = next(line for line in outcome_lines(summary) if line.startswith("Best"))
    assert "val_accuracy=0.8000 at epoch 1 (maximized on validation only; always predicting " \
           "'cat': 0.5000)" in best_line
    test_line = next(line for line in outcome_lines(summary) if line.startswith("Test"))
    assert ("accuracy 0.8000 (always predicting 'cat', the training split's most frequent "
            "class: 0.5000)") in test_line
    assert not any(line.startswith("warning") for line in outcome_lines(summary))


@pytest.mark.parametrize(("matrix", "warned"), [
    # accuracy 0.60: at the margin, not above it
    ([[30, 20], [20, 30]], "the best model (test accuracy 0.6000) is not clearly better than "
                           "always predicting 'cat' (0.5000; clearly better means above 0.6000 "
                           "on these 100 test images, 2 standard errors more)"),
    # accuracy 0.80, clearly better, but it ignores the third class
    ([[40, 5, 0], [5, 40, 0], [3, 2, 0]],
     "the best model predicts no test image as class 'fox'"),
    # both: one class for every image
    ([[50, 0], [50, 0]], "the best model (test accuracy 0.5000) is not clearly better than "
                         "always predicting 'cat' (0.5000; clearly better means above 0.6000 on "
                         "these 100 test images, 2 standard errors more) and it predicts no "
                         "test image as class 'dog'"),
])
def test_a_model_no_better_than_the_majority_class_or_ignoring_a_class_is_a_warning(
        tmp_path, matrix, warned):
    from sweeper.report import report_markdown
    from sweeper.summary import NEXT_STEPS

    summary = scored_summary(tmp_path, matrix, baseline_test=0.5)
    [warning] = summary.warnings
    assert warning.startswith(warned + ": try ")
    assert all(step in warning for step in NEXT_STEPS)
    assert summary.to_dict()["warnings"] == [warning]
    assert f"warning: {warning}" in outcome_lines(summary)
    assert f"- **Warning:** {warning}." in report_markdown(summary, drawn=[]).splitlines()


def test_without_test_scores_the_best_validation_score_is_compared(tmp_path):
    # 40 validation images, baseline 0.5: clearly better is above 0.5 + 2 * sqrt(0.25 / 40).
    low = scored_summary(tmp_path, [[1, 0], [0, 1]], 0.5, val_accuracy=0.65, evaluated=False)
    assert low.warnings[0].startswith("the best model (validation accuracy 0.6500) is not "
                                      "clearly better than always predicting 'cat' (0.5000; "
                                      "clearly better means above 0.6581 on these 40 "
                                      "validation images")
    assert "Baseline: always predicting 'cat', the training split's most frequent class, " \
           "scores validation accuracy 0.5000" in outcome_lines(low)
    assert scored_summary(tmp_path, [[1, 0], [0, 1]], 0.5, val_accuracy=0.7,
                          evaluated=False).warnings == []


def test_a_summary_without_a_baseline_still_loads_and_round_trips(tmp_path):
    summary = scored_summary(tmp_path, [[40, 10], [10, 40]], baseline_test=0.5)
    content = json.loads(json.dumps(summary.to_dict()))
    assert content["baseline"] == {"class_index": 0, "class_name": "cat", "val_accuracy": 0.5,
                                   "test_accuracy": 0.5, "val_samples": 40,
                                   "test_samples": 100, "strategy": "most_frequent"}
    assert Summary.from_dict(content).to_dict() == content
    older = {key: value for key, value in content.items() if key not in ("baseline", "warnings")}
    loaded = Summary.from_dict(older)  # a summary.json written before issue 42
    assert loaded.baseline is None and loaded.extra == {} and loaded.warnings == []
    assert any(line.startswith("Test (100 held-out images") and "always predicting" not in line
               for line in outcome_lines(loaded))


def test_counts_read_right_for_one_and_for_zero(tmp_path):
    """Every count in console and report text through one rule (issue 41 found "1 trials"):
    a one-trial, one-epoch sweep, a failed one, and the final table's heading."""
    from sweeper.progress import describe_decision
    from sweeper.summary import counted, format_table, outcome_lines, table_heading

    assert [counted(1, "trial"), counted(0, "trial"), counted(2, "class", "classes"),
            counted(1.0, "CPU"), counted(0.5, "GPU")] == [
        "1 trial", "0 trials", "2 classes", "1 CPU", "0.5 GPUs"]
    one = build_summary("one", "val_accuracy", "max", 1, [record("a", 1e-3, [0.5])],
                        SweepLayout(tmp_path))
    assert one.counts_phrase() == "1 trial (1 completed)"
    line = next(text for text in outcome_lines(one) if text.startswith("Epochs trained"))
    assert line == ("Epochs trained: 1 of 1 for a full-budget search of the same 1 trial "
                    "(100%); early stopping saved 0 epochs")
    assert table_heading(one) == "The trial by val_accuracy (max):"
    decision = {"decision": "full_budget", "epoch": 1, "value": 0.5}
    assert describe_decision(decision, "val_accuracy") == (
        "trained the full budget (1 epoch): val_accuracy 0.5000")
    failed = build_summary("f", "val_accuracy", "max", 3,
                           [record("a", 1.0, [], FAILED, "worker died")], SweepLayout(tmp_path))
    assert failed.to_dict()["error"] == "the trial failed (first error: worker died)"
    cut = build_summary("c", "val_accuracy", "max", 3,
                        [record("a", 1e-3, [0.5, 0.6, 0.7]), record("b", 1e-2, [0.4, 0.5],
                                                                     UNFINISHED)],
                        SweepLayout(tmp_path))
    line = next(text for text in outcome_lines(cut) if text.startswith("Epochs trained"))
    assert line.endswith("early stopping saved 0 epochs, 1 more was not trained by failed or "
                         "unfinished trials")
    # The final table shows at most 5 trials and says so.
    seven = build_summary("s", "val_accuracy", "max", 1,
                          [record(f"t{i}", 1e-3, [i / 10]) for i in range(7)],
                          SweepLayout(tmp_path))
    assert table_heading(seven) == "Best 5 of 7 trials by val_accuracy (max); all in trials.csv:"
    assert len(format_table(seven).splitlines()) == 2 + 5
    two = build_summary("s", "val_accuracy", "max", 1,
                        [record("a", 1e-3, [0.1]), record("b", 1e-3, [0.2])],
                        SweepLayout(tmp_path))
    assert table_heading(two) == "All 2 trials, best first by val_accuracy (max):"


def _fit_a_layer_that_raises() -> None:
    """Train a real Keras model one of whose layers raises as soon as it trains."""
    import keras

    class Fragile(keras.layers.Layer):
        def call(self, inputs, training=False):
            if training:
                raise ValueError("boom: this layer cannot train")
            return inputs

    model = keras.Sequential([keras.Input((4,)), Fragile(), keras.layers.Dense(2)])
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(np.zeros((8, 4)), np.zeros(8), epochs=1, verbose=0)


def _chained() -> None:
    try:
        _fit_a_layer_that_raises()
    except ValueError as error:
        raise RuntimeError("trial setup failed") from error


def _multi_line() -> None:
    raise ValueError("first line of the message\nsecond line\n\nthird")


def _bare_assert() -> None:
    raise AssertionError  # as a bare assert outside pytest's rewritten test modules


def _as_ray_stores_it(raise_it) -> tuple[str, str]:
    """(str() of the RayTaskError Ray raises on the driver, the trial's error.txt as Tune
    writes it after a retried failure: one ``Failure # N`` section per failure)."""
    import traceback

    from ray.exceptions import RayTaskError

    try:
        raise_it()
    except Exception as error:  # the worker's side: Ray keeps the formatted traceback
        ray_error = RayTaskError("ImplicitFunc.train", traceback.format_exc(), error,
                                 pid=4242, ip="10.0.0.1")
    text = str(ray_error)
    error_txt = (f"Failure # 1 (occurred at 2026-12-08_00-00-01)\n"
                 f"{str(RayTaskError('ImplicitFunc.train', 'AssertionError: earlier', None))}\n"
                 f"Failure # 2 (occurred at 2026-12-08_00-00-09)\n{text}\n")
    return text, error_txt


@pytest.mark.parametrize(("raise_it", "line"), [
    (_fit_a_layer_that_raises, "ValueError: boom: this layer cannot train"),
    (_chained, "RuntimeError: trial setup failed"),
    (_multi_line, "ValueError: first line of the message"),
    (_bare_assert, "AssertionError"),
], ids=["keras_layer_in_fit", "chained", "multi_line", "bare_assert"])
def test_a_failed_trials_reason_is_the_exceptions_own_line(raise_it, line):
    """Issue 41: Keras' "Arguments received" block ("  • training=True") was the reason."""
    import traceback

    from sweeper.results import _one_line
    from sweeper.summary import error_line

    ray_text, error_txt = _as_ray_stores_it(raise_it)
    try:
        raise_it()
    except Exception:
        plain = traceback.format_exc()
    assert error_line(plain) == line
    assert error_line(ray_text) == line
    assert error_line(error_txt) == line  # the last failure's section
    from ray.exceptions import RayTaskError

    assert _one_line(RayTaskError("ImplicitFunc.train", plain, None)) == line


@pytest.mark.parametrize(("text", "type_name", "line"), [
    ("The actor died unexpectedly before finishing this task.\n\tclass_name: ImplicitFunc",
     "RayActorError", "RayActorError: The actor died unexpectedly before finishing this task."),
    ("", "TuneError", "TuneError"),
    ("Failure # 1 (occurred at 2026-12-08_00-00-01)\nInvalid trainable: x\n", None,
     "Invalid trainable: x"),
])
def test_an_error_without_a_traceback_is_its_first_line(text, type_name, line):
    from sweeper.summary import error_line

    assert error_line(text, type_name) == line
