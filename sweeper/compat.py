"""Workarounds of other libraries' internals, in one place.

Each names the upstream issue it works around and the versions it was checked with, and says
what happens when a new version no longer has what it relies on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

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
