"""Benchmarks 1 and 4: worker utilization, where the rest of the time goes, and memory,
sweeper vs the same sweep written the plain way.

Utilization = time in training steps summed over trials / (sweep wall time x concurrent
trials). Both sweeps run in the same process, one after the other, on the same Ray.

Also the start of fresh trial workers with a runtime env on the trial actors (as Tune gives
them one) and without (sweeper's way).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from benchmarks.common import SweepRun, median, run_sweeper
from benchmarks.plain_tune import PlainSweep, run_plain_tune

CONCURRENCY = 2


@dataclass(frozen=True)
class Experiment:
    name: str
    overrides: list[str]  # for `python -m sweeper`
    plain: PlainSweep | None  # the same sweep for the plain way (None: sweeper only)
    # Runs of each sweep, alternating sweeper and plain: ASHA's decisions depend on which
    # trial reports first, so one run can end with a long last trial and a worker idle.
    repeats: int = 3


EXPERIMENTS = [
    # The smoke experiment: 6 trials of at most 3 epochs on 2400 images (~30 s).
    Experiment("tiny (smoke)", ["+experiment=smoke", "data=fashion_mnist"],
               PlainSweep(samples=3000, epochs=3, num_trials=6, validation_fraction=0.2,
                          lr_range=(1e-4, 3e-2), batch_size=64, reduction_factor=2)),
    # The default experiment (20 trials, up to 10 epochs, batch 32, ASHA) with epochs of a
    # tenth of Fashion-MNIST: 5400 training images, about 2 s an epoch on one core.
    Experiment("short-epoch (cnn_lr, 1/10 Fashion-MNIST)",
               ["+experiment=cnn_lr", "data=fashion_mnist", "data.max_train_samples=6000"],
               PlainSweep(samples=6000, epochs=10, num_trials=20, validation_fraction=0.1,
                          lr_range=(1e-5, 1e-1), batch_size=32, reduction_factor=3)),
    # The same with three times the trials: how far the one-time start of the workers
    # (Ray worker, TensorFlow import: ~5 s each) amortizes.
    Experiment("short-epoch, 60 trials",
               ["+experiment=cnn_lr", "data=fashion_mnist", "data.max_train_samples=6000",
                "search.num_trials=60"], None, repeats=1),
]


def measure(workdir: Path) -> list[dict]:
    rows = []
    for number, experiment in enumerate(EXPERIMENTS):
        slug = f"{number}-{experiment.name.split()[0].strip(',')}"
        runs: dict[str, list[SweepRun]] = {"sweeper": []}
        for repeat in range(experiment.repeats):
            runs["sweeper"].append(run_sweeper(
                f"sweeper-{slug}-{repeat}",
                [*experiment.overrides, "resources.cpu_per_trial=1",
                 f"resources.max_concurrent_trials={CONCURRENCY}"], workdir, CONCURRENCY))
            if experiment.plain is not None:
                runs.setdefault("plain Ray Tune", []).append(run_plain_tune(
                    f"plain-{slug}-{repeat}", workdir, experiment.plain, CONCURRENCY))
        for label, repeated in runs.items():
            # The run with the median utilization stands for the experiment, its breakdown
            # and all; the others' utilizations are listed beside it.
            ranked = sorted(repeated, key=lambda run: run.utilization)
            run = ranked[(len(ranked) - 1) // 2]
            rows.append({
                "experiment": experiment.name, "sweep": label,
                "utilization_runs": [one.utilization for one in repeated],
                "trials": len(run.rows),
                "epochs": run.epochs, "utilization": run.utilization,
                "fit_utilization": run.fit_utilization,
                "first_steps_share": run.first_steps_share,
                "overhead_per_trial_s": run.overhead_per_trial_s,
                "start_to_first_step_s": run.start_to_first_step_s,
                "end_to_next_first_step_s": run.end_to_next_first_step_s,
                "worker_peak_rss_mb": run.peak_rss_mb(),
                "start_cpu_busy": run.start_cpu[0], "start_cpu_driver": run.start_cpu[1],
                "breakdown": run.breakdown(),
            })
    return rows


# Two fresh workers, one epoch each: the sweep is little more than its start.
START_OVERRIDES = ["+experiment=cnn_lr", "data=fashion_mnist", "data.max_train_samples=6000",
                   "search.num_trials=2", "train.epochs=1", "resources.cpu_per_trial=1",
                   f"resources.max_concurrent_trials={CONCURRENCY}"]
START_PAIRS = 6
# Any runtime env makes Ray start an actor's worker through its setup_worker.py shim. Tune gives
# trial actors env vars of its own, which sweeper empties (tuner.tune_settings); the runs "with
# a runtime env" get one as a user's sweep would: a variable Tune forwards to its trials, here
# at Tune's default value, so nothing else changes.
FORWARDED_VARIABLE = ("RAY_CHDIR_TO_TRIAL_DIR", "1")
WITH_ENV, WITHOUT_ENV = "with a runtime env", "without (sweeper)"


def worker_start(workdir: Path, pairs: int = START_PAIRS) -> dict:
    """How long two fresh trial workers take to start (from the sweep's start to the later
    one's first fit) and the CPU-seconds the machine spends on it, with a runtime env on the
    trial actors and without: medians of ``pairs`` alternating runs."""
    runs: dict[str, list[SweepRun]] = {WITH_ENV: [], WITHOUT_ENV: []}
    name, value = FORWARDED_VARIABLE
    for pair in range(pairs):
        labels = list(runs) if pair % 2 == 0 else list(runs)[::-1]
        for label in labels:
            with mock.patch.dict(os.environ):  # as it was again after the run
                if label == WITH_ENV:
                    os.environ[name] = value
                else:
                    os.environ.pop(name, None)
                runs[label].append(run_sweeper(f"start-{pair}-{label.split()[0]}",
                                               START_OVERRIDES, workdir, CONCURRENCY))
    return {"pairs": pairs, "runs": {
        label: {"start_s": median(run.start_ended_at - run.started_at for run in done),
                "start_cpu_s": median(run.start_cpu_s for run in done)}
        for label, done in runs.items()}}


def driver_peak_rss_mb(workdir: Path) -> float:
    """Peak resident memory of a `python -m sweeper` driver running the smoke sweep."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "sweeper", "+experiment=smoke", "data=fashion_mnist",
                    f"sweep_dir={workdir}/driver-memory"], check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(before, after) / 1024
