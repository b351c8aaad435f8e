"""The names a trial's results carry, defined once for the trainer, the searcher, the
scheduler, TensorBoard and the summary. No Ray, no TensorFlow."""

from __future__ import annotations

# What the trainer reports every epoch (Keras' names); any of them can be search.metric.
METRIC_NAMES = ("loss", "accuracy", "val_loss", "val_accuracy")
# The validation scores summary.json and trials.csv keep for each trial's best epoch.
VALIDATION_METRICS = ("val_loss", "val_accuracy")

# Keys a trial adds to its last result when its training loss became NaN or infinite: the
# flag (the searcher tells Optuna FAIL, TensorBoard closes the run as failed) and the reason
# (the trial's error in summary.json).
DIVERGED = "diverged"
FAILURE = "failure"

# A trial's history as the summary and report read it from each epoch's result.
HISTORY_COLUMNS = ("epoch", *METRIC_NAMES, "time_total_s", "timestamp")


def diverged(result: dict | None) -> bool:
    """Whether a trial's result says its training diverged."""
    return bool(result and result.get(DIVERGED))
