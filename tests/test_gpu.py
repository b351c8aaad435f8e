"""The GPU path, where a GPU is visible (skipped elsewhere): trials get the GPU, four share it,
and TensorFlow in each takes only what it needs of the GPU's memory.

``python -m benchmarks.gpu`` measures the same on a whole sweep and records the figures.
"""

from __future__ import annotations

import pytest
from cli_helpers import run_cli, trial_rows

from benchmarks.common import SweepRun
from benchmarks.gpu import PACKED, GPUMemorySampler, failed_attempts, most_at_once, nvidia_smi

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_four_trials_share_one_gpu_each_taking_a_small_part_of_its_memory(tmp_path,
                                                                          fashion_mnist_dir):
    sweep_dir = tmp_path / "sweep"
    with GPUMemorySampler() as gpu_memory:
        finished = run_cli(["+experiment=smoke", "data=fashion_mnist",
                            f"data.path={fashion_mnist_dir}", "data.max_train_samples=4000",
                            "train.epochs=2", f"search.num_trials={PACKED}",
                            f"search.n_startup_trials={PACKED}", "scheduler=none",
                            "resources.cpu_per_trial=1", f"resources.gpu_per_trial={1 / PACKED}",
                            f"resources.max_concurrent_trials={PACKED}",
                            f"sweep_dir={sweep_dir}"], cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    rows = trial_rows(sweep_dir)
    assert len(rows) == PACKED
    # Each trial started beside the others at its first try: Tune retries a trial whose
    # TensorFlow could not start on the GPU, and the retry would hide it from the rows below.
    assert failed_attempts(sweep_dir / "trials") == (0, [])
    reports = [row for trial in rows.values() for row in trial]
    # Every epoch names the GPU Ray gave its trial, and TensorFlow trained on it.
    assert all(row.get("gpu_ids") for row in reports)
    assert all(row.get("gpu_peak_mb", 0) > 0 for row in reports)
    assert most_at_once(SweepRun("gpu", 0.0, rows, concurrency=PACKED)) == PACKED
    total_mb = float(nvidia_smi("--query-gpu=memory.total")[0][0])
    # Memory growth: without it each trial's TensorFlow would reserve nearly all of the GPU.
    # TensorFlow's own peak counts what it used of what it reserved; nvidia-smi what it reserved.
    assert max(row["gpu_peak_mb"] for row in reports) < total_mb / PACKED
    assert 0 < gpu_memory.peak_used_mb < total_mb / 2
