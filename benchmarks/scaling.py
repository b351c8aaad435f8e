"""Benchmark 5: the driver's cost per result with many trials at once, measured side by side.

Every epoch of every trial is one result the driver must process (Tune's loop, the searcher
and its study, ASHA, TensorBoard events, result files, the experiment-state snapshots). Dummy
trials that report like sweeper's trainer (metrics and a small checkpoint every epoch, every
``interval`` seconds, resumable from their checkpoint) run through the driver a sweep builds
(:func:`sweeper.tuner.build_tuner`: sweeper's searcher with its study, on Optuna's journal
file and, as before issue 26, on a SQLite file; its ASHA, its callbacks, its checkpoint
settings) and through plain Ray Tune (random search, FIFO, its default loggers on and off).
Each trial asks for ``2 / concurrency`` CPUs, so all of them run at once on 2 cores (each is
a Ray worker process: about 95 MB on the 2-core test machine, where 64 trials at once took 6 GB,
so 128 fit its 24 GB and 256 do not).
Measured: the driver process's CPU time (user + system, over ``fit()``) per result; results
per second over the whole run (starting the workers included: Ray starts as many at a time as
the node has CPUs) against the pace the trials set (trials at once / seconds between reports);
and how busy the driver was (its CPU time over the wall time: past 1, one core, results wait
for it).
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import sweeper_config

# (concurrent trials, seconds between reports) of the default run; larger behind --scaling-sizes.
DEFAULT_SIZES = ((16, 0.5), (32, 0.5))
EPOCHS = 20  # results a trial reports at most; sweeper's ASHA stops some at epoch 10
GRACE = 10


def dummy_trial(config: dict) -> None:
    """Report like sweeper's trainer: every epoch its metrics and a checkpoint; a restored trial
    continues after its checkpoint's epoch."""
    import tempfile

    from ray import tune

    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = json.loads((Path(folder) / "state.json").read_text())["epoch"]
    for epoch in range(start + 1, config["epochs"] + 1):
        time.sleep(config["interval"])
        value = min(0.99, config["train.lr"] * 30 * epoch)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "state.json").write_text(json.dumps({"epoch": epoch}))
            tune.report({"val_accuracy": value, "accuracy": value, "loss": 1.0 - value,
                         "val_loss": 1.0 - value, "epoch": epoch, "reported_at": time.time()},
                        checkpoint=tune.Checkpoint.from_directory(folder))


@dataclass
class DriverRun:
    """One driver's figures: CPU time and results over its ``fit()``."""

    driver: str
    concurrent: int
    interval_s: float
    trials: int
    results: int
    wall_s: float
    cpu_s: float

    @property
    def ms_per_result(self) -> float:
        return 1000 * self.cpu_s / max(self.results, 1)

    @property
    def results_per_s(self) -> float:
        return self.results / self.wall_s

    def row(self) -> dict:
        return {**asdict(self), "ms_per_result": self.ms_per_result,
                "results_per_s": self.results_per_s}


def _measured(fit, profile: Path | None = None) -> tuple[float, float, object]:
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    # CPU time, not wall time: the driver mostly waits in ray.wait for the next result.
    profiler = cProfile.Profile(time.process_time) if profile else None
    if profiler:
        profiler.enable()
    grid = fit()
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), grid


def dummy_sweep(sweep_dir: Path, concurrent: int, interval: float, trials: int,
                epochs: int = EPOCHS, grace: int = GRACE, sqlite_study: bool = False,
                trial_cpus: float | None = None):
    """(config, Tuner) of a sweep whose trials are :func:`dummy_trial`: the driver ``python -m
    sweeper`` builds for the smoke experiment (searcher and study, ASHA, callbacks, checkpoint
    settings; at most ``concurrent`` trials at once), restored from ``sweep_dir`` when a run
    there was interrupted. ``sqlite_study``: the study on a SQLite file in the folder, as before
    issue 26 (now a journal file). ``trial_cpus``: the CPUs each trial asks for (default
    ``2 / concurrent``, so that all of them fit on 2 cores at once)."""
    from ray import tune

    from sweeper.layout import SweepLayout
    from sweeper.study import SQLITE_PREFIX, open_storage, study_location
    from sweeper.sweep import validated
    from sweeper.tuner import build_tuner

    trial_cpus = trial_cpus or 2 / concurrent
    cfg, space = validated(sweeper_config([
        "+experiment=smoke", "data=fashion_mnist", f"train.epochs={epochs}",
        f"search.num_trials={trials}", f"resources.max_concurrent_trials={concurrent}",
        f"resources.cpu_per_trial={trial_cpus}", f"scheduler.grace_period={grace}",
        f"sweep_dir={sweep_dir}", "name=scaling"]))
    layout = SweepLayout.for_config(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(_with_settings, epochs=epochs, interval=interval),
        {"cpu": trial_cpus})
    location = (f"{SQLITE_PREFIX}{layout.root / layout.SQLITE_STUDY}" if sqlite_study
                else study_location(None, layout.root))
    return cfg, build_tuner(cfg, space, None, layout, open_storage(location),
                            trainable=trainable)


def sweeper_driver(workdir: Path, concurrent: int, interval: float, trials: int | None = None,
                   profile: Path | None = None, forced_snapshots: bool = False,
                   sqlite_study: bool = False, epochs: int = EPOCHS) -> DriverRun:
    """Dummy trials through sweeper's driver (:func:`dummy_sweep`).

    ``forced_snapshots``: as before issue 26, Tune saves the experiment state at every trial
    checkpoint (sweeper.compat.snapshots_on_a_timer left out). ``sqlite_study``: the study on
    a SQLite file, as before issue 26's journal.
    """
    import contextlib
    from unittest import mock

    from sweeper.tuner import tune_settings

    trials = trials or 2 * concurrent
    label = ("sweeper, a state save per checkpoint (before)" if forced_snapshots
             else "sweeper, SQLite study (before)" if sqlite_study else "sweeper")
    folder = workdir / (f"sweeper{'-forced' * forced_snapshots}{'-sqlite' * sqlite_study}"
                        f"-{concurrent}-{interval:g}-{trials}x{epochs}")
    cfg, tuner = dummy_sweep(folder, concurrent, interval, trials, epochs=epochs,
                             grace=min(GRACE, epochs), sqlite_study=sqlite_study)

    def fit():
        before = (mock.patch("sweeper.tuner.snapshots_on_a_timer", contextlib.nullcontext)
                  if forced_snapshots else contextlib.nullcontext())
        with before, tune_settings(cfg):
            return tuner.fit()

    wall, cpu, grid = _measured(fit, profile)
    results = sum(len(result.metrics_dataframe) for result in grid
                  if result.metrics_dataframe is not None)
    return DriverRun(label, concurrent, interval, trials, results, wall, cpu)


def _with_settings(config: dict, epochs: int, interval: float) -> None:
    dummy_trial({**config, "epochs": epochs, "interval": interval})


def _results_counter():
    """A Tune callback that counts results (plain Tune without loggers writes no result files
    to count them from afterwards)."""
    from ray.tune import Callback

    class ResultsCounter(Callback):
        count = 0

        def on_trial_result(self, *args, **kwargs) -> None:
            self.count += 1

    return ResultsCounter()


def plain_tune_driver(workdir: Path, concurrent: int, interval: float, loggers: bool,
                      trials: int | None = None, epochs: int = EPOCHS) -> DriverRun:
    """The same dummy trials through plain Ray Tune: random search, FIFO, Tune's defaults."""
    from ray import tune

    trials = trials or 2 * concurrent
    counter = _results_counter()
    tuner = tune.Tuner(
        tune.with_resources(dummy_trial, {"cpu": 2 / concurrent}),
        param_space={"train.lr": tune.loguniform(1e-4, 3e-2), "epochs": epochs,
                     "interval": interval},
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=concurrent,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="plain", verbose=0, callbacks=[counter], storage_path=str(
            workdir / f"plain-{loggers}-{concurrent}-{interval:g}-{trials}x{epochs}")),
    )
    key = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
    saved = os.environ.get(key)
    os.environ[key] = "0" if loggers else "1"
    try:
        wall, cpu, _ = _measured(tuner.fit)
    finally:
        os.environ.pop(key) if saved is None else os.environ.update({key: saved})
    label = "Ray Tune, default loggers" if loggers else "Ray Tune, no loggers"
    return DriverRun(label, concurrent, interval, trials, counter.count, wall, cpu)


# Past this many trials at once the drivers from before issue 26 are left out: a state save
# per checkpoint is O(trials) a result (minutes a size), and their figures at the default sizes
# already tell the story.
BEFORE_UP_TO = 32


def measure(workdir: Path, sizes=DEFAULT_SIZES) -> list[dict]:
    """All drivers at each size, one after the other in this process (the drivers from before
    issue 26 up to BEFORE_UP_TO trials at once)."""
    rows = []
    for concurrent, interval in sizes:
        rows.append(plain_tune_driver(workdir, concurrent, interval, loggers=False).row())
        rows.append(plain_tune_driver(workdir, concurrent, interval, loggers=True).row())
        if concurrent <= BEFORE_UP_TO:
            rows.append(sweeper_driver(workdir, concurrent, interval,
                                       forced_snapshots=True).row())
            rows.append(sweeper_driver(workdir, concurrent, interval, sqlite_study=True).row())
        rows.append(sweeper_driver(workdir, concurrent, interval).row())
    return rows


# Ray Tune's release test bookkeeping_overhead (release/tune_tests/scalability_tests): 10 000
# trials of one second, one result each, on 16 CPUs in at most 800 s against the ideal 625 s.
# Here: (trials, trials at once, seconds a trial).
BOOKKEEPING = (2000, 16, 1.0)


def bookkeeping(workdir: Path, trials: int = BOOKKEEPING[0], concurrent: int = BOOKKEEPING[1],
                trial_s: float = BOOKKEEPING[2]) -> list[dict]:
    """Ray Tune's bookkeeping test scaled to this machine: ``trials`` trials of one epoch of
    ``trial_s`` seconds (one result with its checkpoint), ``concurrent`` at once (each asking
    ``2 / concurrent`` CPUs), through plain Ray Tune (default loggers, random search, FIFO, as
    the release test; its TUNE_GLOBAL_CHECKPOINT_S tweak left out) and through sweeper's driver
    (TPE on the journal study, ASHA, callbacks). Rows of :class:`DriverRun` with the ideal wall
    time ``trials * trial_s / concurrent`` (seconds) beside the measured one."""
    ideal = trials * trial_s / concurrent
    runs = (plain_tune_driver(workdir, concurrent, trial_s, loggers=True, trials=trials,
                              epochs=1),
            sweeper_driver(workdir, concurrent, trial_s, trials=trials, epochs=1))
    return [{**run.row(), "ideal_s": ideal} for run in runs]


SEARCHER_SIZES = (100, 1000, 5000)


def _wide_space() -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {"train.lr": FloatDistribution(1e-4, 1e-2, log=True),
            "train.batch_size": CategoricalDistribution([32, 64, 128]),
            "model.filters": CategoricalDistribution([16, 32, 48]),
            "model.dense_units": CategoricalDistribution([32, 64, 128]),
            "model.dropout": FloatDistribution(0.0, 0.5),
            "model.l2": FloatDistribution(1e-6, 1e-3, log=True)}


def _finished_trials(count: int, space: dict, seed: int = 0) -> list:
    """Finished trials of the wide space as ASHA leaves them: a quarter trained the full 20
    epochs (COMPLETE), the others stopped at a rung (PRUNED), each with its epochs' values."""
    import random

    import optuna
    from optuna.distributions import CategoricalDistribution

    rng = random.Random(seed)
    trials = []
    for _ in range(count):
        params = {name: rng.choice(d.choices) if isinstance(d, CategoricalDistribution)
                  else d.low + rng.random() * (d.high - d.low) for name, d in space.items()}
        epochs = rng.choice([1, 3, 9, 20])
        state = optuna.trial.TrialState.COMPLETE if epochs == 20 else (
            optuna.trial.TrialState.PRUNED)
        trials.append(optuna.trial.create_trial(
            state=state, value=rng.random() if epochs == 20 else None, params=params,
            distributions=space,
            intermediate_values={epoch: rng.random() for epoch in range(1, epochs + 1)}))
    return trials


def _ms_per_trial(study, space: dict, repeats: int) -> float:
    """Milliseconds of one ask (TPE's sampling of ``space``) and its tell, averaged over
    ``repeats`` after one that warms the caches."""
    import optuna

    study.tell(study.ask(space), state=optuna.trial.TrialState.FAIL)
    started = time.perf_counter()
    for _ in range(repeats):
        study.tell(study.ask(space), state=optuna.trial.TrialState.FAIL)
    return 1000 * (time.perf_counter() - started) / repeats


def searcher_cost(sizes=SEARCHER_SIZES, repeats: int = 5) -> list[dict]:
    """Milliseconds a TPE suggestion takes on a study of N finished trials (the wide space, an
    in-memory study: the sampler's own cost), Optuna's TPE as sweeper configures it against
    sweeper's sampler (the same, modelling a window of TPE_WINDOW trials), side by side."""
    import warnings

    import optuna

    from sweeper.searcher import make_sampler

    space = _wide_space()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    for size in sizes:
        trials = _finished_trials(size, space)
        row = {"finished_trials": size}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            samplers = {"optuna_tpe_ms": optuna.samplers.TPESampler(
                seed=0, n_startup_trials=5, constant_liar=True, multivariate=True),
                "sweeper_ms": make_sampler("tpe", 0, 5, True)}
        for label, sampler in samplers.items():
            study = optuna.create_study(direction="maximize", sampler=sampler)
            study.add_trials(trials)
            row[label] = _ms_per_trial(study, space, repeats)
        rows.append(row)
    return rows


STUDY_RUNNING = (16, 64, 256)


def study_cost(workdir: Path, running_sizes=STUDY_RUNNING, finished: int = 200,
               epochs_each: int = 10, repeats: int = 5) -> list[dict]:
    """Milliseconds the driver's study spends on one trial (TPE's ask with its sampling, then
    the tell) while N other trials are RUNNING with ``epochs_each`` epochs stored each, on a
    SQLite file (sweeper's study before issue 26, still what ``search.storage=sqlite:///...``
    gives; Optuna's cache in front) and on Optuna's journal file (sweeper's study now), both
    opened by :func:`sweeper.study.open_storage`, side by side.

    Optuna's cache keeps finished trials but reads every unfinished one back from the
    database at each ``get_all_trials`` (TPE's sampling, and ``ask``'s look for enqueued
    trials): on SQLite the cost of a trial grows with the trials running beside it.
    """
    import optuna

    from sweeper import compat
    from sweeper.searcher import make_sampler
    from sweeper.study import open_storage

    space = _wide_space()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = _finished_trials(finished, space)
    rows = []
    for size in running_sizes:
        row = {"running_trials": size, "finished_trials": finished}
        for label, make in (
                ("sqlite_ms", lambda folder: open_storage(f"sqlite:///{folder / 'optuna.db'}")),
                ("journal_ms", lambda folder: open_storage(str(folder / "optuna.log")))):
            folder = workdir / f"study-{label}-{size}"
            folder.mkdir(parents=True, exist_ok=True)
            study = optuna.create_study(storage=make(folder), direction="maximize",
                                        sampler=make_sampler("tpe", 0, 5, True))
            study.add_trials(done)
            for _ in range(size):
                trial = study.ask(space)
                for epoch in range(1, epochs_each + 1):
                    compat.study_storage(study).set_trial_intermediate_value(
                        compat.storage_id(trial), epoch, 0.5)
            row[label] = _ms_per_trial(study, space, repeats)
        rows.append(row)
    return rows


def project(ms_per_result: float, epoch_seconds: float,
            concurrency: tuple[int, ...] = (64, 256, 512)) -> list[dict]:
    """How busy a driver that spends ``ms_per_result`` on a result would be with N trials each
    reporting every ``epoch_seconds``: rho = N * c / e; past 1, trials wait for the driver and
    the sweep runs at most 1 / rho of its speed."""
    rows = []
    for n in concurrency:
        rho = n * ms_per_result / 1000 / epoch_seconds
        rows.append({"concurrent_trials": n, "driver_busy": rho, "speed": min(1.0, 1.0 / rho)})
    return rows


def profile_parts(path: Path) -> dict[str, float]:
    """CPU seconds of a driver's cProfile dump by component (cumulative; the callbacks' lines
    are parts of "callbacks"), and the whole ``fit()``."""
    stats = pstats.Stats(str(path)).stats

    def cumulative(match) -> float:
        return sum(entry[3] for (file, _, name), entry in stats.items() if match(file, name))

    parts = {
        "experiment-state saves": lambda f, n: f.endswith("tune_controller.py")
        and n == "checkpoint",
        "searcher: suggestions (TPE)": lambda f, n: f.endswith("search_generator.py")
        and n == "next_trial",
        "searcher: results, study writes": lambda f, n: f.endswith("search_generator.py")
        and n in ("on_trial_result", "on_trial_complete"),
        "scheduler (ASHA)": lambda f, n: f.endswith("sweeper/scheduler.py")
        and n in ("on_trial_result", "on_trial_complete", "on_trial_add", "choose_trial_to_run"),
        "callbacks": lambda f, n: f.endswith("tune/callback.py") and n.startswith("on_"),
        "callbacks: TensorBoard": lambda f, n: f.endswith("sweeper/tensorboard.py")
        and n.startswith("on_"),
        "callbacks: result.json, progress.csv": lambda f, n: f.endswith("sweeper/tuner.py")
        and n in ("log_trial_result", "log_trial_start"),
        "callbacks: console lines": lambda f, n: f.endswith("sweeper/progress.py")
        and n.startswith("on_"),
    }
    found = {label: cumulative(match) for label, match in parts.items()}
    found["fit() in all"] = max(entry[3] for entry in stats.values())
    return found


def profiles(workdir: Path, concurrent: int, interval: float) -> dict:
    """cProfile (CPU time) of sweeper's driver before issue 26's saves and after, by part."""
    found = {}
    for label, forced in (("before", True), ("after", False)):
        dump = workdir / f"profile-{label}.out"
        run = sweeper_driver(workdir / label, concurrent, interval, profile=dump,
                             forced_snapshots=forced)
        found[label] = {"results": run.results, "parts": profile_parts(dump)}
    return found
