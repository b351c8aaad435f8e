"""The Optuna searcher, told the truth about every epoch and about trials ASHA stopped early.

Ray's stock ``OptunaSearch`` tells Optuna that an early-stopped trial is COMPLETE with its
last value, as if that value were a full-budget result. TPE then ranks a trial stopped after
one epoch among the finished ones, and ``study.best_trial`` can be a trial that never trained
to the end. Here such a trial is told as PRUNED (Optuna keeps its per-epoch values, and TPE
ranks pruned trials by how far they got, then by their last value), and a trial whose metric
is missing or not finite is told as FAILED.

Every epoch a trial trained reaches the study as an intermediate value, the last one too.
Ray's controller does not call a searcher's ``on_trial_result`` for the result on which the
scheduler says STOP (ASHA's stop at a rung, and its stop at max_t after a trial's last
epoch), only ``on_trial_complete`` with that result (Ray 2.60,
``TuneController._process_trial_result``); so the completion reports it before telling the
trial's state. Without that, a trial stopped at the first rung reached Optuna with no value.

The study is the source of truth across restores: each Optuna trial carries its
Tune trial id, so a searcher restored from an old (or missing) checkpoint
finds its trials in the storage instead of losing them.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search import SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from sweeper import compat
from sweeper.compat import add_intermediate_values, windowed_tpe_sampler
from sweeper.metrics import diverged
from sweeper.scheduler import TIME_BUDGET
from sweeper.space import decode_params

logger = logging.getLogger(__name__)

RAY_TRIAL_ID = "ray_trial_id"
# Epochs reach the study in batches at most this far apart (one SQLite transaction an epoch
# cost more driver CPU than all of Tune's own work on a result, benchmarks/RESULTS.md section 5;
# on the journal file each write is an fsynced append).
STUDY_WRITE_EVERY_S = 1.0
# Finished trials TPE models at most: its 25 best and the most recent. Optuna's TPE reads and
# models every trial at each suggestion, O(trials); past this many a suggestion costs what it
# cost here (benchmarks/RESULTS.md section 5: at 5 000 trials 3x less, the same at 1 000).
TPE_WINDOW = 1000


def make_sampler(name: str, seed: int, n_startup_trials: int,
                 multivariate: bool = True) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named by ``search.sampler``, seeded."""
    if name == "tpe":
        with warnings.catch_warnings():
            # Optuna marks multivariate TPE experimental; search.multivariate chooses it (on by
            # default: it found better models in fewer epochs in the search benchmark).
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # constant_liar keeps parallel workers from all sampling the same point; the window
            # keeps a suggestion's cost flat past TPE_WINDOW finished trials.
            return windowed_tpe_sampler(TPE_WINDOW, seed=seed, n_startup_trials=n_startup_trials,
                                        constant_liar=True, multivariate=multivariate)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}")


def final_state(value: Any, epochs: int, max_epochs: int, error: bool) -> TrialState:
    """How Optuna should see a trial that Ray Tune reports as ended."""
    if error or value is None or not math.isfinite(float(value)):
        return TrialState.FAIL
    if epochs < max_epochs:
        return TrialState.PRUNED
    return TrialState.COMPLETE


class PruningOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells early-stopped trials as PRUNED and bad ones as FAILED.

    Args:
        max_epochs: The full budget of a trial; a trial that ends with fewer epochs was
            stopped early by the scheduler.
        max_concurrent: Trials running at once (None: no limit). Kept here rather than in
            Ray's ConcurrencyLimiter, whose set of live trials is not saved with the
            experiment, so after a restore it never tells the searcher that they ended.
        *args, **kwargs: As for ``ray.tune.search.optuna.OptunaSearch``.
    """

    def __init__(self, *args: Any, max_epochs: int, max_concurrent: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_epochs = max_epochs
        self._max_concurrent = max_concurrent

    # OptunaSearch's study and trial maps are Ray's private attributes (sweeper.compat).
    @property
    def study(self) -> optuna.Study:
        return compat.searcher_study(self)

    @property
    def _trials(self) -> dict[str, optuna.Trial]:
        return compat.searcher_trials(self)

    @property
    def _completed(self) -> set[str]:
        return compat.searcher_completed(self)

    def _live_trials(self) -> int:
        # Every trial told complete is one of the trials asked for (Ray's OptunaSearch and
        # on_trial_complete below add an id to the completed set only after finding its
        # trial), so this is a difference of sizes: Tune asks for a trial at nearly every step
        # of its loop, and a count over every trial of the sweep made each ask O(trials).
        return len(self._trials) - len(self._completed)

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._trials and TIME_BUDGET.expired():
            # search.time_budget_s is spent: no new trial. The scheduler refusing to start
            # one is not enough: Tune starts its queued trials on freed resources without
            # asking it (Ray 2.60, TuneController._maybe_add_actors, steps 2 and 3), so with
            # no limit on concurrent trials every paused trial let a new one in.
            return None
        if (trial_id not in self._trials and self._max_concurrent is not None
                and self._live_trials() >= self._max_concurrent):
            return None  # Tune asks again when a trial ends
        params = super().suggest(trial_id)
        ot_trial = self._trials[trial_id]
        ot_trial.set_user_attr(RAY_TRIAL_ID, trial_id)
        # A trial asked for here is RUNNING with no epochs: known without reading it back
        # (each read of a running trial is a query of its params, attributes and epochs).
        stored_as = compat.storage_id(ot_trial)
        self._running_ids().add(stored_as)
        self.__dict__.setdefault("_known_steps", {})[stored_as] = set()
        # Lists and dicts are held in the study as their JSON text (sweeper.space): the
        # trial, and everything that shows its config, gets the values themselves.
        return decode_params(params)

    def _running_ids(self) -> set[int]:
        """Storage ids of the study's RUNNING trials that this driver may still tell: those it
        asked for, and after a restore those the storage held as RUNNING (read once there)."""
        return self.__dict__.setdefault("_running", set())

    def _trial_for(self, trial_id: str) -> optuna.Trial | None:
        """The Optuna trial of a Tune trial, from memory or else from the storage."""
        ot_trial = self._trials.get(trial_id)
        if ot_trial is None:
            for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if frozen.user_attrs.get(RAY_TRIAL_ID) == trial_id:
                    ot_trial = compat.running_trial(self.study, frozen)
                    self._trials[trial_id] = ot_trial
                    self._running_ids().add(compat.storage_id(frozen))
                    break
        return ot_trial

    def _stored(self, ot_trial: optuna.Trial) -> FrozenTrial:
        return compat.stored_trial(self.study, ot_trial)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        ot_trial = self._trial_for(trial_id)
        if ot_trial is None or trial_id in self._completed:
            return
        self._report_epoch(ot_trial, result)

    def _report_epoch(self, ot_trial: optuna.Trial, result: dict) -> None:
        """Record one epoch's metric as the trial's intermediate value at that epoch."""
        value, step = result.get(self.metric), result.get(TRAINING_ITERATION)
        if value is None or step is None or not math.isfinite(float(value)):
            return  # Optuna refuses NaN intermediate values; the trial will be told FAILED
        # A trial retried from its checkpoint reports some epochs again: keep the first value.
        steps = self._stored_steps(ot_trial)
        if int(step) in steps:
            return
        steps.add(int(step))
        unwritten = self.__dict__.setdefault("_unwritten", [])
        unwritten.append((compat.storage_id(ot_trial), int(step), float(value)))
        if time.monotonic() - self.__dict__.get("_written_at", 0.0) >= STUDY_WRITE_EVERY_S:
            self.write_study()

    def write_study(self) -> None:
        """Add the epochs reported since the last write to the study, in one transaction.

        Called at most every :data:`STUDY_WRITE_EVERY_S` seconds as results come, before a
        trial is told finished, and before every save of the searcher (Tune saves it with the
        experiment state): whatever a resume restores from is in the study, and
        optuna-dashboard shows an epoch a second after it was reported.
        """
        unwritten = self.__dict__.get("_unwritten")
        if unwritten:
            add_intermediate_values(compat.study_storage(self.study), unwritten)
            unwritten.clear()
        self._written_at = time.monotonic()

    def _stored_steps(self, ot_trial: optuna.Trial) -> set[int]:
        """The epochs the study holds for a trial: read from the storage once per trial and
        driver, then kept here (one database read per result was a third of the searcher's
        cost per result, benchmarks/RESULTS.md section 5)."""
        known = self.__dict__.setdefault("_known_steps", {})
        steps = known.get(compat.storage_id(ot_trial))
        if steps is None:
            steps = known[compat.storage_id(ot_trial)] = set(
                self._stored(ot_trial).intermediate_values)
        return steps

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        ot_trial = self._trial_for(trial_id)
        if trial_id in self._completed or ot_trial is None:
            return
        running = compat.storage_id(ot_trial) in self._running_ids()
        if result and running:
            self._report_epoch(ot_trial, result)  # the result the scheduler stopped it on
        value = result.get(self.metric) if result else None
        epochs = int(result.get(TRAINING_ITERATION, 0)) if result else 0
        state = final_state(value, epochs, self._max_epochs, error or diverged(result))
        if running:
            self.write_study()  # its epochs, before it is told finished
            told_value = float(value) if state == TrialState.COMPLETE else None
            self.study.tell(ot_trial, told_value, state=state)
            self._running_ids().discard(compat.storage_id(ot_trial))
        self._completed.add(trial_id)
        logger.debug("Told Optuna trial %s %s after %d epochs", trial_id, state.name, epochs)

    def save(self, checkpoint_path: str) -> None:
        self.write_study()
        super().save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        # The saved state may be older than the study: read each trial's epochs anew.
        self.__dict__.pop("_known_steps", None)
        self.__dict__.pop("_written_at", None)  # a time of the driver that saved it
        self._fail_orphans()

    def _fail_orphans(self) -> None:
        """Close trials the storage holds as RUNNING that no Tune trial will ever finish.

        They were asked for after the experiment state this restore comes from was saved,
        so Tune does not know them; left RUNNING, TPE's constant liar would keep avoiding them.
        The RUNNING trials Tune does know become the set this searcher may still tell.
        """
        known = {trial.number for trial in self._trials.values()}
        running = self._running_ids()
        running.clear()  # the saved set is as old as the saved state; the storage says
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.number not in known:
                self.study.tell(frozen.number, state=TrialState.FAIL)
                logger.info("Optuna trial %d was lost with the driver; marked failed",
                            frozen.number)
            else:
                running.add(compat.storage_id(frozen))

    def add_warm_start(self, trials: list[FrozenTrial]) -> None:
        """Let the sampler learn from an earlier sweep's trials before it samples."""
        self.study.add_trials(trials)



class BudgetedSearch(SearchGenerator):
    """Tune's wrapper of a searcher (``SearchGenerator``), finished as soon as no new trial
    can come: also once the sweep's time budget is spent, or Tune was told to stop (Ctrl-C,
    SIGTERM).

    Tune waits for the searcher's next trial whenever no trial is pending, running or paused,
    up to 600 s, asking once a second and looking at nothing but whether the searcher is
    finished (Ray 2.60, ``TuneController._update_trial_queue``): with the budget spent while
    the last trial failed, the driver sat idle for ten minutes, deaf to Ctrl-C. Being
    finished is computed, never stored, so a resumed sweep asks for trials again.
    """

    def is_finished(self) -> bool:
        if super().is_finished() or TIME_BUDGET.expired():
            return True
        stop = self.__dict__.get("_stop_requested")
        if stop is None:  # found while Tune's handler is installed, kept once found
            stop = self._stop_requested = compat.tune_stop_event()
        return stop is not None and stop.is_set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_stop_requested", None)  # an Event does not pickle; found again in the run
        return state
