"""Every use of another library's internals, in one room.

Each workaround names the upstream issue it works around (or says that none was found), the
versions it was checked with (:data:`CHECKED_WITH`), and fails loudly when a new version no
longer has what it relies on: :class:`CompatibilityError` names the internal that moved, never
a silently wrong result. :func:`check_installed` runs every check against the installed
versions (tests/test_compat.py does, so an upgrade of Ray, Optuna or TensorFlow shows at once
which workaround to revisit). Everything else in sweeper uses the libraries' public APIs.

Ray and Optuna are imported inside the functions that need them: :mod:`sweeper.trainer`
imports this module on workers, and :func:`sweeper.load` reads a sweep without Ray.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import inspect
import json
import logging
import os
import pickle
import posixpath
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The versions every workaround below was checked with.
CHECKED_WITH = {"ray": "2.60.0", "optuna": "5.1.0", "tensorflow": "2.21.0", "keras": "3.15.1"}


class CompatibilityError(RuntimeError):
    """A library no longer has an internal that a workaround here relies on."""

    def __init__(self, what: str, workaround: str) -> None:
        super().__init__(f"{what} has changed (checked with {_checked_versions()}); "
                         f"sweeper's workaround of {workaround} needs revisiting in "
                         "sweeper/compat.py")


def _checked_versions() -> str:
    return ", ".join(f"{name} {version}" for name, version in CHECKED_WITH.items())


def _attribute(owner: Any, name: str, workaround: str) -> Any:
    """``owner.name``, or a CompatibilityError naming the workaround that needs it."""
    try:
        return getattr(owner, name)
    except AttributeError:
        owner_name = getattr(owner, "__name__", type(owner).__name__)
        raise CompatibilityError(f"{owner_name}.{name}", workaround) from None


# --- Ray Tune: the actors' runtime env -------------------------------------------------------
# Tune gives every trial actor the runtime env {"env_vars": {"PL_DISABLE_FORK": "1"}} (for
# PyTorch Lightning, Lightning-AI/pytorch-lightning#14292, which sweeper's trials don't use).
# Any runtime env makes Ray start the actor's worker through its setup_worker.py shim: one more
# Python process per trial worker that imports Ray only to exec the real one, CPU taken from
# the workers starting beside it (benchmarks/utilization.py, with and without). Tune has no public
# setting for it; no upstream issue found. Ray 2.60.
_TUNE_ENV_WORKAROUND = "Tune's PL_DISABLE_FORK runtime env for trial actors"


@contextlib.contextmanager
def tune_actor_env_cleared() -> Iterator[None]:
    """While it runs, Tune starts trial actors without its default runtime env."""
    from ray.tune.execution import class_cache

    defaults = _attribute(class_cache, "DEFAULT_ENV_VARS", _TUNE_ENV_WORKAROUND)
    if not isinstance(defaults, dict):
        raise CompatibilityError("ray.tune.execution.class_cache.DEFAULT_ENV_VARS",
                                 _TUNE_ENV_WORKAROUND)
    saved = dict(defaults)
    defaults.clear()
    try:
        yield
    finally:
        defaults.update(saved)


# --- Ray Tune: the scheduler's state across a restore ----------------------------------------
# ray-project/ray#30838 (open): Tuner.restore restores the scheduler as it was pickled when the
# experiment started, so ASHA's rungs would come back empty. Its state rides along with a
# callback's (which Tune does save), through ASHA's public save/restore. Ray 2.60.

def scheduler_state(scheduler: Any) -> bytes | None:
    """The scheduler's state as bytes (its public ``save``), or None for one without state."""
    from ray.tune.schedulers import AsyncHyperBandScheduler

    if not isinstance(scheduler, AsyncHyperBandScheduler):
        return None  # FIFO: nothing to keep
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scheduler.pkl"
        scheduler.save(str(path))
        return path.read_bytes()


def restore_scheduler_state(scheduler: Any, state: bytes | None) -> None:
    """Put a :func:`scheduler_state` back (its public ``restore``)."""
    if state is None:
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scheduler.pkl"
        path.write_bytes(state)
        scheduler.restore(str(path))


# --- Ray Tune: ASHA's internals read by sweeper's scheduler ----------------------------------
# sweeper.scheduler.EarlierEpochsASHA stops trials Ray's ASHA would continue, and records what
# ASHA compared with. Ray's ASHA keeps its count of stopped trials and its rungs private (one
# bracket: ``_brackets[0]._rungs``, [(milestone, {trial id: signed value})]). No upstream issue
# asks for a public view; Ray 2.60.
_ASHA_WORKAROUND = "ASHA's rung records (sweeper.scheduler)"


def count_stopped(scheduler: Any) -> None:
    """Count one more stopped trial in Ray's ASHA, as its own stop would."""
    scheduler._num_stopped = _attribute(scheduler, "_num_stopped", _ASHA_WORKAROUND) + 1


def asha_rungs(scheduler: Any) -> tuple[Any, list[tuple[int, dict[str, float]]]]:
    """ASHA's one bracket and its rungs: ``[(milestone, {trial id: signed value})]``."""
    bracket = _attribute(scheduler, "_brackets", _ASHA_WORKAROUND)[0]
    rungs = _attribute(bracket, "_rungs", _ASHA_WORKAROUND)
    _attribute(bracket, "cutoff", _ASHA_WORKAROUND)
    return bracket, rungs


# --- Ray Tune: trials that failed for good, in the saved experiment state --------------------
# Ray Tune does not save the status of a trial whose worker process died: the trial is detached
# from its actor before the failure is handled, and only attached trials are queued for the
# state snapshot, so the saved state keeps it RUNNING and a resume runs it again whatever
# resume_errored says. No upstream issue found (ray-project/ray#16891 is the closest, closed);
# seen in Ray 2.60. sweeper.tuner.FailedTrialsSaved records such trials in Tune's own JSON
# format and writes them into the newest experiment_state-*.json.
_FAILED_WORKAROUND = "failed trials' status in Tune's saved experiment state"
EXPERIMENT_STATE_GLOB = "experiment_state-*.json"


def trial_experiment_folder(trial: Any) -> Path:
    """Where Tune saves the experiment a trial belongs to (its StorageContext)."""
    storage = _attribute(trial, "storage", _FAILED_WORKAROUND)
    return Path(_attribute(storage, "experiment_fs_path", _FAILED_WORKAROUND))


def stored_locally(trial: Any) -> bool:
    """Whether the trial's experiment folder is on this machine's file system."""
    from pyarrow.fs import LocalFileSystem

    storage = _attribute(trial, "storage", _FAILED_WORKAROUND)
    return isinstance(_attribute(storage, "storage_filesystem", _FAILED_WORKAROUND),
                      LocalFileSystem)


def trial_json_state(trial: Any) -> list[str]:
    """The trial as Tune saves it in the experiment state: [trial JSON, runtime metadata]."""
    return list(_attribute(trial, "get_json_state", _FAILED_WORKAROUND)())


def trial_error_files(trial: Any) -> list[tuple[Path, Path]]:
    """(where Tune wrote the trial's error, the trial's folder copy) for each error file."""
    metadata = _attribute(trial, "run_metadata", _FAILED_WORKAROUND)
    names = (_attribute(metadata, "error_filename", _FAILED_WORKAROUND),
             _attribute(metadata, "pickled_error_filename", _FAILED_WORKAROUND))
    return [(Path(trial.local_path, name), Path(trial.path, name)) for name in names if name]


def trial_failures(trial: Any) -> int:
    """How many times the trial has failed so far (Tune counts them to decide on a retry)."""
    metadata = _attribute(trial, "run_metadata", _FAILED_WORKAROUND)
    return int(_attribute(metadata, "num_failures", _FAILED_WORKAROUND))


def trial_error_file(trial: Any) -> str | None:
    """The name of the file Tune wrote the trial's last error to (None: none yet)."""
    metadata = _attribute(trial, "run_metadata", _FAILED_WORKAROUND)
    return _attribute(metadata, "error_filename", _FAILED_WORKAROUND)


def newest_experiment_state(trials_dir: Path) -> Path | None:
    """The saved experiment state that Tune restores from ``trials_dir`` (None if none): the
    newest, whose name ends in the time it was written."""
    states = sorted(Path(trials_dir).glob(EXPERIMENT_STATE_GLOB))
    return states[-1] if states else None


def saved_trial_numbers(trials_dir: Path) -> dict[str, int]:
    """Trial id -> creation number (:func:`trial_creation_number`) read, without Ray, from the
    newest experiment state Tune saved in ``trials_dir``: its ``trial_data`` holds a JSON text
    per trial with the trial's ``experiment_tag`` (Ray 2.60). Empty where there is none or it
    cannot be read (a driver killed while writing it)."""
    saved_state = newest_experiment_state(trials_dir)
    try:
        state = json.loads(saved_state.read_text()) if saved_state else {}
        trials = [json.loads(trial_json) for trial_json, _ in state.get("trial_data", [])]
    except (OSError, ValueError, TypeError):
        return {}
    return {trial["trial_id"]: number for trial in trials
            if isinstance(trial, dict) and "trial_id" in trial
            and (number := _tag_number(trial.get("experiment_tag"))) is not None}


def _tag_number(tag: object) -> int | None:
    head = str(tag or "").split("_", 1)[0]
    return int(head) if head.isdigit() else None


def put_into_saved_state(trials_dir: Path, failed: dict[str, list[str]]) -> None:
    """Replace the saved entries of ``failed`` trials (id -> :func:`trial_json_state`) whose
    status differs, in the newest experiment state."""
    import json

    from sweeper.layout import write_json

    saved_state = newest_experiment_state(trials_dir)
    if saved_state is None:
        logger.debug("No experiment state in %s to record failed trials in", trials_dir)
        return
    state = json.loads(saved_state.read_text())
    if "trial_data" not in state:
        raise CompatibilityError(f"Tune's experiment state ({saved_state.name})",
                                 _FAILED_WORKAROUND)
    changed = False
    for index, (trial_json, _) in enumerate(state["trial_data"]):
        saved = json.loads(trial_json)
        entry = failed.get(saved["trial_id"])
        if entry is not None and saved["status"] != json.loads(entry[0])["status"]:
            state["trial_data"][index] = entry
            changed = True
    if changed:
        write_json(saved_state, state)
        logger.debug("Recorded failed trials in %s", saved_state)


# --- Ray Train: a stopped trial's stop event -------------------------------------------------
# A trainable's thread learns that Tune stopped its trial only at its next report; a reused
# worker then waits TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s) for it before failing the next trial.
# The session's stop event, checked per training batch, ends it at once. Private in Ray Train
# (ray.train._internal.session); no upstream issue found. Ray 2.60.
_STOP_WORKAROUND = "the per-batch stop check of a stopped trial (sweeper.trial)"


def trial_stop_check() -> Callable[[], bool] | None:
    """A cheap ``() -> bool``: whether Tune has stopped the trial running in this thread
    (None outside a trial)."""
    from ray.train._internal import session

    current = _attribute(session, "get_session", _STOP_WORKAROUND)()
    if current is None:
        return None
    return _attribute(current, "stop_event", _STOP_WORKAROUND).is_set


# --- Ray core ---------------------------------------------------------------------------------
# How many GPUs an in-process Ray would find: Ray's own detection (CUDA_VISIBLE_DEVICES, the
# driver's devices), public only once Ray runs; validation runs before Ray starts, to refuse
# resources.gpu_per_trial a machine cannot give. No upstream issue found; Ray 2.60.
_GPU_WORKAROUND = "counting GPUs before Ray starts (sweeper.tuner.local_capacity)"


def local_gpu_count() -> int:
    """GPUs Ray would detect on this machine for an in-process Ray."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource
    except ImportError:
        raise CompatibilityError("ray._private.accelerators", _GPU_WORKAROUND) from None
    manager = get_accelerator_manager_for_resource("GPU")
    visible = manager.get_current_process_visible_accelerator_ids()
    detected = manager.get_current_node_num_accelerators()
    return min(detected, len(visible)) if visible is not None else detected


# Ray starts an idle worker per CPU as the first driver connects; sweeper's trial actors gain
# nothing from them, and their start takes CPU from the trials' own (benchmarks/utilization.py
# splits where a worker's start goes; ray-project/ray#40131 discusses the default). ray.init's
# _system_config is Ray's only way to turn it off for an in-process Ray. Ray 2.60.
LOCAL_RAY_SYSTEM_CONFIG = {"prestart_worker_first_driver": False}


def init_local_ray(**kwargs: Any) -> None:
    """``ray.init(address="local", ...)`` without idle workers prestarted for the driver."""
    import ray

    ray.init(address="local", _system_config=LOCAL_RAY_SYSTEM_CONFIG, **kwargs)


# ray.init imports Ray's CLI logger, which calls colorama.init(strip=False) (Ray 2.60,
# ray/autoscaler/_private/cli_logger.py, with the colorama 0.4.6 Ray bundles); colorama then
# writes ESC[0m to a terminal's stdout at exit, a stray code after the last line of every run
# (ray-project/ray#17979). Nothing of sweeper's is coloured, so that reset has nothing to undo.
def drop_colorama_reset_at_exit() -> None:
    """Unregister colorama's exit handler, where Ray's import registered one."""
    import atexit
    import sys

    initialise = sys.modules.get("colorama.initialise")
    if initialise is not None and callable(getattr(initialise, "reset_all", None)):
        atexit.unregister(initialise.reset_all)


# --- Keras applications: where Keras caches a backbone's ImageNet weights --------------------
# keras.applications downloads a backbone's ImageNet weights with keras.utils.get_file into
# <KERAS_HOME or ~/.keras>/models/<file name>, the file names built inside each family's module
# (no public accessor; no upstream issue found). sweeper.backbone loads that very file when it
# is there (so an offline machine with the file in its cache, or a test that put it there,
# needs no network), and lets keras.applications download it when it is not. Keras 3.15.
IMAGENET_NO_TOP_FILES = {
    "MobileNetV3Small": ("mobilenet_v3", "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
    "MobileNetV3Large": ("mobilenet_v3", "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
    "EfficientNetV2B0": ("efficientnet_v2", "efficientnetv2-b0_notop.h5"),
    "ResNet50V2": ("resnet", "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
}
# How each family's module spells the file name it asks get_file for (checked by check_installed).
_IMAGENET_NAME_PATTERNS = {
    "mobilenet_v3": 'f"weights_mobilenet_v3_{model_name}_no_top_v2.h5"',
    "efficientnet_v2": 'file_suffix = "_notop.h5"',
    "resnet": 'f"{weights_name}_weights_tf_dim_ordering_tf_kernels_notop.h5"',
}


def imagenet_weights_file(backbone: str) -> Path:
    """Where ``keras.applications.<backbone>(include_top=False, weights="imagenet")`` caches
    its weights file (it may not be there yet): ``$KERAS_HOME/models/`` (``~/.keras/models/``
    by default), as Keras' get_file uses it.

    Raises:
        KeyError: a backbone without an entry in :data:`IMAGENET_NO_TOP_FILES`.
    """
    from keras.src.backend import config

    keras_home = _attribute(config, "keras_home", "the ImageNet weights' cache path")()
    return Path(keras_home).expanduser() / "models" / IMAGENET_NO_TOP_FILES[backbone][1]


def _imagenet_file_names_known() -> bool:
    for module_name, pattern in _IMAGENET_NAME_PATTERNS.items():
        module = __import__(f"keras.src.applications.{module_name}", fromlist=["_"])
        if pattern not in inspect.getsource(module) or 'cache_subdir="models"' not in (
                inspect.getsource(module)):
            return False
    return True


# --- Optuna through Ray's OptunaSearch --------------------------------------------------------
# sweeper.searcher.PruningOptunaSearch tells Optuna what Ray's OptunaSearch does not (early-
# stopped trials as PRUNED, every epoch as an intermediate value; ray-project/ray#15283 set
# the states Ray tells, not these) and finds its trials in the storage after a restore. It
# reads OptunaSearch's study and trial maps (``_ot_study``, ``_ot_trials``,
# ``_completed_trials``), which Ray keeps private; re-attaches a running Optuna trial by
# constructing ``optuna.Trial(study, trial_id)``, and reads a trial from the study's storage by
# its id (Optuna's public get_trials reads every trial). Ray 2.60, Optuna 5.0.
_SEARCH_WORKAROUND = "OptunaSearch's study and trials (sweeper.searcher)"


def searcher_study(searcher: Any):
    """The Optuna study of a Ray OptunaSearch."""
    return _attribute(searcher, "_ot_study", _SEARCH_WORKAROUND)


def searcher_trials(searcher: Any) -> dict:
    """A Ray OptunaSearch's live map: Tune trial id -> optuna.Trial."""
    return _attribute(searcher, "_ot_trials", _SEARCH_WORKAROUND)


def searcher_completed(searcher: Any) -> set:
    """The Tune trial ids a Ray OptunaSearch has been told are complete."""
    return _attribute(searcher, "_completed_trials", _SEARCH_WORKAROUND)


def running_trial(study: Any, frozen: Any):
    """An ``optuna.Trial`` to report to and tell, for a RUNNING trial read from storage."""
    import optuna

    return optuna.Trial(study, _attribute(frozen, "_trial_id", _SEARCH_WORKAROUND))


def study_storage(study: Any):
    """The storage an Optuna study reads and writes (Optuna keeps it private)."""
    return _attribute(study, "_storage", _SEARCH_WORKAROUND)


def storage_id(trial: Any) -> int:
    """A trial's id in its study's storage (``optuna.Trial`` and FrozenTrial keep it private;
    the public ``number`` counts within the study, the storage's methods take this id)."""
    return _attribute(trial, "_trial_id", _SEARCH_WORKAROUND)


def stored_trial(study: Any, trial: Any):
    """The FrozenTrial the study's storage holds for ``trial`` (one read, by id)."""
    return study_storage(study).get_trial(storage_id(trial))


def check_installed() -> list[str]:
    """Run every check above against the installed Ray, Optuna and TensorFlow.

    Returns:
        One line per internal that has changed (empty: every workaround still fits).
    """
    problems: list[str] = []

    def check(what: str, ok: Callable[[], Any]) -> None:
        try:
            if ok() is False:
                problems.append(f"{what}: not as checked with {_checked_versions()}")
        except Exception as error:  # any failure means the internal moved
            problems.append(f"{what}: {type(error).__name__}: {error}")

    def tune_env() -> bool:
        with tune_actor_env_cleared():
            from ray.tune.execution import class_cache

            return class_cache.DEFAULT_ENV_VARS == {}

    def asha() -> bool:
        from ray.tune.schedulers import AsyncHyperBandScheduler

        scheduler = AsyncHyperBandScheduler(metric="m", mode="max", max_t=4, grace_period=1)
        count_stopped(scheduler)
        bracket, rungs = asha_rungs(scheduler)
        state = scheduler_state(scheduler)
        fresh = AsyncHyperBandScheduler(metric="m", mode="max", max_t=4, grace_period=1)
        restore_scheduler_state(fresh, state)
        return (fresh._num_stopped == 1 and [m for m, _ in rungs] == [4, 1]
                and isinstance(pickle.loads(state), dict))

    def trial_internals() -> bool:
        from ray.train._internal.storage import StorageContext
        from ray.tune.experiment import Trial
        from ray.tune.experiment.trial import _TrainingRunMetadata

        metadata = inspect.getsource(_TrainingRunMetadata)
        storage = inspect.getsource(StorageContext)
        return (all(hasattr(Trial, name) for name in ("get_json_state", "local_path", "path"))
                and "self.run_metadata" in inspect.getsource(Trial.__init__)
                and "error_filename" in metadata and "pickled_error_filename" in metadata
                and "experiment_fs_path" in storage and "storage_filesystem" in storage)

    def experiment_state() -> bool:
        from ray.tune.execution import tune_controller

        source = inspect.getsource(tune_controller)
        return "trial_data" in source and "experiment_state-" in source

    def stop_event() -> bool:
        from ray.train._internal import session

        return (callable(session.get_session)
                and "self.stop_event = threading.Event()" in inspect.getsource(session))

    def optuna_search() -> bool:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        searcher = OptunaSearch(space={"x": optuna.distributions.FloatDistribution(0, 1)},
                                metric="m", mode="max")
        searcher.suggest("t1")
        study, trials = searcher_study(searcher), searcher_trials(searcher)
        frozen = study.get_trials(deepcopy=False)[0]
        again = running_trial(study, frozen)
        again.report(0.5, 1)
        return (isinstance(searcher_completed(searcher), set) and set(trials) == {"t1"}
                and stored_trial(study, again).intermediate_values == {1: 0.5})

    check("Tune's trial actor env (class_cache.DEFAULT_ENV_VARS)", tune_env)
    check("ASHA's stopped count, rungs and save/restore", asha)
    check("Tune's Trial and StorageContext attributes", trial_internals)
    check("Tune's experiment_state-*.json layout", experiment_state)
    check("Ray Train's session stop_event", stop_event)
    check("Ray's GPU detection (ray._private.accelerators)", local_gpu_count)
    check("Ray's _system_config prestart_worker_first_driver", _system_config_known)
    check("OptunaSearch's _ot_study/_ot_trials/_completed_trials and optuna.Trial", optuna_search)
    check("TensorFlow's gradient registry", lambda: _gradient_registry() is not None)
    check("Keras' Optimizer._learning_rate (the schedule it was given)", _schedule_reachable)
    check("Keras' global SeedGenerator", _global_seed_generator_known)
    check("ResultGrid._experiment_analysis.trials and Tune's experiment tags", _result_grid)
    check("Tune's experiment-state saving (snapshots_on_a_timer)", _snapshot_internals)
    check("Optuna's table of intermediate values (add_intermediate_values)", _study_table)
    check("Optuna's journal storage (add_intermediate_values)", _study_journal)
    check("Optuna's TPESampler._sample and Study._get_trials (WindowedTPESampler)",
          lambda: callable(getattr(__import__("optuna").samplers.TPESampler, "_sample", None))
          and callable(getattr(__import__("optuna").Study, "_get_trials", None)))
    check("keras.applications' ImageNet weight file names and cache (sweeper.backbone)",
          _imagenet_file_names_known)
    check("Tune's Ctrl-C handler (search.time_budget_s ends a run through it)",
          lambda: "def signal_interrupt_tune_run" in inspect.getsource(
              __import__("ray.tune.tune", fromlist=["tune"])))
    return problems


def _schedule_reachable() -> bool:
    """An optimizer's schedule is what learning_rate_of returns."""
    import keras

    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    return learning_rate_of(keras.optimizers.Adam(schedule)) is schedule


def _snapshot_internals() -> bool:
    """What snapshots_on_a_timer replaces is still there (it warns and does nothing if not)."""
    import importlib

    checkpoints = importlib.import_module(_RAY_CHECKPOINT_MANAGER)
    manager = getattr(importlib.import_module(_RAY_EXPERIMENT_STATE),
                      "_ExperimentCheckpointManager", None)
    syncer = getattr(importlib.import_module(_RAY_STORAGE), "_FilesystemSyncer", None)
    return (callable(getattr(checkpoints, "_delete_fs_path", None))
            and callable(getattr(manager, "on_trial_checkpoint", None))
            and callable(getattr(manager, "sync_up_experiment_state", None))
            and callable(getattr(syncer, "_sync_up_command", None)))


def _study_table() -> bool:
    """Optuna's intermediate-value table has the columns add_intermediate_values writes."""
    from optuna.storages._rdb import models

    table = models.TrialIntermediateValueModel.__table__
    return set(table.columns.keys()) >= _INTERMEDIATE_COLUMNS


def _study_journal() -> bool:
    """A batch written into a journal file reads back, in a storage that replays the file
    anew, as the same values written one at a time by Optuna itself."""
    import tempfile

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "optuna.log")
        storage = JournalStorage(JournalFileBackend(path))
        study = optuna.create_study(storage=storage, study_name="check")
        batched, single = study.ask(), study.ask()
        if not _journal_batch(storage, [(storage_id(batched), 1, 0.5),
                                        (storage_id(batched), 2, 0.75)]):
            return False
        single.report(0.5, 1)
        single.report(0.75, 2)
        again = JournalStorage(JournalFileBackend(path))
        read = [again.get_trial(storage_id(trial)).intermediate_values
                for trial in (batched, single)]
        return read[0] == read[1] == {1: 0.5, 2: 0.75}


def _result_grid() -> bool:
    """A ResultGrid still reaches its trials, whose experiment tags start with their number."""
    import inspect

    from ray.tune import ResultGrid
    from ray.tune.search import search_generator

    return ("_experiment_analysis" in inspect.getsource(ResultGrid.__init__)
            and "experiment_tag" in inspect.getsource(search_generator.SearchGenerator))


def _system_config_known() -> bool:
    """Whether Ray's C++ core (``_raylet``, where RayConfig lives) still has every key of
    :data:`LOCAL_RAY_SYSTEM_CONFIG` (ray.init would refuse an unknown one)."""
    import mmap

    import ray

    for library in Path(ray.__file__).parent.glob("_raylet*.so"):
        with library.open("rb") as stream, mmap.mmap(stream.fileno(), 0,
                                                     access=mmap.ACCESS_READ) as content:
            return all(content.find(key.encode()) >= 0 for key in LOCAL_RAY_SYSTEM_CONFIG)
    return False

def _global_seed_generator_known() -> bool:
    return keras_global_seed_generator() is keras_global_seed_generator()


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


# Keras optimizers give a schedule's current value (optimizer.learning_rate) but not the
# LearningRateSchedule object they were built with; TensorFlow 2.11's release notes name
# optimizer._learning_rate for it ("If you need to access the LearningRateSchedule object"),
# and no public accessor has come since. sweeper.model's EpochSchedule is told the batches per
# epoch through it when a fit begins, and the export replaces it. Checked with Keras 3.15.1.
def learning_rate_of(optimizer: Any) -> Any:
    """The float variable or LearningRateSchedule an optimizer was given as its learning rate
    (of the optimizer itself: unwrap a LossScaleOptimizer first)."""
    return _attribute(optimizer, "_learning_rate", "reading an optimizer's learning-rate "
                      "schedule (sweeper.model.epoch_schedule)")


# Keras' process-wide SeedGenerator, which every keras.random call with seed=None draws from
# (keras.random.dropout(x, rate) in a user's layer, say), has no public handle: Keras 3.15.1
# keeps it in keras.src.backend.common.global_state under "global_seed_generator" and makes
# it lazily (keras.src.random.seed_generator.global_seed_generator); set_random_seed drops it.
# A traced training step holds the generator it found when it was traced, so a reused model
# (sweeper.trainer.WarmModel) must restart that one. No upstream issue found; checked with
# Keras 3.15.1.
def keras_global_seed_generator():
    """Keras' global ``SeedGenerator``, made now if no random op has made it yet.

    Raises:
        CompatibilityError: Keras no longer keeps it where 3.15 did.
    """
    from keras.src.random import seed_generator

    make = getattr(seed_generator, "global_seed_generator", None)
    generator = make() if callable(make) else None
    if not isinstance(generator, seed_generator.SeedGenerator):
        raise CompatibilityError("keras.src.random.seed_generator.global_seed_generator",
                                 "restarting the random numbers of a reused model")
    return generator


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
    # port.cc, on CPUs where TensorFlow turns oneDNN on by default: printed on the Intel Xeon
    # test machine (AVX-512 VNNI and BF16), not on the AMD EPYC one.
    "oneDNN custom operations are on",
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
_RAY_STORAGE = "ray.train._internal.storage"


# Tune uploads the driver's staging folder (the trial folders' result.json and progress.csv,
# and at its top the experiment state, searcher and scheduler states) to the sweep folder in
# one background copy, in no set order: a driver killed during the copy can leave an
# experiment state in the sweep folder that names results its trial folders do not hold yet
# (Ray warns of "consistency issues upon restoration" only when a copy is slow). A resume then
# found a trial that had trained all 3 epochs TERMINATED with 2 rows, counted it unfinished and
# never ended the sweep (CI, test_killed_driver_resumes_with_searcher_and_asha_history). Here
# the trial folders are copied first and the top-level state files after them, the
# experiment state last, so a state in the sweep folder names only results already there.
# Tune writes each state file under a temporary name and renames it (Searcher.save_to_dir and
# ray.tune.utils.util._atomic_save: ".{uuid}-tmp-{name}"); a copy that lists one and then
# finds it renamed away fails with FileNotFoundError (seen with Tune's own unordered copy in
# benchmarks/scaling.py's "before" driver), so those names are never copied: the file under
# its final name is, by this sync or the next.
_TUNE_TEMPORARY_FILES = (".*-tmp-*", "*/.*-tmp-*")


def _state_files_last(upload):
    """Ray's upload function ``upload(local_path, fs, fs_path, exclude)``, made to copy a
    folder's subfolders first and the files at its top afterwards (``experiment_state-*``
    last), leaving out Tune's temporary files (``.{uuid}-tmp-{name}``)."""
    def upload_state_last(local_path, fs, fs_path, exclude=None):
        if not os.path.isdir(local_path):
            return upload(local_path=local_path, fs=fs, fs_path=fs_path, exclude=exclude)
        exclude = [*(exclude or []), *_TUNE_TEMPORARY_FILES]
        top = sorted((entry.name for entry in os.scandir(local_path) if entry.is_file()
                      and not any(fnmatch.fnmatch(entry.name, pattern) for pattern in exclude)),
                     key=lambda name: (name.startswith("experiment_state"), name))
        excluded = [*exclude, *(glob.escape(name) for name in top)]
        upload(local_path=local_path, fs=fs, fs_path=fs_path, exclude=excluded)
        for name in top:
            upload(local_path=os.path.join(local_path, name), fs=fs,
                   fs_path=posixpath.join(fs_path, name))

    return upload_state_last


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
    syncer = getattr(importlib.import_module(_RAY_STORAGE), "_FilesystemSyncer", None)
    sync_up_command = getattr(syncer, "_sync_up_command", None)
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

    def ordered_sync_up_command(self, local_path, uri, exclude=None):
        function, kwargs = sync_up_command(self, local_path, uri, exclude)
        return _state_files_last(function), kwargs

    checkpoints._delete_fs_path = defer_delete
    manager.on_trial_checkpoint = lambda self, trial: None
    manager.sync_up_experiment_state = save_then_delete
    if callable(sync_up_command):
        syncer._sync_up_command = ordered_sync_up_command
    else:
        logger.warning("Ray Tune's storage syncer has changed (checked with Ray 2.60): the "
                       "experiment state may reach the sweep folder before the results it names")
    try:
        yield
    finally:
        checkpoints._delete_fs_path = delete
        manager.on_trial_checkpoint = on_trial_checkpoint
        manager.sync_up_experiment_state = sync_up
        if callable(sync_up_command):
            syncer._sync_up_command = sync_up_command


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


# Optuna writes an intermediate value as one transaction of its own, and has no batch API for
# them (optuna/optuna#3478 and #3048: slow reports and storage writes). On the RDB storage that
# is an ORM transaction (look up the trial, check its state, look up the step, insert, commit):
# 2.3-3.5 ms of CPU each on the 2-core test machine (SQLite, Optuna 5.0), more than the whole
# budget of a result. On the journal storage it is one locked, fsynced append and a replay.
# The searcher buffers a second of values and adds them here at once: on an RDB storage in one
# INSERT of Optuna's own table, on a journal in one append of the very entries Optuna's
# set_trial_intermediate_value writes (both checked with Optuna 5.0: the table's columns, the
# journal's operation code and its storage's lock, backend and replay). Any other storage, or
# a changed one, is written the ordinary way, one value at a time.
_INTERMEDIATE_COLUMNS = {"trial_id", "step", "intermediate_value", "intermediate_value_type"}
_JOURNAL_PARTS = ("_thread_lock", "_backend", "_replay_result", "_sync_with_backend")
_warned_study_changed = False


def add_intermediate_values(storage, values: list[tuple[int, int, float]]) -> None:
    """Write finite intermediate values ``(Optuna trial id, step, value)`` of running trials,
    steps not yet in the study, at once where ``storage`` is Optuna's RDB storage (or its
    cache in front of one) or its journal storage (there, values of a trial that something
    else, optuna-dashboard say, finished meanwhile are dropped, as Optuna's replay drops any
    other process's entries it cannot apply)."""
    from optuna.storages import JournalStorage, RDBStorage

    if isinstance(storage, JournalStorage):
        if _journal_batch(storage, values):
            return
    else:
        backend = getattr(storage, "_backend", storage)
        if isinstance(backend, RDBStorage) and _rdb_batch(backend, values):
            return
    for trial_id, step, value in values:
        storage.set_trial_intermediate_value(trial_id, step, value)


def _warn_study_changed(what: str) -> None:
    global _warned_study_changed
    if not _warned_study_changed:
        logger.warning("Optuna's %s has changed (checked with Optuna 5.0); each epoch is written "
                       "to the study on its own", what)
        _warned_study_changed = True


def _rdb_batch(backend, values: list[tuple[int, int, float]]) -> bool:
    from optuna.storages._rdb import models

    model = getattr(models, "TrialIntermediateValueModel", None)
    table = getattr(model, "__table__", None)
    if table is None or not set(table.columns.keys()) >= _INTERMEDIATE_COLUMNS:
        _warn_study_changed("table of intermediate values")
        return False
    finite = model.TrialIntermediateValueType.FINITE
    with backend.engine.begin() as connection:
        connection.execute(table.insert(), [
            {"trial_id": trial_id, "step": step, "intermediate_value": value,
             "intermediate_value_type": finite} for trial_id, step, value in values])
    return True


# Ray's OptunaSearch pickles the whole searcher, the study's storage included, at every save of
# the experiment state (OptunaSearch.save: its __dict__). Optuna's JournalFileBackend keeps an
# index of line offsets (_log_number_offset, Optuna 5.0: an entry per line read, never pruned)
# that it pickles too, so each save grew with the study; a restored storage replays the file
# from its start anyway. JournalFile pickles without it (anything else pickles as it was).
def _journal_file_class() -> type:
    from optuna.storages.journal import JournalFileBackend

    class JournalFile(JournalFileBackend):
        """Optuna's journal file backend, pickled without its index of line offsets."""

        def __getstate__(self) -> dict:
            state = self.__dict__.copy()
            if "_log_number_offset" in state:
                state["_log_number_offset"] = {0: 0}
            return state

    JournalFile.__module__, JournalFile.__qualname__ = __name__, "JournalFile"
    return JournalFile


def journal_file(path: str):
    """Optuna's ``JournalFileBackend`` on ``path`` (created if missing), pickled without its
    index of line offsets (see above)."""
    return __getattr__("JournalFile")(path)


def _journal_operation():
    """Optuna's journal operation code of an intermediate value, None if it moved."""
    try:
        from optuna.storages.journal._storage import JournalOperation
    except ImportError:
        return None
    return getattr(JournalOperation, "SET_TRIAL_INTERMEDIATE_VALUE", None)


def _journal_batch(storage, values: list[tuple[int, int, float]]) -> bool:
    operation = _journal_operation()
    replay = getattr(storage, "_replay_result", None)
    if (operation is None or not all(hasattr(storage, part) for part in _JOURNAL_PARTS)
            or not hasattr(replay, "worker_id") or not isinstance(
                getattr(replay, "_trials", None), dict)):
        _warn_study_changed("journal storage")
        return False
    with storage._thread_lock:
        storage._sync_with_backend()
        trials = storage._replay_result._trials
        # Not this thread's worker id: Optuna's replay raises for an entry of its own worker
        # that it cannot apply (a trial finished by another writer between the sync above
        # and the append), and drops anyone else's.
        worker = f"{storage._replay_result.worker_id}-batch"
        logs = [{"op_code": operation, "worker_id": worker, "trial_id": trial_id,
                 "step": step, "intermediate_value": value}
                for trial_id, step, value in values
                if trial_id in trials and not trials[trial_id].state.is_finished()]
        if logs:
            storage._backend.append_logs(logs)
            storage._sync_with_backend()
    return True


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
    """``WindowedTPESampler`` and ``JournalFile`` are made on first use (and found by pickle
    when Tune restores the searcher): the trial workers import this module and need no
    Optuna."""
    makers = {"WindowedTPESampler": _windowed_tpe_class, "JournalFile": _journal_file_class}
    if name in makers:
        # Made once: the factories below call this directly, and a second class of the same
        # name would make pickling the first one's objects fail ("not the same object").
        if name not in globals():
            globals()[name] = makers[name]()
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
    return _tag_number(getattr(trial, "experiment_tag", None))


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
        raise CompatibilityError("ray.tune.ResultGrid._experiment_analysis.trials",
                                 "trial numbers read back from a ResultGrid")
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


def tune_stop_event():
    """The ``threading.Event`` Tune's Ctrl-C handler sets, while that handler is installed
    (None otherwise): ``tune.run`` checks it only between steps of its loop, but a step can
    wait up to 600 s for a new trial (``TuneController._update_trial_queue``), so a searcher
    that knows of the request can end that wait at once. Read from the handler's closure
    (``_setup_signal_catching`` in ray/tune/tune.py, Ray 2.60), as Tune offers no API."""
    import signal
    import threading

    handler = signal.getsignal(signal.SIGINT)
    if getattr(handler, "__name__", "") != "signal_interrupt_tune_run":
        return None
    for cell in getattr(handler, "__closure__", None) or ():
        if isinstance(cell.cell_contents, threading.Event):
            return cell.cell_contents
    logger.warning("Cannot see Ray Tune's stop request (checked with Ray 2.60): a Ctrl-C may "
                   "act only once Tune asks for its next trial")
    return None


class _WithoutMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


# --- Keras: the message of an exception raised inside a layer's call --------------------------
# Keras re-raises an exception from a layer's call as the same type with its message wrapped:
# "Exception encountered when calling <Layer>.call().\n\n\x1b[1m<message>\x1b[0m\n\n
# Arguments received by ...". The trial's one-line reason is the user's own message. Keras'
# traceback_utils.inject_argument_info_in_traceback and, for a call while the model is built,
# Operation.compute_output_spec's "... Error encountered:" (no upstream issue: a display choice).
# Keras 3.15.
KERAS_CALL_CONTEXT = "Exception encountered when calling "
KERAS_BUILD_CONTEXT = "Error encountered:"


def keras_layer_message(message: list[str]) -> str | None:
    """The first line of the user's own message in a message Keras wrapped (its lines after
    the exception type), without Keras' bold; None where Keras did not wrap it."""
    import re

    if not message or not message[0].startswith(KERAS_CALL_CONTEXT):
        return None
    lines = [line for line in (re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
                               for line in message[1:]) if line]
    # A call that failed as Keras built the model is wrapped once more: "Could not
    # automatically infer the output shape ... Error encountered:", then the message.
    while len(lines) > 1 and lines[0].endswith(KERAS_BUILD_CONTEXT):
        lines = lines[1:]
    inner = lines[0] if lines else ""
    return None if inner.startswith("Arguments received by ") else inner
