"""The summary of a sweep as one typed object: built once, written once, rendered once.

:class:`Summary` is what ``summary.json`` holds (the same keys since sweeper 0.1.0, so the
summaries of earlier sweeps still load), :func:`outcome_lines` the sentences the console and
``report.md`` both show, and :func:`format_table` / :func:`trials_table` the trials as rows.
Nothing here imports Ray or TensorFlow.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sweeper.layout import SweepLayout, write_json
from sweeper.metrics import VALIDATION_METRICS

COMPLETED = "completed"
EARLY_STOPPED = "early_stopped"
FAILED = "failed"
UNFINISHED = "unfinished"
STATUSES = (COMPLETED, EARLY_STOPPED, FAILED, UNFINISHED)

# summary.json's ``state``: every trial ended; the sweep was cut off (a resume continues it);
# search.time_budget_s ran out (results of the trials so far, best model scored; resumable).
STATE_COMPLETE, STATE_INTERRUPTED, STATE_TIME_BUDGET = "complete", "interrupted", "time_budget"


@dataclass(frozen=True)
class TrialSummary:
    """One trial in summary.json.

    Attributes:
        trial_id: Ray Tune's trial id (8 hex digits; ``trials/trial_<id>/``).
        number: From 1 in the order Tune created the trials: the number on the console, in
            sweep.log and in TensorBoard (None in summaries written before it was kept).
        config: The sampled values, ``{"train.lr": 0.001}``.
        status: completed, early_stopped, failed or unfinished.
        epochs_trained: Epochs the trial reported.
        last_metric_value: The search metric at its last epoch (None: missing or not finite).
        best_metric_value: Its best finite value of the search metric (None: none).
        best_epoch: The epoch (1-based) of ``best_metric_value``.
        wall_time_s: Seconds it trained (Ray's ``time_total_s`` at its last report).
        started_at, ended_at: When it started and last reported (UTC, ISO 8601).
        node: The node it last ran on (Ray's node IP).
        val_loss, val_accuracy: At its best epoch.
        error: Why it failed, one line (None unless failed).
    """

    trial_id: str
    config: dict[str, Any]
    status: str
    epochs_trained: int
    last_metric_value: float | None
    best_metric_value: float | None
    best_epoch: int | None
    number: int | None = None
    wall_time_s: float | None = None
    started_at: str | None = None
    ended_at: str | None = None
    node: str | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class BestTrial:
    """The trial with the best validation score (by ``mode``), as summary.json keeps it.

    Attributes:
        trial_id: Ray Tune's trial id.
        number: Its number in the sweep, as on the console (None in older summaries).
        config: Its sampled values.
        metric_value: Its best value of the search metric (validation data only).
        epoch: The epoch that value came at.
        epochs_trained: Epochs it trained in all.
        checkpoint: Its checkpoint of that epoch, relative to the sweep folder (None: none kept).
    """

    trial_id: str
    config: dict[str, Any]
    metric_value: float
    epoch: int
    epochs_trained: int
    checkpoint: str | None = None
    number: int | None = None


@dataclass(frozen=True)
class TestScores:
    """The best model's scores on the held-out test split (sweeper.evaluate).

    Attributes:
        num_samples: Test images scored.
        accuracy, precision_macro, recall_macro, f1_macro: In [0, 1]; macro averages over
            the classes present in the labels or the predictions.
        per_class: ``precision``, ``recall``, ``f1``, ``support``, ``scored`` and
            ``class_names``, one entry per class.
        confusion_matrix: ``[i][j]`` counts true class i predicted as j.
        trial_id, epoch: The trial and epoch the model came from.
        source: ``checkpoint`` (the trial's own) or ``retrain`` (final.retrain).
    """

    __test__ = False  # a name pytest would otherwise try to collect from test modules

    num_samples: int
    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    per_class: dict[str, list]
    confusion_matrix: list[list[int]]
    trial_id: str | None = None
    epoch: int | None = None
    source: str | None = None

    @classmethod
    def from_dict(cls, content: dict[str, Any]) -> TestScores:
        """From summary.json's or best_model.json's ``test`` block."""
        return _from_dict(cls, content)

    @property
    def never_predicted(self) -> list[int]:
        """The classes (labels) that have test images but that the model predicted for none:
        a model that ignores a class, which accuracy alone can hide."""
        matrix = self.confusion_matrix
        return [label for label, row in enumerate(matrix)
                if sum(row) > 0 and sum(other[label] for other in matrix) == 0]


@dataclass(frozen=True)
class Baseline:
    """The majority-class baseline every score is compared with: always predict the training
    split's most frequent class (scikit-learn's ``DummyClassifier(strategy="most_frequent")``
    fit on the training labels; of equally frequent classes, the lowest label).

    Attributes:
        class_index, class_name: The class it always predicts.
        val_accuracy, test_accuracy: Its accuracy on the validation and test splits, in
            [0, 1] (None: the split is empty).
        val_samples, test_samples: The images of each split.
        strategy: ``most_frequent``, as scikit-learn names it.
    """

    class_index: int
    class_name: str
    val_accuracy: float | None
    test_accuracy: float | None
    val_samples: int
    test_samples: int
    strategy: str = "most_frequent"

    @classmethod
    def from_dict(cls, content: dict[str, Any]) -> Baseline:
        """From summary.json's ``baseline`` block."""
        return _from_dict(cls, content)


# A score is clearly better than the baseline when it exceeds the baseline's accuracy p on the
# same n images by more than this many binomial standard errors sqrt(p (1 - p) / n).
CLEAR_MARGIN_STANDARD_ERRORS = 2.0

# What to try when the best model is no better than the baseline: settings that exist today.
# Issue 42's +experiment=photos and model=backbone join this list when they are built.
NEXT_STEPS = (
    "more epochs (train.epochs)",
    "a smaller batch (train.batch_size)",
    "other learning rates (search.space.train.lr)",
    "batch norm (model.batch_norm=true)",
    "augmentation (train.flip=horizontal, train.translation=0.1)",
)


def clear_margin(baseline_accuracy: float, num_samples: int) -> float:
    """The accuracy a model must exceed on ``num_samples`` images to be clearly better than a
    baseline that scores ``baseline_accuracy`` on them.

    The rule: more than :data:`CLEAR_MARGIN_STANDARD_ERRORS` (2) binomial standard errors
    ``sqrt(p (1 - p) / n)`` above the baseline's accuracy ``p``, the normal approximation of a
    one-sided binomial test at about the 2.3% level of "the model is right no more often
    than the baseline" (T. Mitchell, *Machine Learning*, 1997, section 5.2: the standard
    deviation of an accuracy measured on n independent samples). On 24 images with a 0.5
    baseline that is 0.70; on 1000 images with a 0.1 baseline, 0.119.

    Args:
        baseline_accuracy: The baseline's accuracy, in [0, 1].
        num_samples: The images both were scored on (0: returns the baseline itself).
    """
    p = baseline_accuracy
    if num_samples <= 0:
        return p
    return p + CLEAR_MARGIN_STANDARD_ERRORS * math.sqrt(p * (1.0 - p) / num_samples)


@dataclass
class Summary:
    """Everything a sweep's outcome says; ``summary.json`` is :meth:`to_dict`.

    Attributes:
        experiment: The sweep's name.
        metric, mode: The search metric and whether larger (max) or smaller (min) is better.
        max_epochs: The epoch budget of a trial (train.epochs).
        trials: One record per trial, in trial-id order.
        best: The best trial, None when no trial produced a finite metric.
        test: The best model's test scores, None when not evaluated.
        baseline: The majority-class baseline on validation and test (None: a summary written
            before issue 42, or of a sweep read from its trial folders).
        search_space: The flat search space as written, ``{"train.lr": "tag(log, ...)"}``.
        state: complete, interrupted or time_budget.
        time_budget_s: The time budget that ran out (None unless state is time_budget).
        data: The data's description (name, input shape, classes, split sizes).
        study: The Optuna study's storage (relative to the folder for a study file inside it:
            ``optuna.log``, or ``sqlite:///optuna.db`` for a sweep begun before issue 26) and
            name.
        reproducible: Whether search.reproducible was on.
        scheduler_decisions: ASHA's decisions in order (None: no ASHA).
        paths: Where each file is, relative to the sweep folder.
        extra: Keys of a summary.json this version does not know, kept as they were.
    """

    experiment: str
    metric: str
    mode: str
    max_epochs: int
    trials: list[TrialSummary] = field(default_factory=list)
    best: BestTrial | None = None
    test: TestScores | None = None
    baseline: Baseline | None = None
    search_space: dict[str, str] = field(default_factory=dict)
    state: str = STATE_COMPLETE
    time_budget_s: float | None = None
    data: dict[str, Any] | None = None
    study: dict[str, str] | None = None
    reproducible: bool = False
    scheduler_decisions: list[dict] | None = None
    paths: dict[str, str | None] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_trials(self) -> int:
        return len(self.trials)

    @property
    def trial_counts(self) -> dict[str, int]:
        return {status: sum(t.status == status for t in self.trials) for status in STATUSES}

    def counts_phrase(self) -> str:
        """The trials by status for a sentence: ``5 trials (1 completed, 3 early-stopped, 1 not
        yet ended)``; statuses no trial has are left out."""
        words = {COMPLETED: "completed", EARLY_STOPPED: "early-stopped", FAILED: "failed",
                 UNFINISHED: "not yet ended"}
        parts = [f"{count} {words[status]}" for status, count in self.trial_counts.items()
                 if count]
        return counted(self.num_trials, "trial") + (f" ({', '.join(parts)})" if parts else "")

    @property
    def epochs_trained(self) -> int:
        return sum(t.epochs_trained for t in self.trials)

    @property
    def epochs_full_budget(self) -> int:
        """Epochs a search of the same trials without early stopping would train."""
        return len(self.trials) * self.max_epochs

    @property
    def epochs_ratio(self) -> float | None:
        full = self.epochs_full_budget
        return round(self.epochs_trained / full, 4) if full else None

    @property
    def epochs_saved(self) -> int:
        return self.epochs_full_budget - self.epochs_trained

    @property
    def error(self) -> str | None:
        """Why the sweep has no best trial, in words a user can act on (None: it has one)."""
        if self.best is not None:
            return None
        failed = [t for t in self.trials if t.status == FAILED]
        if self.trials and len(failed) == len(self.trials):
            every = "the trial" if len(failed) == 1 else f"all {len(failed)} trials"
            return f"{every} failed (first error: {failed[0].error})"
        first = f"; first error: {failed[0].error}" if failed else ""
        return (f"no trial produced a finite {self.metric} "
                f"({len(failed)} of {len(self.trials)} failed{first})")

    @property
    def warnings(self) -> list[str]:
        """Why the best model's scores should not be trusted: one line, or none where nothing
        was found. It is not clearly better than always predicting the majority class
        (:func:`clear_margin`) on the test split, or on validation where the test split was
        not scored; or it predicts no test image as some class that has test images. The line
        names what to try (:data:`NEXT_STEPS`)."""
        problems = []
        baseline, test = self.baseline, self.test
        scored = self._baseline_comparison()
        if scored is not None:
            split, accuracy, expected, num_samples = scored
            needed = clear_margin(expected, num_samples)
            if accuracy <= needed:
                problems.append(
                    f"the best model ({split} accuracy {accuracy:.4f}) is not clearly better "
                    f"than always predicting {baseline.class_name!r} ({expected:.4f}; clearly "
                    f"better means above {needed:.4f} on these {num_samples} {split} images, "
                    f"{CLEAR_MARGIN_STANDARD_ERRORS:g} standard errors more)")
        ignored = test.never_predicted if test else []
        if ignored:
            names = class_names(self, len(test.confusion_matrix))
            listed = ", ".join(repr(names[label]) for label in ignored[:5])
            more = f" and {len(ignored) - 5} more" if len(ignored) > 5 else ""
            noun = "class" if len(ignored) == 1 else "classes"
            problems.append(f"{'it' if problems else 'the best model'} predicts no test image "
                            f"as {noun} {listed}{more}")
        if not problems:
            return []
        return [" and ".join(problems) + ": try " + ", ".join(NEXT_STEPS[:-1])
                + " or " + NEXT_STEPS[-1]]

    def _baseline_comparison(self) -> tuple[str, float, float, int] | None:
        """(split, the best model's accuracy, the baseline's, images) on the test split, or
        on validation where the test split was not scored; None where either is unknown."""
        baseline = self.baseline
        if baseline is None or self.best is None:
            return None
        if self.test is not None:
            if baseline.test_accuracy is None or not self.test.num_samples:
                return None
            return "test", self.test.accuracy, baseline.test_accuracy, self.test.num_samples
        best = next((t for t in self.trials if t.trial_id == self.best.trial_id), None)
        accuracy = best.val_accuracy if best is not None else None
        if accuracy is None or baseline.val_accuracy is None or not baseline.val_samples:
            return None
        return "validation", accuracy, baseline.val_accuracy, baseline.val_samples

    def to_dict(self) -> dict[str, Any]:
        """summary.json's content (strict JSON: non-finite values are None)."""
        return {
            "experiment": self.experiment,
            "metric": self.metric,
            "mode": self.mode,
            "num_trials": self.num_trials,
            "trial_counts": self.trial_counts,
            "max_epochs": self.max_epochs,
            "epochs_trained": self.epochs_trained,
            "epochs_full_budget": self.epochs_full_budget,
            "epochs_ratio": self.epochs_ratio,
            "epochs_saved": self.epochs_saved,
            "error": self.error,
            "search_space": dict(self.search_space),
            "best": None if self.best is None else _as_dict(self.best),
            "test": None if self.test is None else _as_dict(self.test),
            "baseline": None if self.baseline is None else _as_dict(self.baseline),
            "warnings": self.warnings,
            "paths": dict(self.paths),
            "trials": [{"trial_id": t.trial_id, "number": t.number, **_as_dict(t),
                        "last_metric_value": finite(t.last_metric_value),
                        "best_metric_value": finite(t.best_metric_value)}
                       for t in self.trials],
            "state": self.state,
            # Only where the budget ran out, as summaries have held it since issue 24.
            **({} if self.time_budget_s is None else {"time_budget_s": self.time_budget_s}),
            "data": self.data,
            "study": self.study,
            "reproducible": self.reproducible,
            "scheduler_decisions": self.scheduler_decisions,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, content: dict[str, Any]) -> Summary:
        """A summary from summary.json's content; keys a summary of an earlier version lacks
        take their defaults, keys this version does not know are kept in ``extra``."""
        derived = {"num_trials", "trial_counts", "epochs_trained", "epochs_full_budget",
                   "epochs_ratio", "epochs_saved", "error", "warnings"}
        known = {f.name for f in fields(cls)} | derived
        best, test = content.get("best"), content.get("test")
        baseline = content.get("baseline")
        return cls(
            experiment=content["experiment"], metric=content["metric"], mode=content["mode"],
            max_epochs=int(content["max_epochs"]),
            trials=[_from_dict(TrialSummary, t) for t in content.get("trials") or []],
            best=None if best is None else _from_dict(BestTrial, best),
            test=None if test is None else TestScores.from_dict(test),
            baseline=None if baseline is None else Baseline.from_dict(baseline),
            search_space=dict(content.get("search_space") or {}),
            state=content.get("state", STATE_COMPLETE),
            time_budget_s=content.get("time_budget_s"),
            data=content.get("data"), study=content.get("study"),
            reproducible=bool(content.get("reproducible", False)),
            scheduler_decisions=content.get("scheduler_decisions"),
            paths=dict(content.get("paths") or {}),
            extra={key: value for key, value in content.items() if key not in known},
        )

    def write(self, path: Path) -> None:
        """Write summary.json (atomically: a reader never sees half of it)."""
        write_json(path, self.to_dict(), indent=2)

    @classmethod
    def read(cls, path: Path) -> Summary:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _as_dict(value: Any) -> dict[str, Any]:
    return {f.name: getattr(value, f.name) for f in fields(value)}


def _from_dict(cls: type, content: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in content.items() if key in names})


def finite(value: float | None) -> float | None:
    """None for a missing or non-finite figure, so summary.json stays strict JSON."""
    return value if value is not None and math.isfinite(value) else None


def trial_label(trial: TrialSummary | BestTrial) -> str:
    """``3 (id 9fe9532e)``: the number people see on the console and in TensorBoard, and
    Ray's id (folder ``trials/trial_<id>``); just the id for summaries without a number."""
    return trial.trial_id if trial.number is None else f"{trial.number} (id {trial.trial_id})"


def ranked(trials: list[TrialSummary], mode: str) -> list[TrialSummary]:
    """Trials with a score, best first."""
    scored = [t for t in trials if t.best_metric_value is not None and t.status != FAILED]
    return sorted(scored, key=lambda t: t.best_metric_value, reverse=(mode == "max"))


def class_names(summary: Summary, num_classes: int) -> list[str]:
    """The names of the classes 0..num_classes-1: the summary's data block, the test block's,
    or the labels themselves for a summary written before either had them."""
    for names in ((summary.data or {}).get("class_names"),
                  (summary.test.per_class if summary.test else {}).get("class_names")):
        if names and len(names) == num_classes:
            return [str(name) for name in names]
    return [str(label) for label in range(num_classes)]


# --- rendering: the one place the outcome is put into words ---------------------------------

def outcome_lines(summary: Summary, markdown: bool = False) -> list[str]:
    """The outcome in a few sentences, for the console (``markdown=False``) and report.md:
    the best trial, its test scores beside the majority-class baseline's, a warning where the
    model is no better than that baseline or ignores a class (:attr:`Summary.warnings`), the
    compute early stopping saved, the trials and data."""
    metric, best, test = summary.metric, summary.best, summary.test

    def code(text: Any) -> str:
        return f"`{text}`" if markdown else str(text)

    baseline = summary.baseline
    majority = None if baseline is None else (
        f"always predicting {code(baseline.class_name) if markdown else repr(baseline.class_name)}")
    lines = []
    if best is None:
        if markdown:  # the console says it as the command's error
            lines.append(f"**The sweep failed:** {summary.error}.")
    else:
        values = ", ".join(f"{key}={cell(value)}" for key, value in best.config.items())
        # A validation accuracy stands beside the baseline's on the same images.
        against = ("" if metric != "val_accuracy" or majority is None
                   or baseline.val_accuracy is None else
                   f"; {majority}: {baseline.val_accuracy:.4f}")
        lines.append(f"Best: trial {code(trial_label(best))} {metric}={best.metric_value:.4f} at "
                     f"epoch {best.epoch} ({summary.mode}imized on validation only{against}) "
                     f"with {code(values) if markdown else '{' + values + '}'}")
    if test:
        against = ("" if majority is None or baseline.test_accuracy is None else
                   f" ({majority}, the training split's most frequent class: "
                   f"{baseline.test_accuracy:.4f})")
        lines.append(f"Test ({test.num_samples} held-out images, model from its {test.source}): "
                     f"accuracy {test.accuracy:.4f}{against}, "
                     f"macro precision {test.precision_macro:.4f}, "
                     f"recall {test.recall_macro:.4f}, F1 {test.f1_macro:.4f}")
    elif majority is not None and baseline.val_accuracy is not None:
        lines.append(f"Baseline: {majority}, the training split's most frequent class, scores "
                     f"validation accuracy {baseline.val_accuracy:.4f}")
    lines += [f"**Warning:** {text}." if markdown else f"warning: {text}"
              for text in summary.warnings]
    if summary.epochs_ratio is not None:
        # Epochs a trial did not train because it failed or was cut off (Ctrl-C, a time budget)
        # were not saved by early stopping: said apart, so the saving is not overstated.
        cut = sum(summary.max_epochs - t.epochs_trained for t in summary.trials
                  if t.status in (FAILED, UNFINISHED))
        lines.append(f"Epochs trained: {summary.epochs_trained} of {summary.epochs_full_budget} "
                     f"for a full-budget search of the same "
                     f"{counted(summary.num_trials, 'trial')} ({summary.epochs_ratio:.0%}); "
                     f"early stopping saved {counted(summary.epochs_saved - cut, 'epoch')}"
                     + (f", {cut} more {'was' if cut == 1 else 'were'} not trained by failed "
                        "or unfinished trials" if cut else ""))
    if markdown:
        counts = ", ".join(f"{n} {status}" for status, n in summary.trial_counts.items() if n)
        lines.append(f"Trials: {summary.num_trials} ({counts})")
        data = summary.data
        if data:
            sizes = data["sizes"]
            shape = "x".join(str(side) for side in data["input_shape"])
            lines.append(f"Data: {data['name']}, images of shape {shape}, "
                         f"{counted(data['num_classes'], 'class', 'classes')}, "
                         f"{sizes['train']} training / "
                         f"{sizes['val']} validation / {sizes['test']} test images")
        return [line if line.startswith("**The sweep failed") else f"- {line}" for line in lines]
    return lines


def file_lines(summary: Summary, layout: SweepLayout) -> list[str]:
    """Where the sweep's files are (those that exist), for the console."""
    import shlex

    lines = [f"Sweep directory: {layout.root}", f"Summary:         {layout.summary}"]
    for label, key in (("Best model", "best_model"), ("Best config", "best_config"),
                       ("Report", "report"), ("Trials table", "trials_csv")):
        path = layout.resolve(summary.paths.get(key))
        if path is not None and path.exists():
            lines.append(f"{label + ':':<17}{path}")
    tensorboard = layout.resolve(summary.paths.get("tensorboard", SweepLayout.TENSORBOARD))
    lines.append(f"TensorBoard:     tensorboard --logdir {shlex.quote(str(tensorboard))}")
    study = study_file(summary, layout)
    if study is not None:
        lines.append(f"Optuna study:    optuna-dashboard {shlex.quote(study)}")
    return lines


def study_file(summary: Summary, layout: SweepLayout) -> str | None:
    """The study as optuna-dashboard opens it, where it is a file in the sweep folder: the
    journal's path, or a ``sqlite:///`` URL with an absolute path (a sweep begun before issue
    26); None for a database elsewhere (its URL may hold a password) or no study."""
    storage = (summary.study or {}).get("storage")
    if not storage:
        return None
    if "://" not in storage:
        return str(layout.root / storage)
    relative = storage.removeprefix("sqlite:///")
    if storage.startswith("sqlite:///") and not Path(relative).is_absolute():
        return f"sqlite:///{layout.root / relative}"
    return None


def value_text(value: Any, digits: int = 4) -> str:
    """How a sampled value reads on the console and in tables: floats to ``digits``
    significant digits and still a float (``2.0``, not ``2``, for a float setting sampled from
    ``choice(1, 2)``: the trial gets 2.0, and the summary and best_config.yaml say so), other
    values as ``str`` writes them."""
    if isinstance(value, float):
        text = f"{value:.{digits}g}"
        return text + ".0" if text.lstrip("-").isdigit() else text
    return str(value)


def cell(value: Any) -> str:
    """A value as a table shows it: floats to 4 significant digits and as floats (``2.0``),
    None as nothing."""
    return "" if value is None else value_text(value, 4)


def counted(count: float, noun: str, plural: str | None = None) -> str:
    """``1 trial``, ``0 trials``, ``2.5 CPUs``: a count with its noun, singular for exactly
    one; ``plural`` where adding an s is wrong (``class``, ``classes``)."""
    shown = f"{count:g}" if isinstance(count, float) else str(count)
    return f"{shown} {noun if count == 1 else plural or noun + 's'}"


# Rows of the table of best trials at the end of a sweep (trials.csv holds them all).
TABLE_ROWS = 5


def table_heading(summary: Summary, limit: int = TABLE_ROWS) -> str:
    """The line above :func:`format_table`: how many trials it shows of how many, and by what
    (``Best 5 of 6 trials by val_accuracy (max); all in trials.csv:``)."""
    shown, total = min(len(ranked(summary.trials, summary.mode)), limit), len(summary.trials)
    by = f"by {summary.metric} ({summary.mode})"
    if shown < total:
        return f"Best {shown} of {counted(total, 'trial')} {by}; all in trials.csv:"
    return f"The trial {by}:" if total == 1 else f"All {total} trials, best first {by}:"


def format_table(summary: Summary, limit: int = TABLE_ROWS) -> str:
    """A plain-text table of the best trials, for the end of a sweep (:func:`table_heading`
    says how many it shows)."""
    best = ranked(summary.trials, summary.mode)[:limit]
    if not best:
        return "No trial reported a finite " + summary.metric + "."
    params = sorted({key for t in best for key in t.config})
    header = ["trial", "id", summary.metric, "epoch", "trained", "status", *params]
    rows = [[str(t.number or "?"), t.trial_id, f"{t.best_metric_value:.4f}", str(t.best_epoch),
             str(t.epochs_trained), t.status, *(cell(t.config.get(p, "")) for p in params)]
            for t in best]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
             for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def trials_table(summary: Summary) -> list[dict[str, Any]]:
    """One row per trial for trials.csv, best first (trials without a score last, failed ones
    among them): number and id, each sampled parameter, status, scores at the best epoch, when
    and where it ran. Summaries written before these columns existed leave them empty."""
    metric = summary.metric
    params = sorted({key for trial in summary.trials for key in trial.config})
    sign = -1.0 if summary.mode == "max" else 1.0

    def order(trial: TrialSummary) -> tuple[int, float, str]:
        value = finite(trial.best_metric_value)
        if value is None or trial.status == FAILED:
            return (1, 0.0, trial.trial_id)
        return (0, sign * value, trial.trial_id)

    return [
        {
            "trial": trial.number,
            "trial_id": trial.trial_id,
            **{key: trial.config.get(key) for key in params},
            "status": trial.status,
            "epochs_trained": trial.epochs_trained,
            f"best_{metric}": finite(trial.best_metric_value),
            f"last_{metric}": finite(trial.last_metric_value),
            "best_epoch": trial.best_epoch,
            **{name: getattr(trial, name) for name in VALIDATION_METRICS
               if name != metric},
            "wall_time_s": trial.wall_time_s,
            "started_at": trial.started_at,
            "ended_at": trial.ended_at,
            "node": trial.node,
            "error": trial.error,
        }
        for trial in sorted(summary.trials, key=order)
    ]


def write_trials_csv(summary: Summary, path: Path) -> None:
    rows = trials_table(summary)
    if not rows:
        path.write_text("trial_id\n")
        return
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# Where Python (and Ray's RayTaskError text) begins the next exception of a chain.
_CHAINED = ("The above exception was the direct cause of the following exception:",
            "During handling of the above exception, another exception occurred:")
_FRAME = re.compile(r'^\s+File "')
_RAY_TASK = re.compile(r"^ray::\S+ \(pid=")  # where the task ran, before its frames
_TUNE_FAILURE = re.compile(r"^Failure # \d+ \(occurred at ")


def error_line(text: str, type_name: str | None = None) -> str:
    """A trial's failure in one line: the raised exception's own ``Type: message`` (the first
    line of its message), from the text of its error.

    Args:
        text: The error's text as Ray keeps it: ``str()`` of a RayTaskError or TuneError, or
            the trial's ``error.txt`` (its last ``Failure # N`` section is read). Of a chain of
            exceptions the last (the one raised) is taken; Ray's ``ray::...(pid=...)`` line,
            the traceback's frames, further message lines and Keras' "Arguments received"
            block are left out, and Keras' "Exception encountered when calling" wrapper gives
            way to the user's own message. Colour codes are removed.
        type_name: The exception's type, put before a text that has no traceback (Ray's
            RayActorError says only "The actor died ...").

    Returns:
        e.g. ``ValueError: boom: this layer cannot train``; ``type_name`` or ``"unknown
        error"`` where ``text`` is empty.
    """
    from sweeper.compat import keras_layer_message

    lines = _COLOUR.sub("", text).splitlines()
    starts = [i for i, line in enumerate(lines) if _TUNE_FAILURE.match(line)]
    lines = lines[starts[-1] + 1:] if starts else lines
    chained = [i for i, line in enumerate(lines) if line.strip() in _CHAINED]
    lines = lines[chained[-1] + 1:] if chained else lines
    frames = [i for i, line in enumerate(lines) if _FRAME.match(line)]
    if not frames:
        first = next((line.strip() for line in lines
                      if line.strip() and not _RAY_TASK.match(line)), "")
        if not first:
            return type_name or "unknown error"
        return f"{type_name}: {first}" if type_name else first
    # After the last frame come its source lines (indented), then the exception's lines.
    at = frames[-1] + 1
    while at < len(lines) and (not lines[at].strip() or lines[at][:1].isspace()):
        at += 1
    if at == len(lines):
        return type_name or "unknown error"
    name, colon, first = lines[at].partition(": ")
    if not colon:
        return lines[at].strip()
    message = [first, *lines[at + 1:]]
    inner = keras_layer_message(message)
    if inner is None:  # a message that begins with a newline: its first words
        inner = next((line.strip() for line in message if line.strip()), "")
    return f"{name}: {inner}"
