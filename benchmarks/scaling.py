"""Benchmark 5: expected utilization at 8, 64 and 512 concurrent GPU trials, on paper.

Model (as Ray's own release tests measure driver throughput): every epoch of every trial is
one result the driver must process (searcher, ASHA, TensorBoard events, experiment state).
Measured here: the driver's CPU time per result ``c`` (user + system time of the driver
process, which runs Tune's loop, the searcher, ASHA and the callbacks; the trials run in other
processes), with many fast-reporting dummy trials going through sweeper's own searcher
(SQLite study), scheduler and callbacks (TensorBoard events, result files).
With N concurrent trials each reporting every ``e`` seconds the driver is busy
rho = N * c / e of the time; a trial waits for the driver once rho > 1, so

    utilization(N) = u1 * min(1, 1 / rho)

where u1 is the utilization measured with 2 concurrent trials (benchmark 1), which holds
the per-trial start/stop overheads.
"""

from __future__ import annotations

import resource
from pathlib import Path

from benchmarks.common import sweeper_config

DUMMY_TRIALS = 16
RESULTS_PER_TRIAL = 40


def dummy_trial(config: dict) -> None:
    from ray import tune

    for epoch in range(1, RESULTS_PER_TRIAL + 1):
        tune.report({"val_accuracy": config["train.lr"] * epoch, "accuracy": 0.5, "loss": 1.0,
                     "val_loss": 1.0, "epoch": epoch})


def driver_seconds_per_result(workdir: Path) -> float:
    from ray import tune

    from sweeper.space import build_search_space
    from sweeper.study import open_storage
    from sweeper.sweep import validate
    from sweeper.tuner import make_scheduler, make_searcher, sweep_callbacks, tune_settings

    cfg, space = validate(sweeper_config(["+experiment=smoke", "data=fashion_mnist",
                                          f"train.epochs={RESULTS_PER_TRIAL}",
                                          f"search.num_trials={DUMMY_TRIALS}",
                                          "resources.max_concurrent_trials=16"]))
    root = workdir / "scaling"
    scheduler = make_scheduler(cfg)
    tuner = tune.Tuner(
        tune.with_resources(dummy_trial, {"cpu": 0.1}),
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(cfg.search, build_search_space(cfg), cfg.name,
                                     cfg.train.epochs,
                                     storage=open_storage(f"sqlite:///{root}/optuna.db")),
            scheduler=scheduler, num_samples=DUMMY_TRIALS, reuse_actors=True),
        run_config=tune.RunConfig(name="trials", storage_path=str(root), verbose=0,
                                  callbacks=sweep_callbacks(root / "tensorboard", space,
                                                            cfg.search.metric, scheduler)),
    )
    before = resource.getrusage(resource.RUSAGE_SELF)
    with tune_settings(cfg):  # as run_sweep drives Tune
        grid = tuner.fit()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    results = sum(len(result.metrics_dataframe) for result in grid)
    return cpu_seconds / results


def project(seconds_per_result: float, epoch_seconds: float, base_utilization: float,
            concurrency: tuple[int, ...] = (8, 64, 512)) -> list[dict]:
    rows = []
    for n in concurrency:
        rho = n * seconds_per_result / epoch_seconds
        rows.append({"concurrent_trials": n, "driver_busy": rho,
                     "utilization": base_utilization * min(1.0, 1.0 / rho)})
    return rows
