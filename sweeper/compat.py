"""Workarounds of other libraries' internals, in one place.

Each names the upstream issue it works around and the versions it was checked with, and says
what happens when a new version no longer has what it relies on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# tensorflow/tensorflow#97697 (also #27492, keras-team/tf-keras#286 and its proposed fix
# keras-team/tf-keras#898): tf.custom_gradient, traced in a graph, registers its gradient
# function under a new name "CustomGradient-<uid>" in TensorFlow's global gradient registry
# and never removes it. The function's closure holds the traced graph, so every model that
# is trained (Keras' train step all-reduces its gradients through a custom gradient) stays in
# memory after keras.backend.clear_session(): about 4 MiB a rebuilt trial in a reused worker
# (benchmarks/worker_memory.py). Checked with TensorFlow 2.21.0, Keras 3.15.1.
_CUSTOM_GRADIENT_PREFIX = "CustomGradient-"
_warned_registry_changed = False


def _gradient_registry() -> dict | None:
    """TensorFlow's gradient registry (name -> registration), or None where it has moved."""
    global _warned_registry_changed
    from tensorflow.python.framework import ops

    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    if not isinstance(registry, dict):
        if not _warned_registry_changed:
            logger.warning("TensorFlow's gradient registry has moved (checked with 2.21); a "
                           "reused worker's memory grows with every rebuilt model "
                           "(tensorflow/tensorflow#97697)")
            _warned_registry_changed = True
        return None
    return registry


def custom_gradient_names() -> frozenset[str]:
    """The names of the custom gradients registered in this process so far."""
    registry = _gradient_registry()
    if registry is None:
        return frozenset()
    return frozenset(name for name in registry if name.startswith(_CUSTOM_GRADIENT_PREFIX))


def forget_custom_gradients(keep: frozenset[str]) -> int:
    """Unregister the custom gradients registered since ``keep`` was taken; returns how many.

    Only for gradients of graphs that are gone: call it after the models and tf.functions
    traced since ``keep`` have been dropped (after ``keras.backend.clear_session()``). A
    gradient still needed would fail loudly (LookupError: no gradient defined), never
    silently wrong.
    """
    registry = _gradient_registry()
    if registry is None:
        return 0
    stale = [name for name in registry
             if name.startswith(_CUSTOM_GRADIENT_PREFIX) and name not in keep]
    for name in stale:
        del registry[name]
    return len(stale)


# TensorFlow's start-up lines that no user can act on (TensorFlow 2.21 with its CUDA stubs, on a
# machine without a GPU driver): absl's note on logging before InitializeLog, the CUDA stub's
# "Could not find cuda drivers" (logged at load time, before TF_CPP_MIN_LOG_LEVEL is read), the
# CPU-instructions banner, and cuInit's error 303 (CUDA_ERROR_NO_DEVICE-like "UNKNOWN ERROR" where
# no driver is loaded). Any other line, a real CUDA error on a GPU machine included, stays.
TENSORFLOW_STARTUP_NOISE = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "cudart_stub.cc:",
    "cpu_feature_guard.cc:",
    "To enable the following instructions:",
    "failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
)


@contextlib.contextmanager
def startup_noise_filtered():
    """Capture this process's stderr (the file descriptor, which TensorFlow's C++ writes to)
    while TensorFlow starts, then write back every line but :data:`TENSORFLOW_STARTUP_NOISE`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(noise in line for noise in TENSORFLOW_STARTUP_NOISE):
                    sys.stderr.write(line)
            sys.stderr.flush()


def import_tensorflow():
    """``import tensorflow``, with its devices found, without its start-up noise (see
    :data:`TENSORFLOW_STARTUP_NOISE`); later calls only return the module. TensorFlow may
    already be imported (a user's model module imports Keras): its devices, where CUDA
    starts and cuInit's line comes from, are then found inside the filter here."""
    global _devices_found
    if _devices_found:
        import tensorflow as tf

        return tf
    with startup_noise_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA starts here, inside the filter
    _devices_found = True
    return tf


_devices_found = False


# ray-project/ray#31613 (open as a TODO in ray/tune/execution/experiment_state.py: "a
# non-performant workaround"; the forcing came with ray-project/ray#30187 for #30073).
# With num_to_keep set, Tune saves the whole experiment state (every trial, the searcher, the
# callbacks: O(trials)) whenever a trial has checkpointed num_to_keep times since the last
# save, so that the saved state never names a checkpoint Tune has since deleted. sweeper keeps
# one checkpoint per trial and checkpoints every epoch, so every result forced a save: 146
# saves for 143 results with 16 dummy trials (benchmarks/scaling.py), O(trials) per result,
# and Tune's "snapshotting has been triggered multiple times" warning. The same guarantee
# without the forced saves: the state is saved on Tune's timer (TUNE_GLOBAL_CHECKPOINT_S,
# "auto": every max(10 s, 19 x the time a save takes)), and a checkpoint Tune drops is deleted
# only once a state saved after the drop (which no longer names it) has reached the storage.
# A driver killed in between leaves those folders behind; nothing a resume reads is missing.
# Checked with Ray 2.60.
_RAY_CHECKPOINT_MANAGER = "ray.train._internal.checkpoint_manager"
_RAY_EXPERIMENT_STATE = "ray.tune.execution.experiment_state"


@contextlib.contextmanager
def snapshots_on_a_timer():
    """While Tune runs: no experiment-state save forced by trial checkpoints, and dropped
    checkpoints deleted only after the next save has been stored (see above)."""
    import importlib

    checkpoints = importlib.import_module(_RAY_CHECKPOINT_MANAGER)
    state = importlib.import_module(_RAY_EXPERIMENT_STATE)
    manager = getattr(state, "_ExperimentCheckpointManager", None)
    needed = (getattr(checkpoints, "_delete_fs_path", None),
              getattr(manager, "on_trial_checkpoint", None),
              getattr(manager, "sync_up_experiment_state", None))
    if not all(callable(part) for part in needed):
        logger.warning("Ray Tune's experiment-state saving has changed (checked with Ray 2.60): "
                       "a save is forced at every trial checkpoint (ray-project/ray#41455)")
        yield
        return
    delete, on_trial_checkpoint, sync_up = needed
    dropped: list[tuple] = []  # (filesystem, path) of checkpoints Tune no longer names

    def defer_delete(fs, fs_path: str) -> None:
        dropped.append((fs, fs_path))

    def save_then_delete(self, save_fn, force: bool = False, wait: bool = False) -> None:
        saved_before = self._last_save_time
        droppable = len(dropped)  # dropped before this save: the saved state does not name them
        sync_up(self, save_fn, force=force, wait=wait)
        if self._last_save_time == saved_before or not droppable:
            return  # no save this time (Tune's timer), or nothing to delete
        try:
            self._storage.syncer.wait()  # the saved state has reached the storage
        except Exception as error:  # keep the checkpoints; Tune logs the failed sync itself
            logger.debug("Experiment state not stored (%s); checkpoints kept", error)
            return
        for fs, fs_path in dropped[:droppable]:
            delete(fs=fs, fs_path=fs_path)
        del dropped[:droppable]

    checkpoints._delete_fs_path = defer_delete
    manager.on_trial_checkpoint = lambda self, trial: None
    manager.sync_up_experiment_state = save_then_delete
    try:
        yield
    finally:
        checkpoints._delete_fs_path = delete
        manager.on_trial_checkpoint = on_trial_checkpoint
        manager.sync_up_experiment_state = sync_up


def checkpoints_in_saved_state(state_file: Path) -> dict[str, set[str]]:
    """Trial id -> the names of the checkpoint folders (``checkpoint_000003``) that a saved
    experiment state of Tune names for that trial (its best ones and its latest): what a
    resume restores from. Read with Tune's own classes (Ray 2.60: the trial's run metadata
    holds its checkpoint manager); a Tune that stores them elsewhere raises here, loudly."""
    from ray.tune.experiment import Trial

    state = json.loads(Path(state_file).read_text())
    named: dict[str, set[str]] = {}
    for trial_json, run_metadata in state["trial_data"]:
        trial = Trial.from_json_state(trial_json, stub=True)
        trial.restore_run_metadata(run_metadata)
        manager = trial.run_metadata.checkpoint_manager
        results = [*manager.best_checkpoint_results, manager.latest_checkpoint_result]
        named[trial.trial_id] = {Path(result.checkpoint.path).name
                                 for result in results if result is not None}
    return named


# Optuna's RDB storage writes an intermediate value as one ORM transaction (look up the trial,
# check its state, look up the step, insert, commit): 2.3-3.5 ms of CPU each on the 2-core test
# machine (SQLite, Optuna 5.0), more than the whole budget of a result; Optuna has no batch API
# for them (optuna/optuna#3478 and #3048: slow reports and RDB writes). The searcher buffers a
# second of values and adds them here in one INSERT of Optuna's own table (schema checked
# with Optuna 5.0; any other storage, or a changed table, is written the ordinary way).
_INTERMEDIATE_COLUMNS = {"trial_id", "step", "intermediate_value", "intermediate_value_type"}
_warned_study_table_changed = False


def add_intermediate_values(storage, values: list[tuple[int, int, float]]) -> None:
    """Write finite intermediate values ``(Optuna trial id, step, value)`` of running trials,
    steps not yet in the study, in one transaction where ``storage`` is Optuna's RDB storage
    (or its cache in front of one)."""
    global _warned_study_table_changed
    from optuna.storages import RDBStorage
    from optuna.storages._rdb import models

    backend = getattr(storage, "_backend", storage)
    model = getattr(models, "TrialIntermediateValueModel", None)
    table = getattr(model, "__table__", None)
    usable = table is not None and set(table.columns.keys()) >= _INTERMEDIATE_COLUMNS
    if not isinstance(backend, RDBStorage) or not usable:
        if isinstance(backend, RDBStorage) and not _warned_study_table_changed:
            logger.warning("Optuna's table of intermediate values has changed (checked with "
                           "Optuna 5.0); each epoch is written in a transaction of its own")
            _warned_study_table_changed = True
        for trial_id, step, value in values:
            storage.set_trial_intermediate_value(trial_id, step, value)
        return
    finite = model.TrialIntermediateValueType.FINITE
    with backend.engine.begin() as connection:
        connection.execute(table.insert(), [
            {"trial_id": trial_id, "step": step, "intermediate_value": value,
             "intermediate_value_type": finite} for trial_id, step, value in values])


# Optuna's TPE models every trial of the study at every suggestion (no option to limit them,
# Optuna 5.0; optuna/optuna#3048 shows the cost growing with the study): 35 ms a suggestion at
# 1 000 trials of the wide space, 131 ms at 5 000, against 38-43 ms at any size with 500
# trials shown (benchmarks/RESULTS.md section 5). WindowedTPESampler shows TPE the best
# finished trials (as many as TPE's "good" group can hold) and the most recent ones, up to a
# window, plus the running ones its constant liar needs. It hands TPE a view of the study in
# TPESampler._sample, Optuna's private step where the trials are read; an Optuna without it
# gets plain TPE and a warning.
TPE_GOOD_TRIALS = 25  # Optuna's default_gamma: the good group holds at most 25 trials


def tpe_window(trials: list, window: int, maximize: bool) -> list:
    """The trials TPE models: all when at most ``window`` have finished; else the
    :data:`TPE_GOOD_TRIALS` best completed ones, the most recent finished ones up to
    ``window`` in all, and every running one (in study order)."""
    from optuna.trial import TrialState

    finished = [trial for trial in trials if trial.state != TrialState.RUNNING]
    if len(finished) <= window:
        return trials
    completed = [trial for trial in finished if trial.state == TrialState.COMPLETE]
    best = sorted(completed, key=lambda trial: trial.value, reverse=maximize)[:TPE_GOOD_TRIALS]
    chosen = {trial.number for trial in best}
    for trial in reversed(finished):
        if len(chosen) >= window:
            break
        chosen.add(trial.number)
    return [trial for trial in trials
            if trial.number in chosen or trial.state == TrialState.RUNNING]


class _StudyWindow:
    """A study whose trials, as TPE reads them, are :func:`tpe_window`'s."""

    def __init__(self, study, window: int) -> None:
        self._study, self._window = study, window

    def __getattr__(self, name: str):
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = False, states=None, use_cache: bool = False):
        from optuna.study import StudyDirection

        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        maximize = self._study.direction == StudyDirection.MAXIMIZE
        return tpe_window(trials, self._window, maximize)


def _windowed_tpe_class() -> type:
    import optuna

    class WindowedTPESampler(optuna.samplers.TPESampler):
        """Optuna's TPESampler modelling at most ``window`` finished trials (see above)."""

        def __init__(self, window: int, **tpe_options: Any) -> None:
            super().__init__(**tpe_options)
            self.window = window

        def _sample(self, study, trial, search_space):
            return super()._sample(_StudyWindow(study, self.window), trial, search_space)

    WindowedTPESampler.__module__, WindowedTPESampler.__qualname__ = __name__, "WindowedTPESampler"
    return WindowedTPESampler


def __getattr__(name: str) -> Any:
    """``WindowedTPESampler`` is made on first use (and found by pickle when Tune restores the
    searcher): the trial workers import this module and need no Optuna."""
    if name == "WindowedTPESampler":
        globals()[name] = _windowed_tpe_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def windowed_tpe_sampler(window: int, **tpe_options: Any):
    """A TPE sampler modelling at most ``window`` finished trials (WindowedTPESampler), or
    Optuna's own TPE where its ``_sample`` has gone."""
    import optuna

    if not callable(getattr(optuna.samplers.TPESampler, "_sample", None)):
        logger.warning("Optuna's TPESampler has changed (checked with Optuna 5.0): it models "
                       "every trial, and its suggestions slow down as the study grows")
        return optuna.samplers.TPESampler(**tpe_options)
    return __getattr__("WindowedTPESampler")(window, **tpe_options)


# Ray Tune numbers the trials a searcher creates, from 1, in the experiment tag it gives each
# (SearchGenerator.create_trial: "<counter>_<sampled values>"). The tag is saved with the
# experiment state, so the number holds across a resume, while the order of a ResultGrid does
# not: a grid read back from the sweep folder lists the trials in another order than the one
# Tuner.fit returned. Tune has no public accessor for the tag (a Result carries neither it nor
# its Trial), hence ResultGrid._experiment_analysis.trials. Checked with Ray 2.60.
def trial_creation_number(trial: object) -> int | None:
    """The number Tune's searcher gave ``trial`` when it created it (from 1), or None for a
    trial that was not created by a searcher (no numbered experiment tag)."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) if head.isdigit() else None


def result_grid_trial_numbers(grid: object) -> dict[str, int]:
    """Trial id -> creation number for each trial of a Ray Tune ``ResultGrid``; empty for
    other collections of results (which do not know their trials).

    Raises:
        RuntimeError: Ray Tune's ResultGrid no longer keeps its trials where Ray 2.60 did.
    """
    from ray.tune import ResultGrid

    if not isinstance(grid, ResultGrid):
        return {}
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None)
    if trials is None:
        raise RuntimeError("Ray Tune's ResultGrid no longer holds its trials in "
                           "_experiment_analysis.trials (checked with Ray 2.60): "
                           "sweeper.compat.result_grid_trial_numbers needs a new way to them")
    return {trial.trial_id: number for trial in trials
            if (number := trial_creation_number(trial)) is not None}


# Ray Tune ends a run gracefully on Ctrl-C (SIGINT): the handler tune.run installs for it sets
# the run's "experiment interrupted" event, the controller's loop ends after its current step,
# the experiment is saved one last time and Tuner.restore resumes it (Ray 2.60,
# ray/tune/tune.py _setup_signal_catching). Tune has no public call that ends a run that way
# (Stopper.stop_all, behind Tune's own time_budget_s, terminates every trial and finishes the
# searcher, so nothing is left to resume: ray-project/ray#19240, and #30584 for fail_fast), so
# search.time_budget_s calls that handler. Where no such handler is installed (fit outside
# the main thread) it warns instead and the run goes on to its end.
def end_tune_run_gracefully() -> None:
    """End the Ray Tune run in progress as Ctrl-C would, once; the caller is in its loop."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    if getattr(handler, "__name__", "") != "signal_interrupt_tune_run":
        logger.warning("Cannot end the Ray Tune run before its end: Tune's Ctrl-C handler is "
                       "not installed (checked with Ray 2.60); the sweep goes on")
        return
    tune_logger = logging.getLogger("ray.tune.tune")
    # Its warning speaks of a stop signal and Ctrl+C; the caller says why the run ends.
    not_a_signal = _WithoutMessage("Stop signal received")
    tune_logger.addFilter(not_a_signal)
    try:
        handler(signal.SIGINT, None)
    finally:
        tune_logger.removeFilter(not_a_signal)


class _WithoutMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)
