"""Benchmark 5: the driver's cost per result with many trials at once, measured side by side.

Every epoch of every trial is one result the driver must process (Tune's loop, the searcher
and its study, ASHA, TensorBoard events, result files, the experiment-state snapshots). Dummy
trials that report like sweeper's trainer (metrics and a small checkpoint every epoch, every
``interval`` seconds, resumable from their checkpoint) run through the driver a sweep builds
(:func:`sweeper.tuner.build_tuner`: sweeper's searcher with its SQLite study, its ASHA, its
callbacks, its checkpoint settings) and through plain Ray Tune (random search, FIFO, its
default loggers on and off). Each trial asks for ``2 / concurrency`` CPUs, so all of them run
at once on 2 cores. Measured: the driver process's CPU time (user + system, over ``fit()``)
per result, and results per second sustained over the run.
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
                         "val_loss": 1.0 - value, "epoch": epoch},
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
                epochs: int = EPOCHS, grace: int = GRACE):
    """(config, Tuner) of a sweep whose trials are :func:`dummy_trial`: the driver ``python -m
    sweeper`` builds for the smoke experiment (searcher and study, ASHA, callbacks, checkpoint
    settings), restored from ``sweep_dir`` when a run there was interrupted."""
    from ray import tune

    from sweeper.study import open_storage, storage_url
    from sweeper.sweep import validate
    from sweeper.tuner import SweepPaths, build_tuner

    cfg, space = validate(sweeper_config([
        "+experiment=smoke", "data=fashion_mnist", f"train.epochs={epochs}",
        f"search.num_trials={trials}", f"resources.max_concurrent_trials={concurrent}",
        f"resources.cpu_per_trial={2 / concurrent}", f"scheduler.grace_period={grace}",
        f"sweep_dir={sweep_dir}", "name=scaling"]))
    paths = SweepPaths.for_config(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(_with_settings, epochs=epochs, interval=interval),
        {"cpu": 2 / concurrent})
    return cfg, build_tuner(cfg, space, None, paths,
                            open_storage(storage_url(None, paths.root)), trainable=trainable)


def sweeper_driver(workdir: Path, concurrent: int, interval: float, trials: int | None = None,
                   profile: Path | None = None, forced_snapshots: bool = False) -> DriverRun:
    """Dummy trials through sweeper's driver (:func:`dummy_sweep`).

    ``forced_snapshots``: as before issue 26, Tune saves the experiment state at every trial
    checkpoint (sweeper.compat.snapshots_on_a_timer left out).
    """
    import contextlib
    from unittest import mock

    from sweeper.tuner import tune_settings

    trials = trials or 2 * concurrent
    label = "sweeper, a state save per checkpoint (before)" if forced_snapshots else "sweeper"
    folder = workdir / f"sweeper{'-forced' * forced_snapshots}-{concurrent}-{interval:g}"
    cfg, tuner = dummy_sweep(folder, concurrent, interval, trials)

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
                      trials: int | None = None) -> DriverRun:
    """The same dummy trials through plain Ray Tune: random search, FIFO, Tune's defaults."""
    from ray import tune

    trials = trials or 2 * concurrent
    counter = _results_counter()
    tuner = tune.Tuner(
        tune.with_resources(dummy_trial, {"cpu": 2 / concurrent}),
        param_space={"train.lr": tune.loguniform(1e-4, 3e-2), "epochs": EPOCHS,
                     "interval": interval},
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=concurrent,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="plain", verbose=0, callbacks=[counter], storage_path=str(
            workdir / f"plain-{loggers}-{concurrent}-{interval:g}")),
    )
    key = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
    saved = os.environ.get(key)
    os.environ[key] = "0" if loggers else "1"
    try:
        wall, cpu, _ = _measured(tuner.fit)
    finally:
        os.environ.pop(key) if saved is None else os.environ.update({key: saved})
    results = counter.count
    label = "Ray Tune, default loggers" if loggers else "Ray Tune, no loggers"
    return DriverRun(label, concurrent, interval, trials, results, wall, cpu)


def measure(workdir: Path, sizes=DEFAULT_SIZES) -> list[dict]:
    """All drivers at each size, one after the other in this process."""
    rows = []
    for concurrent, interval in sizes:
        rows.append(plain_tune_driver(workdir, concurrent, interval, loggers=False).row())
        rows.append(plain_tune_driver(workdir, concurrent, interval, loggers=True).row())
        rows.append(sweeper_driver(workdir, concurrent, interval, forced_snapshots=True).row())
        rows.append(sweeper_driver(workdir, concurrent, interval).row())
    return rows


def profile_table(path: Path, top: int = 25) -> list[tuple[str, float]]:
    """The functions with the most cumulative time in a cProfile dump, as (name, seconds)."""
    stats = pstats.Stats(str(path))
    entries = sorted(stats.stats.items(), key=lambda item: item[1][3], reverse=True)
    return [(f"{Path(file).name}:{line}({name})", cumulative)
            for (file, line, name), (_, _, _, cumulative, _) in entries[:top]]
