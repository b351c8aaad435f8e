"""The sweep folder: every file a sweep writes, named once, and how its JSON files are written.

A sweep folder (``sweep_dir``, or ``<cluster.storage_path>/<name>`` on shared storage)::

    summary.json           the typed summary (sweeper.summary.Summary), paths relative to here
    trials.csv             one row per trial
    report/report.md       the report, beside its plots (report/<plot>.png)
    best_model.keras       the best trial's model; best_model.json says where it came from
    best_config.yaml       the best trial's config, to train it again
    sweep_config.yaml      the settings a resume must match
    data_fingerprint.json  the data it began with (sweeper.data.data_fingerprint): a resume
                           must load the same
    optuna.log             the Optuna study, Optuna's journal file (unless search.storage
                           names a database; optuna.db: the SQLite study of a sweep begun
                           before issue 26, kept when it resumes)
    tensorboard/           one TensorBoard run per trial, plus the HParams experiment
    trials/                Ray Tune's experiment: trial_<id>/ folders, its saved state, and
                           sweeper's scheduler_decisions.json and failed_trials.json
    .sweep.lock(.owner)    held by the one driver running this sweep
    sweep.log, .hydra/     the CLI's record (Hydra's run folder; beside the driver on a cluster)

Nothing here imports Ray or TensorFlow: :func:`sweeper.load` reads a folder through it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRIAL_FOLDER_PREFIX = "trial_"


@dataclass(frozen=True)
class SweepLayout:
    """Where a sweep keeps its files (absolute paths under ``root``).

    Args:
        root: The sweep folder.
    """

    root: Path

    TRIALS = "trials"
    TENSORBOARD = "tensorboard"
    SUMMARY = "summary.json"
    TRIALS_CSV = "trials.csv"
    REPORT_DIR = "report"
    REPORT = "report.md"
    BEST_MODEL = "best_model.keras"
    BEST_MODEL_INFO = "best_model.json"
    BEST_CONFIG = "best_config.yaml"
    SWEEP_CONFIG = "sweep_config.yaml"
    DATA_FINGERPRINT = "data_fingerprint.json"
    STUDY = "optuna.log"
    SQLITE_STUDY = "optuna.db"
    LOCK = ".sweep.lock"
    LOCK_OWNER = ".sweep.lock.owner"
    SCHEDULER_DECISIONS = "scheduler_decisions.json"
    FAILED_TRIALS = "failed_trials.json"

    @classmethod
    def for_config(cls, cfg: Any) -> SweepLayout:
        """The folder of ``cfg`` (a SweepConfig): sweep_dir, or <cluster.storage_path>/<name>."""
        if cfg.cluster.storage_path:
            return cls(Path(cfg.cluster.storage_path).expanduser().resolve() / cfg.name)
        return cls(Path(cfg.sweep_dir).expanduser().resolve())

    @property
    def trials(self) -> Path:
        """Ray Tune's experiment folder (its ``RunConfig.name`` under ``storage_path=root``)."""
        return self.root / self.TRIALS

    def trial(self, trial_id: str) -> Path:
        """One trial's Ray Tune folder (result.json, progress.csv, checkpoints)."""
        return self.trials / f"{TRIAL_FOLDER_PREFIX}{trial_id}"

    @property
    def tensorboard(self) -> Path:
        return self.root / self.TENSORBOARD

    @property
    def summary(self) -> Path:
        return self.root / self.SUMMARY

    @property
    def trials_csv(self) -> Path:
        return self.root / self.TRIALS_CSV

    @property
    def report_dir(self) -> Path:
        return self.root / self.REPORT_DIR

    @property
    def report(self) -> Path:
        return self.report_dir / self.REPORT

    @property
    def best_model(self) -> Path:
        return self.root / self.BEST_MODEL

    @property
    def best_model_info(self) -> Path:
        return self.root / self.BEST_MODEL_INFO

    @property
    def best_config(self) -> Path:
        return self.root / self.BEST_CONFIG

    @property
    def sweep_config(self) -> Path:
        return self.root / self.SWEEP_CONFIG

    @property
    def data_fingerprint(self) -> Path:
        return self.root / self.DATA_FINGERPRINT

    @property
    def study(self) -> Path:
        return self.root / self.STUDY

    @property
    def lock(self) -> Path:
        return self.root / self.LOCK

    @property
    def lock_owner(self) -> Path:
        return self.root / self.LOCK_OWNER

    @property
    def scheduler_decisions(self) -> Path:
        return self.trials / self.SCHEDULER_DECISIONS

    @property
    def failed_trials(self) -> Path:
        return self.trials / self.FAILED_TRIALS

    def relative(self, path: str | Path | None) -> str | None:
        """``path`` relative to the folder when it lies inside it (as summary.json keeps
        paths, so a copied folder still works), else as it is; None stays None."""
        if path is None:
            return None
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)

    def resolve(self, path: str | None) -> Path | None:
        """A path from summary.json or best_model.json as a path on this machine."""
        return None if path is None else self.root / path

    def relative_paths(self, has_best: bool) -> dict[str, str | None]:
        """summary.json's ``paths`` block: where each file is, relative to the folder."""
        return {
            "sweep_dir": ".",
            "trials": self.TRIALS,
            "tensorboard": self.TENSORBOARD,
            "trials_csv": self.TRIALS_CSV,
            "report": f"{self.REPORT_DIR}/{self.REPORT}",
            "best_model": self.BEST_MODEL if has_best else None,
            "best_config": self.BEST_CONFIG if has_best else None,
        }


def write_json(path: Path, content: Any, indent: int | None = None) -> None:
    """Write ``content`` as JSON so that a reader (or a kill) never sees half a file: into a
    staged file beside ``path``, then renamed over it. numpy scalars become numbers, anything
    else JSON cannot hold its ``str``."""
    path = Path(path)
    staged = path.with_name(path.name + ".tmp")
    text = json.dumps(content, indent=indent, default=_json_default)
    staged.write_text(text + ("\n" if indent is not None else ""))
    os.replace(staged, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)
