"""Benchmarks 1 and 4: worker utilization, per-trial overhead and memory, sweeper vs plain Tune.

Utilization = time in training steps summed over trials / (sweep wall time x concurrent
trials). Both sweeps run in the same process, one after the other, on the same Ray.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

from benchmarks.common import run_sweeper
from benchmarks.plain_tune import run_plain_tune

CONCURRENCY = 2
# (name, samples per epoch before the validation split, epochs, trials)
EXPERIMENTS = [("tiny (smoke)", 3000, 3, 6), ("short-epoch (1/10 Fashion-MNIST)", 6000, 4, 8)]


def measure(workdir: Path) -> list[dict]:
    rows = []
    for name, samples, epochs, trials in EXPERIMENTS:
        overrides = ["+experiment=smoke", "data=fashion_mnist", f"data.max_train_samples={samples}",
                     f"train.epochs={epochs}", f"search.num_trials={trials}",
                     f"resources.max_concurrent_trials={CONCURRENCY}"]
        slug = name.split()[0]
        ours = run_sweeper(f"sweeper-{slug}", overrides, workdir, CONCURRENCY)
        plain = run_plain_tune(f"plain-{slug}", workdir, samples, epochs, trials, CONCURRENCY,
                               validation_fraction=0.2)
        for label, run in (("sweeper", ours), ("plain Ray Tune", plain)):
            rows.append({
                "experiment": name, "sweep": label, "trials": len(run.rows),
                "epochs": run.epochs, "utilization": run.utilization,
                "overhead_per_trial_s": run.overhead_per_trial_s,
                "start_to_first_step_s": run.start_to_first_step_s,
                "worker_peak_rss_mb": run.peak_rss_mb(),
            })
    return rows


def driver_peak_rss_mb(workdir: Path) -> float:
    """Peak resident memory of a `python -m sweeper` driver running the smoke sweep."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "sweeper", "+experiment=smoke", "data=fashion_mnist",
                    f"sweep_dir={workdir}/driver-memory"], check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(before, after) / 1024
