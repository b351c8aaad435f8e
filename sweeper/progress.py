"""What a person sees while a sweep runs, and what ``sweep.log`` keeps.

Every trial event (started with its sampled values, each epoch, each scheduler decision, ended
or failed) is one line on the ``sweeper.events`` logger, with the sweep's running count of
trials done, running and pending and the best value so far. The CLI's logging (Hydra's
``job_logging``: a console handler and ``sweep.log``) shows these lines plainly on the console
and keeps them with timestamps in ``sweep.log``. Ray's, Optuna's and TensorFlow's own output
goes to ``sweep.log`` only, unless ``verbose=2``; ``sweeper.record`` lines (the composed config,
the final summary) go to ``sweep.log`` only.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.result import TIME_THIS_ITER_S, TRAINING_ITERATION

from sweeper import compat
from sweeper.compat import trial_creation_number
from sweeper.metrics import METRIC_NAMES
from sweeper.summary import counted, error_line, value_text

EVENTS_LOGGER = "sweeper.events"
RECORD_LOGGER = "sweeper.record"
events = logging.getLogger(EVENTS_LOGGER)
record = logging.getLogger(RECORD_LOGGER)

QUIET, EVENTS, DETAIL = 0, 1, 2
# Ray Tune's hint to resume with Tuner.restore(...): sweeper resumes by re-running its own
# command, which it prints (logged by ray.tune.tune in Ray 2.60).
_RAY_RESUME_HINT = "Tuner.restore("


def _within(name: str, parent: str) -> bool:
    return name == parent or name.startswith(parent + ".")


class ConsoleFilter(logging.Filter):
    """Which log records reach the console at a ``verbose`` level (sweep.log keeps all).

    0: sweeper's own lines but the per-trial events; 1: sweeper's lines; 2: everything. Other
    libraries' records reach the console below 2 only at ERROR (Ray Tune's, whose trial errors
    sweeper reports in one line of its own, not even then).
    """

    def __init__(self, verbose: int) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, rec: logging.LogRecord) -> bool:
        if self.verbose >= DETAIL:
            return True
        if _within(rec.name, RECORD_LOGGER):
            return False
        if _within(rec.name, "sweeper"):
            return self.verbose >= EVENTS or not _within(rec.name, EVENTS_LOGGER)
        return rec.levelno >= logging.ERROR and not _within(rec.name, "ray.tune")


class ConsoleFormatter(logging.Formatter):
    """A plain line; warnings and errors say so."""

    def format(self, rec: logging.LogRecord) -> str:
        message = super().format(rec)
        if rec.levelno >= logging.WARNING:
            return f"{rec.levelname.lower()}: {message}"
        return message


class _WithoutRayResumeHint(logging.Filter):
    def filter(self, rec: logging.LogRecord) -> bool:
        return _RAY_RESUME_HINT not in rec.getMessage()


def configure_output(verbose: int) -> None:
    """Set the console up for ``verbose`` under the handlers Hydra configured.

    Ray's and Optuna's loggers, which print to stderr with handlers of their own, are sent
    through the root logger instead, so that sweep.log records them and the console shows
    them only at ``verbose=2``.
    """
    import optuna

    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler):
            handler.addFilter(ConsoleFilter(verbose))
            handler.setFormatter(ConsoleFormatter("%(message)s"))
    ray_logger = logging.getLogger("ray")
    for handler in list(ray_logger.handlers):
        ray_logger.removeHandler(handler)
    ray_logger.propagate = True
    logging.getLogger("ray.tune.tune").addFilter(_WithoutRayResumeHint())
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


@contextlib.contextmanager
def console_for_api(verbose: int | None) -> Iterator[None]:
    """While :func:`sweeper.run` runs in a notebook or script: the CLI's console lines on
    stdout (``verbose`` as the CLI's), and Ray's and Optuna's own lines held back below
    ``verbose=2`` as there, where the program configured no logging of its own. A program
    whose root logger has handlers decides itself (sweeper's lines are ``sweeper.events``
    and ``sweeper.record``); so does ``verbose=None``."""
    import optuna

    root = logging.getLogger()
    if verbose is None or root.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(ConsoleFilter(verbose))
    handler.setFormatter(ConsoleFormatter("%(message)s"))
    ray_logger = logging.getLogger("ray")
    ray_handlers, ray_propagate = list(ray_logger.handlers), ray_logger.propagate
    level, resume_hint = root.level, _WithoutRayResumeHint()
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO))
    for ray_handler in ray_handlers:
        ray_logger.removeHandler(ray_handler)
    ray_logger.propagate = True
    logging.getLogger("ray.tune.tune").addFilter(resume_hint)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    try:
        yield
    finally:
        optuna.logging.disable_propagation()
        optuna.logging.enable_default_handler()
        logging.getLogger("ray.tune.tune").removeFilter(resume_hint)
        ray_logger.propagate = ray_propagate
        for ray_handler in ray_handlers:
            ray_logger.addHandler(ray_handler)
        root.setLevel(level)
        root.removeHandler(handler)


def short_values(params: dict[str, Any]) -> str:
    """``lr=0.00123 batch_size=64 dropout=0.0``: each sampled setting by its last name, floats
    in 3 digits and shown as floats (:func:`sweeper.summary.value_text`)."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value_text(value, 3)}"
                    for key, value in params.items())


def trial_number(trials: list[Trial], trial: Trial) -> int:
    """A trial's number in its sweep, from 1, in the order Tune created the trials (kept on
    resume): the number the console, sweep.log, TensorBoard and summary.json use."""
    number = trial_creation_number(trial)
    return trials.index(trial) + 1 if number is None else number


class TrialEvents(Callback):
    """One log line per trial event on the driver, with the sweep's running count.

    Args:
        metric: The searched metric (e.g. ``val_accuracy``).
        mode: ``max`` or ``min``.
        num_trials: Trials the sweep runs in all (for the pending count).
        scheduler: The sweep's scheduler; its ``decisions`` (see
            :class:`sweeper.scheduler.EarlierEpochsASHA`) are reported as they are taken.
    """

    def __init__(self, metric: str, mode: str, num_trials: int, scheduler: Any) -> None:
        self.metric, self.mode, self.num_trials = metric, mode, num_trials
        self.scheduler = scheduler
        self._decisions_seen = 0
        self._best: tuple[float, int] | None = None  # value, trial number
        self._restored_seen = False
        self._started_at: dict[str, float] = {}
        self._retrying: set[str] = set()  # trials that failed and wait for their retry

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than

    def _remember_restored(self, trials: list[Trial]) -> None:
        """On a resumed sweep, the best value the trials Tune restored had reached (their
        metric history comes back with them), so the first line shows the sweep's best so far
        and not only the resumed run's. Done once, at the first event; a new sweep has no
        results then."""
        if self._restored_seen:
            return
        self._restored_seen = True
        reached = []
        for trial in trials:
            value = (trial.metric_analysis.get(self.metric) or {}).get(self.mode)
            if value is not None:
                reached.append((trial_number(trials, trial), float(value)))
        for number, value in sorted(reached):  # a tie goes to the earlier trial
            if self._best is None or self._better(value, self._best[0]):
                self._best = (value, number)

    def _status(self, trials: list[Trial], ended: Trial | None = None) -> str:
        self._remember_restored(trials)
        done = sum(trial.status in (Trial.TERMINATED, Trial.ERROR) or trial is ended
                   for trial in trials)
        running = sum(trial.status == Trial.RUNNING and trial is not ended for trial in trials)
        pending = max(self.num_trials - done - running, 0)
        best = (f"; best {self.metric} {self._best[0]:.4f} (trial {self._best[1]})"
                if self._best else "")
        return f"[{done} done, {running} running, {pending} pending{best}]"

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._started_at[trial.trial_id] = time.time()
        checkpoint = trial.latest_checkpoint_result  # set when Tune restores the trial
        epoch = None if checkpoint is None else checkpoint.metrics.get("epoch")
        if trial.trial_id in self._retrying:  # failed in this run (a resume says continued)
            self._retrying.discard(trial.trial_id)
            failures = compat.trial_failures(trial)
            attempts = "" if trial.max_failures < 0 else f" of {trial.max_failures + 1}"
            where = "the start" if epoch is None else f"its checkpoint of epoch {epoch}"
            events.warning("Trial %d retried (attempt %d%s) from %s (id %s): %s  %s",
                           trial_number(trials, trial), failures + 1, attempts, where,
                           trial.trial_id, short_values(trial.config), self._status(trials))
            return
        if checkpoint is not None and checkpoint.metrics.get("epoch") is not None:
            # Said here instead of Tune's "Restored on <ip> from checkpoint" worker line.
            events.info("Trial %d continued from its checkpoint of epoch %d (id %s): %s  %s",
                        trial_number(trials, trial), checkpoint.metrics["epoch"],
                        trial.trial_id, short_values(trial.config), self._status(trials))
            return
        events.info("Trial %d started (id %s): %s  %s", trial_number(trials, trial),
                    trial.trial_id, short_values(trial.config), self._status(trials))

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict, **info: Any) -> None:
        self._remember_restored(trials)
        number, epoch = trial_number(trials, trial), result.get(TRAINING_ITERATION)
        value = result.get(self.metric)
        if value is not None and (self._best is None or self._better(value, self._best[0])):
            self._best = (float(value), number)
        figures = "  ".join(f"{key} {result[key]:.4f}" for key in METRIC_NAMES if key in result)
        events.info("Trial %d epoch %s: %s  (%.1f s)  %s", number, epoch, figures,
                    result.get(TIME_THIS_ITER_S, 0.0), self._status(trials))
        decisions = getattr(self.scheduler, "decisions", None) or []
        if len(decisions) != self._decisions_seen:
            self._decisions_seen = len(decisions)
            last = decisions[-1]
            if last["trial_id"] == trial.trial_id and last["epoch"] == epoch:
                events.info("Trial %d %s", number, describe_decision(last, self.metric))
        take_notes = getattr(self.scheduler, "take_notes", None)
        for note in take_notes(trial.trial_id) if take_notes else []:
            events.info("Trial %d %s", number, note)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        number = trial_number(trials, trial)
        took = time.time() - self._started_at.get(trial.trial_id, time.time())
        epochs = (trial.last_result or {}).get(TRAINING_ITERATION, 0)
        events.info("Trial %d ended after %s (%.0f s)  %s", number, counted(epochs, "epoch"),
                    took, self._status(trials, ended=trial))

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial,
                         **info: Any) -> None:
        """A failure Tune retries (``recovery.max_failures``): said as it happens, with its
        reason; the retry's start says so too."""
        self._retrying.add(trial.trial_id)
        events.warning("Trial %d failed: %s (attempt %d; it is retried; details: %s in %s)  %s",
                       trial_number(trials, trial), failure_reason(trial),
                       compat.trial_failures(trial), compat.trial_error_file(trial) or "sweep.log",
                       trial.path, self._status(trials))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        where = compat.trial_error_file(trial) or "sweep.log"
        failures = compat.trial_failures(trial)
        attempts = f"attempt {failures}, the last; " if failures > 1 else ""
        events.error("Trial %d failed: %s (%sdetails: %s in %s)  %s", trial_number(trials, trial),
                     failure_reason(trial), attempts, where, trial.path,
                     self._status(trials, ended=trial))


def failure_reason(trial: Trial) -> str:
    """The trial's last failure in one line (:func:`sweeper.summary.error_line`), read from
    the error file Tune has just written; "see sweep.log" where there is none."""
    for written, _ in compat.trial_error_files(trial):
        if written.suffix == ".txt" and written.is_file():
            return error_line(written.read_text(errors="replace"))
    return "its error is in sweep.log"


def describe_decision(decision: dict, metric: str) -> str:
    """One scheduler decision in words: what, where, and the values compared."""
    value = f"{metric} {decision['value']:.4f}"
    if decision["decision"] == "full_budget":
        return f"trained the full budget ({counted(decision['epoch'], 'epoch')}): {value}"
    rung = f"at rung {decision['rung']} (epoch {decision['epoch']})"
    compared = []
    if decision.get("asha_cutoff") is not None:
        compared.append(f"rung cutoff {decision['asha_cutoff']:.4f}")
    if decision.get("cutoff") is not None:
        compared.append(f"earlier-epochs cutoff {decision['cutoff']:.4f}")
    against = f" against {' and '.join(compared)}" if compared else " (first at the rung)"
    if decision["decision"] == "stop":
        return f"stopped {rung}: {value}{against}"
    return f"continued {rung}: {value}{against}"
