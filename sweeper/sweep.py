"""One sweep from a composed config to its results folder.

:func:`prepare` does everything that can fail because of the user's input
(validation, search space, dataset) before Ray starts; :func:`run_sweep` then
runs the trials and writes the results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from optuna.distributions import BaseDistribution

from sweeper.config import (
    ConfigError,
    SweepConfig,
    to_sweep_config,
    validate_sweep_settings,
    validate_trial_settings,
)
from sweeper.data import Splits, load_splits
from sweeper.results import FAILED, build_summary, format_table, records_from_results, write_summary
from sweeper.space import build_search_space

logger = logging.getLogger(__name__)


class SweepFailed(RuntimeError):
    """The sweep ran but produced nothing usable (e.g. every trial failed)."""


@dataclass
class PreparedSweep:
    cfg: SweepConfig
    space: dict[str, BaseDistribution]
    splits: Splits


@dataclass
class SweepOutcome:
    summary: dict[str, Any]
    table: str
    sweep_dir: Path


def validate(cfg: DictConfig | SweepConfig) -> tuple[SweepConfig, dict[str, BaseDistribution]]:
    """Type-check, range-check and parse the search space; raises ConfigError."""
    typed = cfg if isinstance(cfg, SweepConfig) else to_sweep_config(cfg)
    validate_trial_settings(typed.data, typed.model, typed.train)
    if typed.data.path is not None and not Path(typed.data.path).expanduser().exists():
        raise ConfigError("data.path", typed.data.path,
                          "no such file or folder; give an .npz or a folder of IDX files")
    validate_sweep_settings(typed)
    return typed, build_search_space(typed)


def prepare(cfg: DictConfig | SweepConfig) -> PreparedSweep:
    typed, space = validate(cfg)
    splits = load_splits(typed.data, typed.train.validation_fraction, typed.train.seed)
    return PreparedSweep(typed, space, splits)


def run_sweep(cfg: DictConfig | SweepConfig) -> SweepOutcome:
    """Validate, load data, run the trials on Ray, write summary.json; returns the outcome.

    Raises:
        ConfigError: The user's configuration is wrong (nothing was started).
        SweepFailed: No trial produced a result.
    """
    prepared = prepare(cfg)
    import ray

    from sweeper.tuner import SweepPaths, build_tuner, connect

    cfg_t = prepared.cfg
    paths = SweepPaths.for_config(cfg_t)
    paths.root.mkdir(parents=True, exist_ok=True)
    started_ray = connect(cfg_t.cluster)
    try:
        tuner = build_tuner(cfg_t, prepared.space, prepared.splits, paths)
        grid = tuner.fit()
    finally:
        if started_ray:
            ray.shutdown()
    records = records_from_results(grid, cfg_t.search.metric, cfg_t.search.mode,
                                   cfg_t.train.epochs, sweep_done=True)
    summary = build_summary(cfg_t.name, cfg_t.search.metric, cfg_t.search.mode,
                            cfg_t.train.epochs, records, paths.root)
    write_summary(summary, paths.summary)
    table = format_table(records, cfg_t.search.metric, cfg_t.search.mode)
    if summary["best"] is None:
        failed = sum(r.status == FAILED for r in records)
        raise SweepFailed(f"no trial produced a finite {cfg_t.search.metric} "
                          f"({failed} of {len(records)} failed); see {paths.summary}")
    return SweepOutcome(summary=summary, table=table, sweep_dir=paths.root)
