"""What a sweep leaves behind: per-trial records, the best trial, summary.json and a table.

The functions here take plain records and return plain values; reading Ray's
ResultGrid is the one place that touches Ray objects.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

TRIALS_CSV = "trials.csv"
REPORT_DIRNAME = "report"

COMPLETED = "completed"
EARLY_STOPPED = "early_stopped"
FAILED = "failed"
UNFINISHED = "unfinished"


@dataclass
class TrialRecord:
    """One trial as the user sees it."""

    trial_id: str
    config: dict[str, Any]
    status: str
    epochs_trained: int
    last_value: float | None
    best_value: float | None
    best_epoch: int | None
    history: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None
    path: str | None = None
    best_checkpoint: str | None = None
    # Seconds the trial trained (Ray's time_total_s at its last report).
    wall_time_s: float | None = None
    # The node the trial last ran on (Ray's node_ip), so a slow or failing node shows.
    node: str | None = None
    # From 1 in the order Tune created the trials: the number on the console, in sweep.log
    # and in TensorBoard's run names (see sweeper.progress.trial_number).
    number: int | None = None


def trial_status(epochs: int, max_epochs: int, error: str | None, done: bool) -> str:
    if error:
        return FAILED
    if epochs >= max_epochs:
        return COMPLETED
    return EARLY_STOPPED if done else UNFINISHED


def best_epoch(history: list[dict[str, float]], metric: str, mode: str) -> tuple[float, int] | None:
    """The best finite value of ``metric`` in a trial's history and the epoch it came at."""
    scored = [(row[metric], int(row["epoch"])) for row in history
              if row.get(metric) is not None and math.isfinite(row[metric])]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda pair: pair[0])


def all_trials_ended(records: list[TrialRecord], num_trials: int) -> bool:
    """Whether every trial of the sweep has ended: all ``num_trials`` were created and none is
    unfinished (each trained all its epochs, was stopped by the scheduler, diverged or failed;
    :func:`trial_status` of records made with ``sweep_done=False``).

    Not from Tune's statuses: on Ctrl-C Tune saves the experiment with its running trials as
    RUNNING (a resume continues them) and then stops them, so they come back TERMINATED as if
    they had ended. Nor from Tune's ``done`` flag alone: Tune sets it on the result of a
    scheduler's stop, but a trial whose function returned keeps ``done`` false in what Tune
    saves, so a restored sweep would never end.
    """
    return len(records) >= num_trials and all(r.status != UNFINISHED for r in records)


def records_from_results(grid, metric: str, mode: str, max_epochs: int,
                         sweep_done: bool) -> list[TrialRecord]:
    """Turn Ray Tune's ResultGrid into TrialRecords, in the order Tune created the trials
    (each trial's number as on the console, kept across a resume)."""
    from sweeper.compat import result_grid_trial_numbers

    numbers = result_grid_trial_numbers(grid)
    records = []
    for result in grid:
        frame = result.metrics_dataframe
        columns = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy",
                   "time_total_s", "timestamp"]
        history: list[dict[str, float]] = []
        if frame is not None and "epoch" in frame:
            # An epoch retrained after a restore keeps its first value, as everywhere else.
            rows = frame[[c for c in columns if c in frame]].drop_duplicates("epoch", keep="first")
            history = [{k: float(v) for k, v in row.items()} for row in rows.to_dict("records")]
        error = None if result.error is None else _one_line(result.error)
        if result.metrics.get("diverged"):
            error = str(result.metrics.get("failure") or "training diverged")
        trial_id = result.metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        best = best_epoch(history, metric, mode)
        checkpoint = _checkpoint_at(result, best[1]) if best else None
        epochs = len(history)
        records.append(TrialRecord(
            trial_id=trial_id,
            config=dict(result.config or {}),
            # Tune marks done the result on which the scheduler stopped a trial: in an
            # interrupted sweep that tells ASHA's stops from cut-off trials.
            status=trial_status(epochs, max_epochs, error,
                                done=sweep_done or bool(result.metrics.get("done"))),
            epochs_trained=epochs,
            last_value=history[-1].get(metric) if history else None,
            best_value=best[0] if best else None,
            best_epoch=best[1] if best else None,
            history=history,
            error=error,
            path=result.path,
            best_checkpoint=checkpoint,
            wall_time_s=history[-1].get("time_total_s") if history else None,
            node=result.metrics.get("node_ip"),
            number=numbers.get(trial_id),
        ))
    return sorted(records, key=lambda record: (record.number is None, record.number or 0,
                                               record.trial_id))


def load_records(trials_dir: Path, metric: str, mode: str,
                 max_epochs: int) -> list[TrialRecord]:
    """TrialRecords of a finished sweep read back from its Ray Tune folder, without Ray running."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    grid = ResultGrid(ExperimentAnalysis(str(trials_dir), default_metric=metric,
                                         default_mode=mode))
    done = grid.num_terminated + grid.num_errors == len(grid)
    return records_from_results(grid, metric, mode, max_epochs, sweep_done=done)


def _finite(value: float | None) -> float | None:
    """None for a missing or non-finite figure, so summary.json stays strict JSON."""
    return value if value is not None and math.isfinite(value) else None


def _checkpoint_at(result, epoch: int) -> str | None:
    for checkpoint, metrics in result.best_checkpoints or []:
        if int(metrics.get("epoch", -1)) == epoch:
            return checkpoint.path
    return None


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    # Ray wraps the trial's exception; its last line names the real cause.
    return text[-1] if text else type(error).__name__


def rank(records: list[TrialRecord], mode: str) -> list[TrialRecord]:
    """Trials with a score, best first."""
    scored = [r for r in records if r.best_value is not None and r.status != FAILED]
    return sorted(scored, key=lambda r: r.best_value, reverse=(mode == "max"))


def in_sweep(path: str | None, sweep_dir: Path) -> str | None:
    """``path`` relative to the sweep folder when it lies inside it, else as it is."""
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(Path(sweep_dir).resolve()).as_posix()
    except ValueError:
        return path


def resolve_in_sweep(path: str | None, sweep_dir: Path) -> Path | None:
    """A path from summary.json or best_model.json as a path on this machine."""
    return None if path is None else Path(sweep_dir) / path


def build_summary(experiment: str, metric: str, mode: str, max_epochs: int,
                  records: list[TrialRecord], sweep_dir: Path,
                  search_space: dict[str, str] | None = None,
                  test: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of summary.json.

    Args:
        search_space: The flat search space as written (``{"train.lr": "tag(log, ...)"}``);
            kept so a report can be rebuilt from the sweep folder alone.
        test: The best model's held-out test scores (see sweeper.evaluate), if any.
    """
    ranked = rank(records, mode)
    best = ranked[0] if ranked else None
    epochs_trained = sum(r.epochs_trained for r in records)
    full_budget = len(records) * max_epochs
    counts = {s: sum(r.status == s for r in records)
              for s in (COMPLETED, EARLY_STOPPED, FAILED, UNFINISHED)}
    return {
        "experiment": experiment,
        "metric": metric,
        "mode": mode,
        "num_trials": len(records),
        "trial_counts": counts,
        "max_epochs": max_epochs,
        "epochs_trained": epochs_trained,
        "epochs_full_budget": full_budget,
        "epochs_ratio": round(epochs_trained / full_budget, 4) if full_budget else None,
        "epochs_saved": full_budget - epochs_trained,
        "error": None if best else _no_result_message(metric, records),
        "search_space": dict(search_space or {}),
        "best": None if best is None else {
            "trial_id": best.trial_id,
            "number": best.number,
            "config": best.config,
            "metric_value": best.best_value,
            "epoch": best.best_epoch,
            "epochs_trained": best.epochs_trained,
            "checkpoint": in_sweep(best.best_checkpoint, sweep_dir),
        },
        "test": test,
        # Relative to the sweep folder, so that a copied folder (cp -r, ray rsync-down) still
        # reports and retrains; resolve them with resolve_in_sweep.
        "paths": {
            "sweep_dir": ".",
            "trials": "trials",
            "tensorboard": "tensorboard",
            "trials_csv": TRIALS_CSV,
            "report": f"{REPORT_DIRNAME}/report.md",
            "best_model": "best_model.keras" if best else None,
            "best_config": "best_config.yaml" if best else None,
        },
        "trials": [
            {
                "trial_id": r.trial_id,
                "number": r.number,
                "config": r.config,
                "status": r.status,
                "epochs_trained": r.epochs_trained,
                "last_metric_value": _finite(r.last_value),
                "best_metric_value": _finite(r.best_value),
                "best_epoch": r.best_epoch,
                "wall_time_s": r.wall_time_s,
                **_times(r.history),
                "node": r.node,
                **_scores_at(r.history, r.best_epoch),
                "error": r.error,
            }
            for r in records
        ],
    }


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds")


def _times(history: list[dict[str, float]]) -> dict[str, str | None]:
    """When a trial started and last reported, in UTC (ISO 8601), from Ray's per-report
    ``timestamp`` (whole seconds) less the ``time_total_s`` trained by the first report."""
    first, last = (history[0], history[-1]) if history else ({}, {})
    if "timestamp" not in first or "timestamp" not in last:
        return {"started_at": None, "ended_at": None}
    return {"started_at": _utc(first["timestamp"] - first.get("time_total_s", 0.0)),
            "ended_at": _utc(last["timestamp"])}


def _scores_at(history: list[dict[str, float]], epoch: int | None) -> dict[str, float | None]:
    """Validation loss and accuracy at the trial's best epoch (None where not reported)."""
    row = next((h for h in history if epoch is not None and int(h["epoch"]) == epoch), {})
    return {name: _finite(row.get(name)) for name in ("val_loss", "val_accuracy")}


def _no_result_message(metric: str, records: list[TrialRecord]) -> str:
    """Why a sweep has no best trial, in words a user can act on."""
    failed = [r for r in records if r.status == FAILED]
    if records and len(failed) == len(records):
        return f"all {len(records)} trials failed (first error: {failed[0].error})"
    return f"no trial produced a finite {metric} ({len(failed)} of {len(records)} failed)"


def trials_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial for trials.csv, best first (trials without a score last, failed ones
    among them): id, each sampled parameter, status, scores at the best epoch, when and where
    it ran. Summaries written before these columns existed leave them empty."""
    metric = summary["metric"]
    params = sorted({key for trial in summary["trials"] for key in trial["config"]})
    sign = -1.0 if summary["mode"] == "max" else 1.0

    def order(trial: dict[str, Any]) -> tuple[int, float, str]:
        value = trial["best_metric_value"]
        if value is None or trial["status"] == FAILED:
            return (1, 0.0, trial["trial_id"])
        return (0, sign * value, trial["trial_id"])

    return [
        {
            "trial": trial.get("number"),
            "trial_id": trial["trial_id"],
            **{key: trial["config"].get(key) for key in params},
            "status": trial["status"],
            "epochs_trained": trial["epochs_trained"],
            f"best_{metric}": trial["best_metric_value"],
            f"last_{metric}": trial["last_metric_value"],
            "best_epoch": trial["best_epoch"],
            **{name: trial.get(name) for name in ("val_loss", "val_accuracy") if name != metric},
            "wall_time_s": trial["wall_time_s"],
            **{name: trial.get(name) for name in ("started_at", "ended_at", "node")},
            "error": trial["error"],
        }
        for trial in sorted(summary["trials"], key=order)
    ]


def write_trials_csv(summary: dict[str, Any], path: Path) -> None:
    rows = trials_table(summary)
    if not rows:
        path.write_text("trial_id\n")
        return
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_summary(summary: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    tmp.replace(path)  # never leave a half-written summary behind


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def trial_label(trial: dict[str, Any]) -> str:
    """``3 (id 9fe9532e)``: the number people see on the console and in TensorBoard, and
    Ray's id (folder ``trials/trial_<id>``); just the id for summaries without a number."""
    number = trial.get("number")
    return trial["trial_id"] if number is None else f"{number} (id {trial['trial_id']})"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(records: list[TrialRecord], metric: str, mode: str, limit: int = 5) -> str:
    """A plain-text table of the best trials, for the end of a sweep."""
    ranked = rank(records, mode)[:limit]
    if not ranked:
        return "No trial reported a finite " + metric + "."
    params = sorted({k for r in ranked for k in r.config})
    header = ["trial", "id", metric, "epoch", "trained", "status", *params]
    rows = [[str(r.number or "?"), r.trial_id, f"{r.best_value:.4f}", str(r.best_epoch),
             str(r.epochs_trained), r.status,
             *(_format_value(r.config.get(p, "")) for p in params)] for r in ranked]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
             for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def record_as_dict(record: TrialRecord) -> dict[str, Any]:
    return asdict(record)
