"""Per-trial records of a sweep and the summary built from them.

The functions here take plain records and return plain values; reading Ray's ResultGrid
(:func:`records_from_results`) is the one place that touches Ray objects, and
:func:`records_from_trial_folders` reads the same records from the trial folders' JSON
files without Ray (for :func:`sweeper.load` of a sweep whose driver was killed).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sweeper.layout import TRIAL_FOLDER_PREFIX, SweepLayout
from sweeper.metrics import DIVERGED, FAILURE, HISTORY_COLUMNS, VALIDATION_METRICS
from sweeper.summary import (
    COMPLETED,
    EARLY_STOPPED,
    FAILED,
    UNFINISHED,
    BestTrial,
    Summary,
    TrialSummary,
    error_line,
    finite,
)

__all__ = ["COMPLETED", "EARLY_STOPPED", "FAILED", "UNFINISHED", "TrialRecord",
           "all_trials_ended", "best_epoch", "build_summary", "load_records", "rank",
           "records_from_results", "records_from_trial_folders", "trial_status"]


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


def make_record(trial_id: str, config: dict[str, Any], rows: list[dict[str, Any]],
                metric: str, mode: str, max_epochs: int, error: str | None, done: bool,
                last: dict[str, Any] | None = None, path: str | None = None,
                checkpoint_at=None, number: int | None = None) -> TrialRecord:
    """One trial's record from its results, one dict per reported epoch, in order.

    Args:
        error: The trial's error in one line (None: it raised none).
        done: Whether the trial ended (Tune's ``done`` on the result the scheduler stopped it
            on, or the whole sweep ended): an early-stopped trial against an unfinished one.
        last: The trial's last result (default: the last of ``rows``); a diverged trial's
            says so (sweeper.metrics.DIVERGED) and why.
        checkpoint_at: ``epoch -> path`` of the trial's kept checkpoint of that epoch.
        number: The trial's number in its sweep (from 1, as on the console), if known.
    """
    seen: set[float] = set()
    history: list[dict[str, float]] = []
    for row in rows:
        epoch = row.get("epoch")
        # An epoch retrained after a restore keeps its first value, as everywhere else.
        if epoch is None or epoch in seen:
            continue
        seen.add(epoch)
        history.append({key: float(row[key]) for key in HISTORY_COLUMNS
                        if row.get(key) is not None})
    last = last if last is not None else (rows[-1] if rows else {})
    if last.get("epoch") is not None and last["epoch"] > max(seen, default=0):
        # Tune's saved state holds a result the trial folder's rows lack (they were being
        # copied when the driver died): it is the trial's newest epoch all the same.
        history.append({key: float(last[key]) for key in HISTORY_COLUMNS
                        if last.get(key) is not None})
    if last.get(DIVERGED):
        error = str(last.get(FAILURE) or "training diverged")
    best = best_epoch(history, metric, mode)
    kept = checkpoint_at(best[1]) if best and checkpoint_at else None
    if best and checkpoint_at and kept is None:
        # A later epoch with the same score may be the one whose checkpoint Tune kept (it
        # keeps one per trial, the newest among equals): that epoch, not a retrain.
        for row in history:
            if row.get(metric) == best[0] and (path := checkpoint_at(int(row["epoch"]))):
                best, kept = (best[0], int(row["epoch"])), path
                break
    epochs = int(history[-1]["epoch"]) if history else 0
    return TrialRecord(
        trial_id=trial_id,
        config=dict(config or {}),
        status=trial_status(epochs, max_epochs, error, done=done),
        epochs_trained=epochs,
        last_value=history[-1].get(metric) if history else None,
        best_value=best[0] if best else None,
        best_epoch=best[1] if best else None,
        history=history,
        error=error,
        path=path,
        best_checkpoint=kept,
        wall_time_s=history[-1].get("time_total_s") if history else None,
        node=last.get("node_ip"),
        number=number,
    )


def records_from_results(grid, metric: str, mode: str, max_epochs: int,
                         sweep_done: bool) -> list[TrialRecord]:
    """Turn Ray Tune's ResultGrid into TrialRecords, in the order Tune created the trials
    (each trial's number as on the console, kept across a resume)."""
    from sweeper.compat import result_grid_trial_numbers

    numbers = result_grid_trial_numbers(grid)
    records = []
    for result in grid:
        frame = result.metrics_dataframe
        rows = [] if frame is None or "epoch" not in frame else frame.to_dict("records")
        trial_id = (result.metrics.get("trial_id")
                    or Path(result.path).name.removeprefix(TRIAL_FOLDER_PREFIX))
        records.append(make_record(
            trial_id, result.config, rows, metric, mode, max_epochs,
            error=None if result.error is None else _one_line(result.error),
            # Tune marks done the result on which the scheduler stopped a trial: in an
            # interrupted sweep that tells ASHA's stops from cut-off trials.
            done=sweep_done or bool(result.metrics.get("done")), last=result.metrics,
            path=result.path, checkpoint_at=lambda epoch, r=result: _checkpoint_at(r, epoch),
            number=numbers.get(trial_id)))
    return sorted(records, key=lambda record: (record.number is None, record.number or 0,
                                               record.trial_id))


def records_from_trial_folders(trials_dir: Path, metric: str, mode: str,
                               max_epochs: int) -> list[TrialRecord]:
    """TrialRecords read from each trial folder's params.json and result.json, without Ray.

    For a sweep whose driver ended without writing summary.json (killed): what each trial
    reported so far, numbered as on the console where Tune's saved experiment state names
    the trial, in that order. Trials that had not ended are ``unfinished``; errors and kept
    checkpoints are not read (Ray's own files hold them).
    """
    from sweeper.compat import saved_trial_numbers

    numbers = saved_trial_numbers(Path(trials_dir))
    records = []
    for folder in sorted(Path(trials_dir).glob(f"{TRIAL_FOLDER_PREFIX}*")):
        params = folder / "params.json"
        config = json.loads(params.read_text()) if params.is_file() else {}
        rows = []
        result = folder / "result.json"
        if result.is_file():
            for line in result.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):  # a line cut off by a killed driver
                    rows.append(json.loads(line))
        done = bool(rows and rows[-1].get("done"))
        trial_id = folder.name.removeprefix(TRIAL_FOLDER_PREFIX)
        records.append(make_record(trial_id, config, rows, metric, mode, max_epochs,
                                   error=None, done=done, path=str(folder),
                                   number=numbers.get(trial_id)))
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


def _checkpoint_at(result, epoch: int) -> str | None:
    for checkpoint, metrics in result.best_checkpoints or []:
        if int(metrics.get("epoch", -1)) == epoch:
            return checkpoint.path
    return None


def _one_line(error: BaseException) -> str:
    # Ray wraps the trial's exception (RayTaskError(ValueError)): its text names the cause.
    return error_line(str(error), type(error).__name__)


def rank(records: list[TrialRecord], mode: str) -> list[TrialRecord]:
    """Trials with a score, best first."""
    scored = [r for r in records if r.best_value is not None and r.status != FAILED]
    return sorted(scored, key=lambda r: r.best_value, reverse=(mode == "max"))


def build_summary(experiment: str, metric: str, mode: str, max_epochs: int,
                  records: list[TrialRecord], layout: SweepLayout, **settings: Any) -> Summary:
    """The sweep's :class:`~sweeper.summary.Summary` from its trial records.

    Args:
        records: Every trial (:func:`records_from_results`).
        layout: The sweep folder; paths in the summary are relative to it.
        **settings: The other fields of :class:`~sweeper.summary.Summary` (``search_space``,
            ``test``, ``state``, ``data``, ``study``, ``reproducible``,
            ``scheduler_decisions``).
    """
    scored = rank(records, mode)
    best = scored[0] if scored else None
    return Summary(
        experiment=experiment, metric=metric, mode=mode, max_epochs=max_epochs,
        trials=[TrialSummary(trial_id=r.trial_id, number=r.number, config=r.config,
                             status=r.status, epochs_trained=r.epochs_trained,
                             last_metric_value=r.last_value, best_metric_value=r.best_value,
                             best_epoch=r.best_epoch, wall_time_s=r.wall_time_s,
                             **_times(r.history), node=r.node,
                             **_scores_at(r.history, r.best_epoch), error=r.error)
                for r in records],
        best=None if best is None else BestTrial(
            trial_id=best.trial_id, number=best.number, config=best.config,
            metric_value=best.best_value,
            epoch=best.best_epoch, epochs_trained=best.epochs_trained,
            checkpoint=layout.relative(best.best_checkpoint)),
        paths=layout.relative_paths(has_best=best is not None),
        **settings,
    )


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
    return {name: finite(row.get(name)) for name in VALIDATION_METRICS}
