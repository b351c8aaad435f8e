"""Ray Tune assembly on the driver: trainable, searcher, scheduler, resources, storage, restore.

Ray lives here and in :mod:`sweeper.trial` (what runs on the workers). Everything they
call into (trainer, space, results) takes and returns plain values.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.distributions import BaseDistribution
from ray import tune
from ray.tune import Callback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.result import EXPR_PROGRESS_FILE, EXPR_RESULT_FILE, TRAINING_ITERATION
from ray.tune.schedulers import TrialScheduler

from sweeper import compat
from sweeper.compat import checkpoints_in_saved_state, snapshots_on_a_timer
from sweeper.config import (
    ClusterConfig,
    SchedulerConfig,
    SearchConfig,
    SweepConfig,
    max_concurrent_trials,
)
from sweeper.data import Splits
from sweeper.layout import TRIAL_FOLDER_PREFIX, SweepLayout, write_json
from sweeper.progress import DETAIL, TrialEvents
from sweeper.scheduler import BudgetedASHA, BudgetedFIFO
from sweeper.searcher import BudgetedSearch, PruningOptunaSearch, make_sampler
from sweeper.space import configured_point
from sweeper.study import record_sweep_attrs
from sweeper.tensorboard import TensorBoardCallback
from sweeper.trial import run_trial

logger = logging.getLogger(__name__)

def make_searcher(search: SearchConfig, space: dict[str, BaseDistribution], study_name: str,
                  max_epochs: int, max_concurrent: int | None = None,
                  storage: optuna.storages.BaseStorage | None = None,
                  warm_trials: list | None = None,
                  points_to_evaluate: list[dict] | None = None,
                  study_attrs: dict[str, Any] | None = None) -> PruningOptunaSearch:
    """The Optuna searcher of a new sweep, its study in ``storage`` (None: in memory).

    Args:
        search: The search settings (sampler, seed, metric, mode, ...).
        space: The parsed search space (sweeper.space.build_search_space).
        study_name: The Optuna study's name (the sweep's).
        max_epochs: A trial's full budget: fewer epochs at its end mean early-stopped.
        max_concurrent: Trials running at once (None: no limit).
        points_to_evaluate: Configurations to train first, before sampling
            (``search.start_with_defaults``: the config's own recipe).
        study_attrs: What the trial values mean (:func:`sweeper.study.sweep_attrs`), kept
            in the study for a later sweep's warm start to check.
    """
    searcher = PruningOptunaSearch(
        space=space,
        metric=search.metric,
        mode=search.mode,
        sampler=make_sampler(search.sampler, search.seed, search.n_startup_trials,
                             search.multivariate),
        storage=storage,
        study_name=study_name,
        max_epochs=max_epochs,
        max_concurrent=max_concurrent,
        points_to_evaluate=points_to_evaluate,
    )
    if study_attrs is not None:
        record_sweep_attrs(searcher.study, study_attrs)
    if warm_trials:
        searcher.add_warm_start(warm_trials)
    return searcher


def make_scheduler(scheduler: SchedulerConfig, metric: str, mode: str,
                   max_epochs: int) -> TrialScheduler:
    """ASHA over epochs (sweeper's, which records its decisions; with
    ``scheduler.compare_earlier_epochs=false`` it decides as Ray's ASHA), or FIFO for none.

    Args:
        scheduler: The ``scheduler`` settings (name, grace period, reduction factor).
        metric: The searched metric, e.g. ``val_accuracy``; ``mode`` is ``max`` or ``min``.
        max_epochs: A trial's full budget (``train.epochs``): ASHA's ``max_t``.
    """
    if scheduler.name == "none":
        return BudgetedFIFO()
    return BudgetedASHA(metric=metric, mode=mode, max_t=max_epochs,
                        grace_period=scheduler.grace_period,
                        reduction_factor=scheduler.reduction_factor,
                        compare_earlier_epochs=scheduler.compare_earlier_epochs)


class SchedulerStateCallback(Callback):
    """Save the scheduler's state (ASHA's rung records) with the experiment state.

    Ray checkpoints the searcher and the callbacks but not the scheduler (ray-project/ray#30838):
    a restored sweep would get the scheduler as it was pickled at the start, with empty rungs,
    and promote or stop trials against no history. Riding along as a callback, through the
    scheduler's own save/restore (sweeper.compat.scheduler_state), fixes that.
    """

    def __init__(self, scheduler: TrialScheduler) -> None:
        self.scheduler = scheduler

    def get_state(self) -> dict[str, Any]:
        return {"scheduler": compat.scheduler_state(self.scheduler)}

    def set_state(self, state: dict[str, Any]) -> None:
        compat.restore_scheduler_state(self.scheduler, state.get("scheduler"))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Write the scheduler's decisions, in order, beside the experiment state."""
        decisions = getattr(self.scheduler, "decisions", None)
        if decisions is None or not trials or not compat.stored_locally(trials[0]):
            return
        try:
            folder = compat.trial_experiment_folder(trials[0])
            write_json(folder / SweepLayout.SCHEDULER_DECISIONS, decisions)
        except OSError as error:  # the results stand without it; only the record is missing
            logger.warning("Could not write the scheduler's decisions: %s", error)


def read_scheduler_decisions(layout: SweepLayout) -> list[dict] | None:
    """The scheduler's decisions of a sweep in the order taken (None: no ASHA, or none saved)."""
    record = layout.scheduler_decisions
    return json.loads(record.read_text()) if record.is_file() else None


class FailedTrialsSaved(Callback):
    """Make the saved experiment state say ERROR for every trial that failed for good.

    Ray Tune does not save the status of a trial whose worker process died (see
    sweeper.compat, "trials that failed for good"): a resume would run it again whatever
    ``resume.errored`` says. So each such trial, as Tune holds it in memory (Tune's own
    format), is written to ``failed_trials.json`` in the experiment folder when it fails, and
    put into Tune's saved state after Tune's last save at the experiment's end, or, for a
    driver that was killed, before the resume (:func:`record_failed_trials`).
    """

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        if not compat.stored_locally(trial):
            return
        try:
            record = compat.trial_experiment_folder(trial) / SweepLayout.FAILED_TRIALS
            failed = json.loads(record.read_text()) if record.exists() else {}
            failed[trial.trial_id] = compat.trial_json_state(trial)
            write_json(record, failed)
            # Tune writes the error beside the driver and copies it to the trial's folder with
            # its next save, which a killed driver never makes; the error is read from there.
            for written, kept in compat.trial_error_files(trial):
                if written.is_file() and written != kept:
                    shutil.copyfile(written, kept)
        except (OSError, ValueError) as error:  # the sweep goes on; only a resume may differ
            logger.warning("Could not record failed trial %s: %s", trial.trial_id, error)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        failed = [trial for trial in trials
                  if trial.status == "ERROR" and compat.stored_locally(trial)]
        if not failed:
            return
        try:
            compat.put_into_saved_state(compat.trial_experiment_folder(failed[0]),
                                        {trial.trial_id: compat.trial_json_state(trial)
                                         for trial in failed})
        except (OSError, ValueError) as error:
            logger.warning("Could not record failed trials in the experiment state: %s", error)


def record_failed_trials(layout: SweepLayout, retry: bool) -> None:
    """Before a resume: put the trials recorded as failed into Tune's saved state, or, when
    they are to be retried, forget them (a new failure is recorded anew)."""
    record = layout.failed_trials
    if not record.exists():
        return
    if retry:
        record.unlink()
    else:
        compat.put_into_saved_state(layout.trials, json.loads(record.read_text()))


def remove_unnamed_checkpoints(layout: SweepLayout) -> None:
    """Before a resume: delete the trial checkpoints that the saved experiment state does not
    name. A killed driver leaves them: checkpoints Tune dropped whose deletion waited for the
    next save (:func:`sweeper.compat.snapshots_on_a_timer`), and those written after the last
    save. The resumed trials restore from the named ones; Tune would never delete the others."""
    saved_state = compat.newest_experiment_state(layout.trials)
    if saved_state is None:
        return
    for trial_id, names in checkpoints_in_saved_state(saved_state).items():
        for folder in layout.trial(trial_id).glob("checkpoint_*"):
            if folder.is_dir() and folder.name not in names:
                shutil.rmtree(folder, ignore_errors=True)
                logger.debug("Removed %s, which no saved state names", folder)


def last_recorded_epoch(path: Path) -> int:
    """The largest ``training_iteration`` in a trial's result.json or progress.csv (0 if none)."""
    if not path.is_file():
        return 0
    text = path.read_text(errors="replace")
    if path.suffix == ".json":
        rows = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):  # a line cut off by a killed driver
                rows.append(json.loads(line))
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    epochs = [int(float(row[TRAINING_ITERATION])) for row in rows
              if isinstance(row, dict) and row.get(TRAINING_ITERATION) not in (None, "")]
    return max(epochs, default=0)


class _EachEpochOnce:
    """Tune's result-file writers, writing each epoch of a trial once: its first result.

    Tune logs a result before the save of the checkpoint that came with it has returned, so a
    trial whose node dies in between is restored from the checkpoint before, trains that epoch
    again and reports it again (a 6-epoch trial logged 7 results on a loaded CI machine, issue
    20); a resume after a killed driver restores running trials from the last experiment
    snapshot the same way. The searcher, ASHA and TensorBoard already keep an epoch's first
    value; these files now do too, so every record of a sweep shows one value per epoch. What
    a file already holds (from before a resume) counts as written.
    """

    RECORD_FILE = ""

    def __init__(self) -> None:
        super().__init__()
        self._written_epochs: dict[str, int] = {}  # trial id -> last epoch in its file

    def log_trial_start(self, trial) -> None:
        super().log_trial_start(trial)  # type: ignore[misc]
        written = self._written_epochs
        written[trial.trial_id] = max(written.get(trial.trial_id, 0), last_recorded_epoch(
            Path(trial.local_path) / self.RECORD_FILE))

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        written = self._written_epochs
        epoch = result.get(TRAINING_ITERATION)
        if epoch is not None and trial.trial_id in written and epoch <= written[trial.trial_id]:
            logger.debug("Trial %s reported epoch %s again; its first result stands",
                          trial.trial_id, epoch)
            return
        if epoch is not None:
            written[trial.trial_id] = epoch
        super().log_trial_result(iteration, trial, result)  # type: ignore[misc]


class ResultJsonOnce(_EachEpochOnce, JsonLoggerCallback):
    """Tune's result.json writer, each epoch once."""

    RECORD_FILE = EXPR_RESULT_FILE


class ProgressCsvOnce(_EachEpochOnce, CSVLoggerCallback):
    """Tune's progress.csv writer, each epoch once."""

    RECORD_FILE = EXPR_PROGRESS_FILE


def sweep_callbacks(tensorboard_dir: Path, space: dict[str, BaseDistribution], metric: str,
                    scheduler: TrialScheduler, max_epochs: int | None = None) -> list[Callback]:
    """What the driver does with every result besides searching and scheduling.

    Tune's JSON and CSV loggers write each trial's result.json and progress.csv (results and
    users read them); its TensorBoardX logger is left out (see :func:`tune_settings`): its
    event files in every trial folder showed each trial twice to ``tensorboard --logdir`` on
    the sweep folder, beside sweeper's own runs with their hyperparameters.
    """
    return [TensorBoardCallback(tensorboard_dir, space, metric, max_epochs),
            SchedulerStateCallback(scheduler),
            FailedTrialsSaved(), ResultJsonOnce(), ProgressCsvOnce()]


def local_capacity(cluster: ClusterConfig) -> tuple[float, float]:
    """CPUs and GPUs an in-process Ray would get, found the way Ray finds them."""
    cpus = cluster.num_cpus if cluster.num_cpus is not None else os.cpu_count() or 1
    if cluster.num_gpus is not None:
        return float(cpus), float(cluster.num_gpus)
    return float(cpus), float(compat.local_gpu_count())


def connect(cluster: ClusterConfig, runtime_env: dict[str, Any] | None = None) -> bool:
    """Start or join Ray as the config says; returns whether this call started it.

    ``runtime_env`` (sweeper.builder.runtime_env: a user's model code) becomes the job's, so
    every worker on every node imports it. Without one the workers start directly, not
    through Ray's runtime-env shim (see :func:`tune_settings`).
    """
    if ray.is_initialized():
        if runtime_env:
            logger.warning("Ray was already started: the workers import the model's code only "
                           "if they can find it themselves (%s)", runtime_env)
        return False
    if cluster.address:
        ray.init(address=cluster.address, logging_level=logging.WARNING,
                 runtime_env=runtime_env)
    else:
        # "local" starts a fresh Ray even where `ray start` left a cluster running.
        # No idle workers prestarted for the driver: the trials gain nothing from them
        # (sweeper.compat.LOCAL_RAY_SYSTEM_CONFIG).
        compat.init_local_ray(num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus,
                              include_dashboard=False, logging_level=logging.WARNING,
                              runtime_env=runtime_env)
    compat.drop_colorama_reset_at_exit()
    return True


def _trainable(cfg: SweepConfig, splits: Splits):
    resources = {"cpu": cfg.resources.cpu_per_trial, "gpu": cfg.resources.gpu_per_trial}
    # with_parameters puts the arrays in the object store once; trials read them zero-copy.
    return tune.with_resources(tune.with_parameters(run_trial, splits=splits, base=cfg), resources)


def pending_trials(cfg: SweepConfig, cpus: float, gpus: float) -> int:
    """How many trials Tune may be starting at once: all that may run concurrently.

    For a custom searcher Tune starts one trial at a time (it waits for each trial's actor
    before asking the searcher for the next), which leaves workers idle at the start of a
    sweep and shows an autoscaler one trial's demand at a time. Our searcher holds the
    concurrency limit itself, so asking for this many never samples ahead of the results.
    Without a limit: as many as the cluster holds now (at least one, so a cluster that has
    yet to scale up sees demand one trial at a time, as before).
    """
    limit = max_concurrent_trials(cfg)
    if limit:
        return limit
    fits = [cpus // cfg.resources.cpu_per_trial] if cfg.resources.cpu_per_trial else []
    if cfg.resources.gpu_per_trial:
        fits.append(gpus // cfg.resources.gpu_per_trial)
    return max(1, int(min(fits, default=1)))


TUNE_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGUSR1")
                     if hasattr(signal, name))  # Windows has no SIGUSR1


@contextlib.contextmanager
def tune_settings(cfg: SweepConfig):
    """Settings Tune reads from the environment, set while fit() runs (values the user set are
    left alone), and the signal handlers fit() installs, put back after it.

    - ``TUNE_MAX_PENDING_TRIALS_PG``: start :func:`pending_trials` trials at once.
    - ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``: Tune adds its CSV, JSON and TensorBoardX loggers
      unless told not to; :func:`sweep_callbacks` holds the first two, and sweeper writes
      TensorBoard events itself.
    - Tune's SIGINT (Ctrl-C) and SIGUSR1 handlers stay installed after a fit that was not
      interrupted: a Ctrl-C during the final retrain would only print Tune's "ending Ray Tune
      run" and be lost.
    - SIGTERM (a preempted job, ``kill``, ``docker stop``) stops the trials as Ctrl-C does: Tune
      saves the experiment one last time and the caller learns it was interrupted. Ray's own
      handler ended the driver at once (exit 1, a stack dump, no last save).
    - Experiment-state saves on Tune's timer only, not forced by every trial checkpoint
      (:func:`sweeper.compat.snapshots_on_a_timer`: with one checkpoint kept per trial, Tune
      saved the whole state at every result).
    - Tune's default runtime env for trial actors is left out
      (:func:`sweeper.compat.tune_actor_env_cleared`): any runtime env starts each trial
      worker through Ray's ``setup_worker.py`` shim, one more Python process per worker.
      Environment variables that Tune forwards from the driver (AWS credentials for one)
      still go.
    """
    settings = {
        "TUNE_MAX_PENDING_TRIALS_PG": str(pending_trials(cfg, *_cluster_capacity())),
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    }
    if cfg.verbose < DETAIL:
        # Tune's newer console output prints its experiment box even at verbose=0; the
        # classic one prints nothing there (sweeper prints its own lines; Ray 2.60).
        settings["RAY_AIR_NEW_OUTPUT"] = "0"
    ours = {key: value for key, value in settings.items() if key not in os.environ}
    os.environ.update(ours)
    handlers = {number: signal.getsignal(number) for number in (*TUNE_SIGNALS, signal.SIGTERM)}
    # Handlers can only be set from the main thread, the one where Tune installs its own.
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, _as_ctrl_c)
    try:
        with compat.tune_actor_env_cleared(), snapshots_on_a_timer():
            yield
    finally:
        for key in ours:
            os.environ.pop(key, None)
        if in_main_thread:
            for number, handler in handlers.items():
                if handler is not None:  # None: not installed from Python; leave it
                    signal.signal(number, handler)


def _as_ctrl_c(signum: int, frame) -> None:
    """Hand a signal to whatever handles Ctrl-C now: Tune's graceful stop while it runs the
    trials; after a first stop, Python's KeyboardInterrupt."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def _cluster_capacity() -> tuple[float, float]:
    capacity = ray.cluster_resources()
    return capacity.get("CPU", 1.0), capacity.get("GPU", 0.0)


def _trial_dirname(trial) -> str:
    return f"{TRIAL_FOLDER_PREFIX}{trial.trial_id}"


def build_tuner(cfg: SweepConfig, space: dict[str, BaseDistribution], splits: Splits | None,
                layout: SweepLayout, storage: optuna.storages.BaseStorage | None = None,
                warm_trials: list | None = None, trainable=None,
                study_attrs: dict[str, Any] | None = None) -> tune.Tuner:
    """A new Tuner for the sweep, or the interrupted one restored from its folder.

    ``trainable``: what each trial runs (default: sweeper's trainer on ``splits`` with the
    config's resources); the scaling benchmark and the recovery tests pass dummy trials that
    report like the trainer, so the driver does exactly what a sweep's driver does.
    """
    trainable = trainable or _trainable(cfg, splits)
    if tune.Tuner.can_restore(str(layout.trials)):
        logger.info("==== Resuming the interrupted sweep in %s ====", layout.trials)
        record_failed_trials(layout, retry=cfg.resume.errored == "retry")
        remove_unnamed_checkpoints(layout)
        return tune.Tuner.restore(str(layout.trials), trainable=trainable,
                                  resume_errored=cfg.resume.errored == "retry")
    metric, mode = cfg.search.metric, cfg.search.mode
    scheduler = make_scheduler(cfg.scheduler, metric, mode, cfg.train.epochs)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=BudgetedSearch(make_searcher(
                cfg.search, space, cfg.name, cfg.train.epochs, max_concurrent_trials(cfg),
                storage, warm_trials,
                points_to_evaluate=[configured_point(cfg, space)]
                if cfg.search.start_with_defaults else None, study_attrs=study_attrs)),
            scheduler=scheduler,
            num_samples=cfg.search.num_trials,
            trial_dirname_creator=_trial_dirname,
            # A reused worker keeps TensorFlow imported and the data mapped between trials.
            reuse_actors=cfg.resources.reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=SweepLayout.TRIALS,
            storage_path=str(layout.root),
            callbacks=[*sweep_callbacks(layout.tensorboard, space, metric, scheduler,
                                        cfg.train.epochs),
                       TrialEvents(metric, mode, cfg.search.num_trials, scheduler)],
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=cfg.recovery.keep_checkpoints,  # best by metric; Ray keeps the latest
                checkpoint_score_attribute=metric,
                checkpoint_score_order=mode,
            ),
            failure_config=tune.FailureConfig(max_failures=cfg.recovery.max_failures),
            # Ray's own trial tables only at verbose=2: sweeper logs one line per trial event.
            verbose=1 if cfg.verbose >= DETAIL else 0,
        ),
    )
