"""One sweep from a composed config to its results folder.

:func:`validated` checks everything that can fail because of the user's input (values,
search space, dataset, model builder) before Ray starts, once per config; :func:`run_sweep`
then runs the trials and writes the results (``sweeper.run`` is its public name).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution

from sweeper.builder import check_builder
from sweeper.builder import runtime_env as builder_runtime_env
from sweeper.cluster import joins_cluster, log_cluster, validate_cluster
from sweeper.config import (
    CNN_TARGET,
    ConfigError,
    ModelConfig,
    SweepConfig,
    check_input_fits,
    check_resources_fit,
    max_concurrent_trials,
    to_sweep_config,
    validate_sweep_settings,
    validate_trial_settings,
)
from sweeper.data import Splits, check_source, fingerprint_changes, load_splits
from sweeper.evaluate import majority_baseline
from sweeper.layout import SweepLayout, write_json
from sweeper.report import publish
from sweeper.results import all_trials_ended, build_summary, rank, records_from_results
from sweeper.space import build_search_space, configured_point, flatten_space
from sweeper.study import (
    check_warm_start,
    earlier_trials,
    open_storage,
    resolve_warm_start,
    study_location,
    study_url_in_sweep,
    sweep_attrs,
)
from sweeper.summary import (
    FAILED,
    STATE_COMPLETE,
    STATE_INTERRUPTED,
    STATE_TIME_BUDGET,
    UNFINISHED,
    Summary,
    TestScores,
    counted,
)

if TYPE_CHECKING:
    from sweeper.api import SweepResult

logger = logging.getLogger(__name__)


class SweepFailed(RuntimeError):
    """The sweep ran but produced nothing usable (e.g. every trial failed)."""


# Settings that may change between an interrupted run and its resume: where and how it runs,
# and what happens after the search (final), which no trial depends on.
RUNTIME_KEYS = ("sweep_dir", "fresh", "cluster", "resources", "resume", "recovery", "final",
                "verbose")
NEW, INTERRUPTED, COMPLETE = "new", STATE_INTERRUPTED, STATE_COMPLETE
TIME_BUDGET_SPENT = STATE_TIME_BUDGET


def config_fingerprint(cfg: SweepConfig) -> dict[str, Any]:
    """The settings that define a sweep's results; resuming needs all of them unchanged."""
    plain = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    # A re-run may give the rest of a sweep another time budget (null: run it to the end).
    plain["search"].pop("time_budget_s", None)
    return {key: value for key, value in plain.items() if key not in RUNTIME_KEYS}


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config trees."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [diff for key in keys
                for diff in config_differences(saved.get(key), current.get(key),
                                               f"{prefix}{key}.")]
    return [] if saved == current else [prefix.rstrip(".")]


def with_defaults(saved: Any, defaults: Any) -> Any:
    """``saved`` with the settings it lacks taken from ``defaults`` (plain config trees)."""
    if not isinstance(saved, dict) or not isinstance(defaults, dict):
        return saved
    return {**{key: value for key, value in defaults.items() if key not in saved},
            **{key: with_defaults(value, defaults.get(key)) for key, value in saved.items()}}


def fresh_variant(cfg: SweepConfig, stamp: str | None = None) -> SweepConfig:
    """The config of a new sweep beside an earlier one: name and folder get a timestamp."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    variant = copy.deepcopy(cfg)
    variant.name = f"{cfg.name}-{stamp}"
    variant.sweep_dir = f"{cfg.sweep_dir.rstrip('/')}-{stamp}"
    variant.fresh = False
    return variant


def sweep_state(root: Path) -> str:
    """Whether ``root`` holds nothing yet, an interrupted sweep, or a complete one."""
    layout = SweepLayout(root)
    if layout.summary.is_file() and Summary.read(layout.summary).state == COMPLETE:
        return COMPLETE
    from ray import tune

    if tune.Tuner.can_restore(str(layout.trials)):
        return INTERRUPTED
    return NEW


def check_sweep_dir(cfg: SweepConfig, root: Path) -> None:
    """Refuse a config that differs from the sweep already in ``root``; reads, writes nothing.

    Run before anything is written (Hydra's own files included), so that a refused re-run
    leaves the existing sweep as it was.
    """
    saved_file = SweepLayout(root).sweep_config
    if not saved_file.is_file():
        return
    # Settings added since that sweep was made count with their defaults (data.image_size,
    # model.padding of issue 22), so a sweep of an earlier version still resumes.
    saved = yaml.safe_load(saved_file.read_text())
    defaults = config_fingerprint(SweepConfig())
    if saved.get("model", {}).get("_target_", CNN_TARGET) != CNN_TARGET:
        del defaults["model"]  # a user's model has none of the CNN's settings
    saved = with_defaults(saved, defaults)
    differences = config_differences(saved, config_fingerprint(cfg))
    if differences:
        shown = ", ".join(differences[:4]) + (" ..." if len(differences) > 4 else "")
        raise ConfigError("name", cfg.name,
                          f"{root} holds a sweep with a different config ({shown}); "
                          "choose another name=..., or fresh=true for a new sweep")


def claim_sweep_dir(cfg: SweepConfig, root: Path, state: str) -> None:
    """Record the config of a new sweep, or check that an earlier one in ``root`` matches it.

    ``state`` is :func:`sweep_state` of ``root``.
    """
    saved_file = SweepLayout(root).sweep_config
    check_sweep_dir(cfg, root)
    if not saved_file.is_file() and state == NEW:
        root.mkdir(parents=True, exist_ok=True)
        saved_file.write_text(yaml.safe_dump(config_fingerprint(cfg), sort_keys=False))


def check_data_unchanged(cfg: SweepConfig, root: Path, splits: Splits) -> None:
    """Refuse data that differs from what the sweep in ``root`` began with; reads, writes
    nothing. A sweep folder without a record of its data (begun before it was kept) passes.

    Raises:
        ConfigError: ``data.path=... is invalid: ...`` naming what changed (class names,
            an array's shape, dtype or content).
    """
    record = SweepLayout(root).data_fingerprint
    if not record.is_file():
        return
    changes = fingerprint_changes(json.loads(record.read_text()), splits.fingerprint)
    if changes:
        shown = "; ".join(changes[:4]) + (" ..." if len(changes) > 4 else "")
        raise ConfigError("data.path" if cfg.data.path else "data.name",
                          cfg.data.path or cfg.data.name,
                          f"the data changed since the sweep in {root} began ({shown}); put "
                          "back the data it began with, or fresh=true for a new sweep on "
                          "this data")


def record_data(root: Path, splits: Splits) -> None:
    """Keep the fingerprint of the data a sweep trains on, unless its folder holds one."""
    record = SweepLayout(root).data_fingerprint
    if splits.fingerprint and not record.is_file():
        write_json(record, splits.fingerprint, indent=1)


def this_sweep_attrs(cfg: SweepConfig, splits: Splits | None = None) -> dict[str, Any]:
    """What this sweep's trial values mean (:func:`sweeper.study.sweep_attrs`)."""
    digest = splits.fingerprint.get("digest") if splits is not None else None
    return sweep_attrs(cfg.search.metric, cfg.search.mode, cfg.train.epochs,
                       dataclasses.asdict(cfg.data), digest)


def validate(cfg: DictConfig | SweepConfig) -> tuple[SweepConfig, dict[str, BaseDistribution]]:
    """Type-check, range-check and parse the search space; raises ConfigError."""
    typed = cfg if isinstance(cfg, SweepConfig) else to_sweep_config(cfg)
    validate_trial_settings(typed.data, typed.model, typed.train)
    image_size = check_source(typed.data, typed.train.validation_fraction,
                              typed.train.batch_size)
    validate_sweep_settings(typed)
    if typed.search.warm_start:
        url, study = resolve_warm_start(typed.search.warm_start, typed.search.warm_start_study)
        check_warm_start(url, study, typed.search.warm_start, this_sweep_attrs(typed))
    if typed.cluster.address is None:
        from sweeper.tuner import local_capacity

        cpus, gpus = local_capacity(typed.cluster)
        check_resources_fit(typed.resources, cpus, gpus, where="this machine")
    validate_cluster(typed.cluster)
    searched = {key.partition(".")[2]: expression
                for key, expression in flatten_space(typed.search.space).items()
                if key.startswith("model.")}
    check_builder(typed.model, searched)
    space = build_search_space(typed)
    if typed.search.start_with_defaults:
        configured_point(typed, space)  # refuses a configured value the space does not hold
    if image_size is not None:
        check_model_fits(typed, space, image_size)
    return typed, space


# A config validated() checked, with what it found: repr of the config then, and the search
# space. An unchanged config (same repr) is not checked again; a changed one is.
_VALIDATED = "_sweeper_validated"


def validated(cfg: DictConfig | SweepConfig) -> tuple[SweepConfig, dict[str, BaseDistribution]]:
    """:func:`validate`, once per config: a SweepConfig this returned before and that has not
    changed since comes back as it is, with its search space."""
    if isinstance(cfg, SweepConfig):
        done = getattr(cfg, _VALIDATED, None)
        if done is not None and done[0] == repr(cfg):
            return cfg, done[1]
    typed, space = validate(cfg)
    mark_validated(typed, space)
    return typed, space


def mark_validated(cfg: SweepConfig, space: dict[str, BaseDistribution]) -> None:
    """Record that ``cfg`` as it is now passed :func:`validate` with ``space``."""
    setattr(cfg, _VALIDATED, (repr(cfg), space))


def check_model_fits(cfg: SweepConfig, space: dict[str, BaseDistribution],
                     image_size: tuple[int, ...]) -> None:
    """Refuse images the CNN would shrink below one pixel with the configured padding, kernel
    and depth, or with any padding or (largest) kernel, block count and convolutions per
    block the search may sample."""
    if not isinstance(cfg.model, ModelConfig):
        return  # a user's model is built once on the driver instead (check_network)
    paddings = {cfg.model.padding}
    searched_padding = space.get("model.padding")
    if isinstance(searched_padding, CategoricalDistribution):
        paddings |= set(searched_padding.choices)
    largest = {name: _largest(space.get(f"model.{name}"), getattr(cfg.model, name))
               for name in ("kernel_size", "blocks", "convs_per_block")}
    depths = {largest["blocks"]}
    searched_blocks = space.get("model.blocks")
    if cfg.model.blocks == 0 or (searched_blocks is not None and _smallest(searched_blocks) == 0):
        depths.add(0)  # the classic network's three convolutions
    for padding in sorted(paddings, reverse=True):  # valid first: it shrinks the most
        for blocks in sorted(depths):
            check_input_fits(dataclasses.replace(cfg.model, padding=padding,
                                                 **{**largest, "blocks": blocks}),
                             int(image_size[0]), int(image_size[1]))


def _largest(distribution: BaseDistribution | None, configured: int) -> int:
    """The largest integer a searched setting may take (its configured value if not searched)."""
    if distribution is None:
        return configured
    if isinstance(distribution, CategoricalDistribution):
        return max(configured, *(int(choice) for choice in distribution.choices))
    return max(configured, int(distribution.high))


def _smallest(distribution: BaseDistribution) -> int:
    if isinstance(distribution, CategoricalDistribution):
        return min(int(choice) for choice in distribution.choices)
    return int(distribution.low)


def run_sweep(cfg: DictConfig | SweepConfig) -> SweepResult:
    """Validate (unless :func:`validated` already did), load data, run (or resume) the trials
    on Ray, write the sweep folder; ``sweeper.run`` is its public name.

    Everything a user can get wrong is checked before Ray starts. Re-running an interrupted
    sweep resumes it; re-running a complete one only reports where its results are.

    Raises:
        ConfigError: The user's configuration is wrong (nothing was started).
        SweepFailed: No trial produced a result.
    """
    from sweeper.api import ALREADY_COMPLETE, SweepResult

    cfg_t, space = validated(cfg)
    if cfg_t.fresh:
        cfg_t = fresh_variant(cfg_t)
    import ray

    from sweeper.scheduler import TIME_BUDGET
    from sweeper.tuner import build_tuner, connect, read_scheduler_decisions, tune_settings

    layout = SweepLayout.for_config(cfg_t)
    state = sweep_state(layout.root)
    if state == COMPLETE:  # decided before loading (or downloading) any data
        claim_sweep_dir(cfg_t, layout.root, state)  # refuses a different config under this name
        return SweepResult(Summary.read(layout.summary), layout, ALREADY_COMPLETE)
    splits = load_splits(cfg_t.data, cfg_t.train.validation_fraction, cfg_t.train.seed)
    check_model_fits(cfg_t, space, splits.input_shape)
    if not isinstance(cfg_t.model, ModelConfig):
        from sweeper.compat import import_tensorflow

        import_tensorflow()  # the build below starts TensorFlow: without its start-up noise
        from sweeper.model import check_network

        check_network(cfg_t.model, splits.input_shape, splits.num_classes)
    check_data_unchanged(cfg_t, layout.root, splits)
    warm_trials = None
    if cfg_t.search.warm_start and state == NEW:
        url, study = resolve_warm_start(cfg_t.search.warm_start, cfg_t.search.warm_start_study)
        check_warm_start(url, study, cfg_t.search.warm_start, this_sweep_attrs(cfg_t, splits))
        warm_trials = earlier_trials(url, study, space)
    claim_sweep_dir(cfg_t, layout.root, state)
    record_data(layout.root, splits)
    location = study_location(cfg_t.search.storage, layout.root)
    storage = open_storage(location)

    log_plan(cfg_t, layout.root, resuming=state == INTERRUPTED)
    baseline = majority_baseline(splits)
    if baseline.val_accuracy is not None:  # the reference for every val_accuracy that follows
        logger.info("Baseline: always predicting %r, the training split's most frequent class, "
                    "scores validation accuracy %.4f", baseline.class_name, baseline.val_accuracy)
    started_ray = connect(cfg_t.cluster, runtime_env=builder_runtime_env(cfg_t.model))
    try:
        if joins_cluster(cfg_t.cluster):
            log_cluster()
        tuner = build_tuner(cfg_t, space, splits, layout, storage, warm_trials,
                            study_attrs=this_sweep_attrs(cfg_t, splits))
        TIME_BUDGET.arm(cfg_t.search.time_budget_s)
        with tune_settings(cfg_t):
            grid = tuner.fit()
        # Once all trials have ended no record is unfinished, so sweep_done changes nothing.
        records = records_from_results(grid, cfg_t.search.metric, cfg_t.search.mode,
                                       cfg_t.train.epochs, sweep_done=False)
        done = all_trials_ended(records, cfg_t.search.num_trials)
        budget_spent = not done and TIME_BUDGET.spent
        ranked = rank(records, cfg_t.search.mode)
        # Still on Ray: a retrain of the best config runs where the trials ran. A sweep whose
        # time budget ran out is scored too: its best so far is the answer it had time for.
        test, export_error = (export_final(cfg_t, ranked[0], splits, layout.root)
                              if ranked and (done or budget_spent) else (None, None))
    finally:
        if started_ray:
            ray.shutdown()
    summary = build_summary(
        cfg_t.name, cfg_t.search.metric, cfg_t.search.mode, cfg_t.train.epochs, records, layout,
        search_space=flatten_space(cfg_t.search.space),
        test=None if test is None else TestScores.from_dict(test),
        baseline=baseline,
        state=COMPLETE if done else TIME_BUDGET_SPENT if budget_spent else INTERRUPTED,
        time_budget_s=cfg_t.search.time_budget_s if budget_spent else None,
        data=splits.describe(),
        study={"storage": study_url_in_sweep(location, layout.root),
               "study_name": cfg_t.name},
        reproducible=cfg_t.search.reproducible,
        scheduler_decisions=read_scheduler_decisions(layout))
    publish(summary, records, layout)
    if summary.best is None and done:
        raise SweepFailed(f"{summary.error}; see {layout.summary}")
    if summary.best is None and budget_spent and any(r.status == FAILED for r in records):
        # Failures and no result: said as where every trial ended, not as a table of none.
        unfinished = sum(r.status == UNFINISHED for r in records)
        rest = (f" (the time budget ran out with {counted(unfinished, 'trial')} not yet ended; "
                "the same command continues the sweep)" if unfinished else "")
        raise SweepFailed(f"{summary.error}; see {layout.summary}{rest}")
    if export_error is not None:
        # The trials are kept (summary.json, trials.csv, the report); the model is not usable.
        raise SweepFailed(f"every trial ended, but the best trial {ranked[0].trial_id} could not "
                          f"be exported or scored on the test split ({export_error}); the "
                          f"trials' results are in {layout.summary}")
    return SweepResult(summary, layout, summary.state)


def log_plan(cfg: SweepConfig, root: Path, resuming: bool) -> None:
    """A few lines on what is about to run (the data's line comes from loading it)."""
    scheduler = cfg.scheduler
    asha = (f"ASHA (grace {scheduler.grace_period}, reduction {scheduler.reduction_factor:g})"
            if scheduler.name == "asha" else "no early stopping")
    at_once = max_concurrent_trials(cfg)
    logger.info("Sweep %r%s: %s of up to %s, %s at a time; %s searcher, %s; "
                "best %s (%s)", cfg.name, " (resumed)" if resuming else "",
                counted(cfg.search.num_trials, "trial"), counted(cfg.train.epochs, "epoch"),
                at_once or "as many as fit",
                cfg.search.sampler.upper() if cfg.search.sampler == "tpe" else cfg.search.sampler,
                asha, cfg.search.metric, cfg.search.mode)
    for key, expression in flatten_space(cfg.search.space).items():
        logger.info("Search space: %s = %s", key, expression)
    logger.info("Results: %s", root)


def export_final(cfg: SweepConfig, best, splits: Splits,
                 sweep_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Export and test-score the best trial: its test block (None when ``final.evaluate`` is
    false) and None, or None and why it failed, in one line (the traceback goes to the log at
    debug level). A failure here never loses the trials' results."""
    from sweeper.compat import import_tensorflow
    from sweeper.evaluate import export_best
    from sweeper.trial import retrain_on_cluster

    try:
        import_tensorflow()
        return export_best(cfg, best, splits, sweep_dir, retrainer=retrain_on_cluster), None
    except Exception as error:  # any failure of Keras, Ray or the user's code while exporting
        logger.debug("Could not export or evaluate the best trial %s", best.trial_id,
                     exc_info=True)
        message = (str(error).strip().splitlines() or [""])[0]
        return None, f"{type(error).__name__}: {message}"
