"""The GPU path, where a GPU is visible (skipped elsewhere): trials get the GPU, four share it,
and TensorFlow in each takes only what it needs of the GPU's memory.

``python -m benchmarks.gpu`` measures the same on a whole sweep and records the figures.
"""

from __future__ import annotations

import pytest
from cli_helpers import run_cli, trial_rows

from benchmarks.common import SweepRun
from benchmarks.gpu import most_at_once, nvidia_smi

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_four_trials_share_one_gpu_each_taking_a_small_part_of_its_memory(tmp_path,
                                                                          fashion_mnist_dir):
    sweep_dir = tmp_path / "sweep"
    finished = run_cli(["+experiment=smoke", "data=fashion_mnist",
                        f"data.path={fashion_mnist_dir}", "data.max_train_samples=4000",
                        "train.epochs=2", "search.num_trials=4", "search.n_startup_trials=4",
                        "scheduler=none", "resources.cpu_per_trial=1",
                        "resources.gpu_per_trial=0.25", "resources.max_concurrent_trials=4",
                        f"sweep_dir={sweep_dir}"], cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    rows = trial_rows(sweep_dir)
    assert len(rows) == 4
    reports = [row for trial in rows.values() for row in trial]
    # Every epoch names the GPU Ray gave its trial, and TensorFlow trained on it.
    assert all(row.get("gpu_ids") for row in reports)
    assert all(row.get("gpu_peak_mb", 0) > 0 for row in reports)
    run = SweepRun("gpu", 0.0, rows, concurrency=4)
    assert most_at_once(run) >= 2  # trials overlapped on the one GPU
    total_mb = float(nvidia_smi("--query-gpu=memory.total")[0][0])
    # Memory growth: without it each trial's TensorFlow would reserve nearly all of the GPU.
    assert max(row["gpu_peak_mb"] for row in reports) < total_mb / 4
