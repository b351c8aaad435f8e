"""The benchmarks' own arithmetic: what they report must follow from the trials' rows."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest

from benchmarks.common import CpuSampler, SweepRun
from benchmarks.plots import median_curve, plot_search, plot_utilization


def _trial(entered: float, fit: float, first_step: float, reports: list[float]) -> list[dict]:
    return [{"trial_started_at": entered, "fit_started_at": fit, "reported_at": reported,
             "first_step_s": first_step if number == 0 else 0.0, "train_time_s": 1.0,
             "val_time_s": 0.1, "val_accuracy": 0.5}
            for number, reported in enumerate(reports)]


def test_hand_over_pairs_the_kth_trial_to_end_with_the_kth_to_take_a_place():
    # Two places: a and b start together; c takes the place of a (ends first at 5), d of b.
    run = SweepRun("two places", 0.0, {
        "a": _trial(0.0, 3.0, 1.0, [5.0]),
        "b": _trial(0.0, 3.5, 1.0, [6.0, 8.0]),
        "c": _trial(5.1, 5.2, 0.1, [9.0]),
        "d": _trial(8.2, 8.3, 0.1, [12.0]),
    }, concurrency=2)
    assert run.end_to_next_first_step_s == pytest.approx(0.35)  # (5.3 - 5.0), (8.4 - 8.0)
    assert run.start_to_first_step_s == pytest.approx(2.1)  # median of 4, 4.5, 0.2, 0.2


def test_hand_over_is_nan_when_no_trial_waited_for_a_place():
    run = SweepRun("one trial", 0.0, {"a": _trial(0.0, 1.0, 0.5, [2.0])}, concurrency=2)
    assert math.isnan(run.end_to_next_first_step_s)


def test_the_start_ends_when_the_last_of_the_first_trials_starts_its_fit():
    run = SweepRun("two places", 0.0, {
        "a": _trial(0.0, 3.0, 1.0, [5.0]),
        "b": _trial(0.1, 3.5, 1.0, [6.0]),
        "c": _trial(5.1, 5.2, 0.1, [9.0]),  # a later trial: not part of the start
    }, concurrency=2)
    assert run.start_ended_at == 3.5


def test_cpu_sampler_sees_this_process_busy_and_then_idle():
    # Spin for 0.6 s of this process's own CPU time, not of wall time: on a loaded machine
    # (CI shares its 2 cores with Ray) the spin then takes longer, and the share this
    # process had is known from os.times, independently of the sampler.
    with CpuSampler() as cpu:
        spin_from, cpu_from = time.time(), time.process_time()
        while time.process_time() - cpu_from < 0.6:
            pass
        spin_to, cpu_spun = time.time(), time.process_time() - cpu_from
        time.sleep(0.6)
        rest_to = time.time()
    cores = os.cpu_count() or 1
    busy, own = cpu.busy_shares(spin_from, spin_to)
    expected = cpu_spun / ((spin_to - spin_from) * cores)
    assert own == pytest.approx(expected, abs=0.2 / cores + 0.05)  # a 20 Hz sample either side
    assert busy >= own - 0.05  # the machine was at least as busy as this process
    _, own_resting = cpu.busy_shares(spin_to + 0.1, rest_to)
    assert own_resting < 0.1
    # The machine's busy CPU-seconds while this process spun 0.6 CPU-seconds.
    assert cpu.busy_seconds(spin_from, spin_to) >= 0.6 * 0.7  # less a sample either side


def test_cpu_sampler_reports_nan_where_there_is_no_proc_stat(monkeypatch, tmp_path):
    monkeypatch.setattr(CpuSampler, "PROC_STAT", str(tmp_path / "missing"))
    with CpuSampler() as cpu:
        pass
    assert all(math.isnan(share) for share in cpu.busy_shares(0.0, time.time()))
    assert math.isnan(cpu.busy_seconds(0.0, time.time()))


def test_median_curve_keeps_each_runs_best_and_counts_nothing_before_its_first_report():
    early = [[1, 0.5], [4, 0.8]]
    late = [[3, 0.6], [5, 0.9]]
    never_better = [[2, 0.4]]
    assert median_curve([early, late, never_better], 6) == [0.0, 0.4, 0.5, 0.6, 0.8, 0.8]


def test_fixed_costs_table_shows_each_cost_measured_and_skips_those_an_older_run_lacks():
    from benchmarks.__main__ import _fixed_costs_table

    older = {"checkpoint_ms": {"sweeper": 3.0, "Keras archive (before)": 27.0},
             "first_step_after_handover_ms": {"sweeper": 15.0, "seed reset (before)": 120.0}}
    newer = {**older, "new_model_first_step_ms": {"sweeper": 400.0, "in the trace": 800.0}}
    assert "new model" not in _fixed_costs_table(older)
    last_row = _fixed_costs_table(newer).splitlines()[-1]
    assert last_row == "| build and first step of a new model | 400 | 800 | 2 |"


def test_plots_are_written(tmp_path):
    breakdown = {"train": 0.8, "validation": 0.03, "start": 0.1, "reporting": 0.01,
                 "switching": 0.03, "tail": 0.03}
    rows = [{"experiment": "short", "sweep": "sweeper", "utilization": 0.8,
             "breakdown": breakdown}]
    search = {"target": 0.7, "methods": {
        "TPE + ASHA": {"per_seed": [{"curve": [[1, 0.5], [3, 0.75]], "epochs_trained": 8}]},
        "random, no early stopping": {"per_seed": [{"curve": [[9, 0.72]],
                                                    "epochs_trained": 18}]},
    }}
    for path in (plot_utilization(rows, tmp_path / "u.png"),
                 plot_search(search, tmp_path / "s.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_checks_count_the_failed_attempts_of_retried_trials(ray_local, tmp_path):
    """A trial that failed and was retried leaves only Tune's failure count and error file: the
    GPU packing check must see it (trials that could not start beside others were retried)."""
    from ray import tune

    from benchmarks.gpu import checks, failed_attempts

    def fails_once_when_x_is_1(config: dict) -> None:  # nested: Ray's workers get it by value
        marker = Path(config["marker_dir"]) / f"failed_{config['x']}"
        if config["x"] == 1 and not marker.exists():
            marker.touch()
            raise RuntimeError("cudaSetDevice() on GPU:0 failed. Status: out of memory")
        tune.report({"score": config["x"]})

    grid = tune.Tuner(
        fails_once_when_x_is_1,
        param_space={"x": tune.grid_search([0, 1]), "marker_dir": str(tmp_path)},
        run_config=tune.RunConfig(name="trials", storage_path=str(tmp_path / "sweep"),
                                  failure_config=tune.FailureConfig(max_failures=2),
                                  verbose=0)).fit()
    assert grid.num_errors == 0  # the retry finished: the result grid shows nothing

    failures, errors = failed_attempts(tmp_path / "sweep" / "trials")
    assert failures == 1
    assert errors == ["RuntimeError: cudaSetDevice() on GPU:0 failed. Status: out of memory"]
    assert failed_attempts(tmp_path / "no sweep") == (0, [])

    run = {"failed_attempts": failures, "errors": errors, "most_at_once": 4}
    result = {"packing": {"runs": {"packed": run, "one at a time": {**run, "failed_attempts": 0}},
                          "gpu_memory_total_mb": None}}
    assert checks(result, gpu=False) == [
        "1 trial attempts failed in the packed sweep (RuntimeError: cudaSetDevice() on GPU:0 "
        "failed. Status: out of memory)"]
    assert checks({}, gpu=True) == []  # nothing measured yet, nothing failed


def test_worker_memory_growth_is_the_slope_after_the_first_quarter():
    from benchmarks.worker_memory import growth_per_trial

    warm_up = [700.0, 760.0, 770.0, 771.0]  # the allocator's and TensorFlow's first trials
    steady = [800.0 + 3.9 * trial for trial in range(12)]
    assert growth_per_trial(warm_up + steady) == pytest.approx(3.9, rel=0.05)
    assert growth_per_trial([900.0] * 20) == 0.0
    assert growth_per_trial([900.0]) == 0.0


def test_the_data_loading_table_shows_loadings_share_against_the_arrays(tmp_path, monkeypatch):
    from benchmarks import data_loading

    row = {"seconds": 2.5, "cpu_seconds": 4.0, "peak_mb": 900.0, "baseline_mb": 300.0,
           "data_mb": 200.0, "shape": [28, 28, 1], "images": 20000}
    table = data_loading.table({"PNG folder": row})
    assert "| PNG folder | 20000 | 28x28x1 | 2.50 | 1.60 | 900 | 300 | 600 | 200 | 3.00 |" in table
    # Recording replaces the section of an earlier run and keeps the sections around it.
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(data_loading, "RESULTS", results)
    section = data_loading.SECTION
    results.write_text(f"# Benchmark results\n\n{section}\n\nold\n\n## Later\n\nkept\n")
    data_loading.record(f"{data_loading.SECTION}\n\nnew\n")
    assert results.read_text() == (f"# Benchmark results\n\n{data_loading.SECTION}\n\nnew\n"
                                   "\n## Later\n\nkept\n")


def test_the_own_model_table_sets_the_users_model_against_the_cnn(tmp_path):
    from benchmarks import own_model

    cnn = {"params": 1000, "checks_s": 2.0, "tensorflow": False, "build_s": 0.0,
           "trial_s": [4.0, 1.0, 1.0, 1.0]}
    mine = {"params": 1000, "checks_s": 8.0, "tensorflow": True, "build_s": 0.5,
            "trial_s": [5.0, 1.5, 1.5, 1.5]}
    table = own_model.table({"built-in CNN": cnn, "mine": mine})
    assert "| built-in CNN | 1000 | 2.00 (no) | 0.00 | 4.00 | 1.00 |" in table
    assert "| user's / built-in | 1.00 | 4.00 |  | 1.25 | 1.50 |" in table
    # python -m benchmarks, which writes the file anew, keeps the section it does not measure.
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Benchmark results\n\n{own_model.SECTION}\n\nfigures\n\n## Later\n")
    assert own_model.recorded_section(results) == f"{own_model.SECTION}\n\nfigures\n"


def test_scaling_projection_is_trials_times_cost_over_epoch():
    from benchmarks.scaling import project

    fits, saturated = project(1.0, 1.0, (512,))[0], project(4.0, 1.0, (512,))[0]
    assert fits["driver_busy"] == pytest.approx(0.512) and fits["speed"] == 1.0
    assert saturated["driver_busy"] == pytest.approx(2.048)
    assert saturated["speed"] == pytest.approx(1 / 2.048)


def test_the_cnn_tuned_record_sets_each_sweep_in_its_own_column_with_its_own_load(smoke_sweep,
                                                                                  tmp_path):
    """Two real sweep folders (the session's smoke sweep, and a copy of it whose summary
    names another best trial) in two columns, each with the load samples of its own hour
    from one load file (samples before, between and after the runs are left out)."""
    import json
    import shutil
    from datetime import datetime

    from benchmarks import cnn_tuned

    assert smoke_sweep.returncode == 0, smoke_sweep.stderr[-2000:]
    wide = tmp_path / "cnn_wide"
    shutil.copytree(smoke_sweep.sweep_dir, wide, ignore=shutil.ignore_patterns("trials"))
    summary = json.loads((wide / "summary.json").read_text())
    summary["best"]["trial_id"] = "widebest"
    (wide / "summary.json").write_text(json.dumps(summary))
    load = tmp_path / "load.txt"
    load.write_text("04:58:00 9.0 1 1\n05:10:00 1.0 1 1\n05:50:00 3.0 1 1\n"
                    "06:05:00 40.0 1 1\n06:20:00 2.5 1 1\n07:30:00 70.0 1 1\n")
    day = "%Y-%m-%d %H:%M"
    runs = [cnn_tuned.Run("cnn_tuned", smoke_sweep.sweep_dir, cnn_tuned.COMMAND,
                          datetime.strptime("2026-12-01 05:00", day),
                          datetime.strptime("2026-12-01 06:00", day)),
            cnn_tuned.Run("cnn_wide, same budget", wide, cnn_tuned.WIDE_COMMAND,
                          datetime.strptime("2026-12-01 06:10", day),
                          datetime.strptime("2026-12-01 07:10", day))]
    text = cnn_tuned.section(runs, load)

    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:]
            for line in text.splitlines() if line.startswith("| ")}
    best = smoke_sweep.summary["best"]
    assert rows["best trial"][0].startswith(best["trial_id"])
    assert rows["best trial"][1].startswith("widebest")
    assert rows["validation val_accuracy"][0] == f"{best['metric_value']:.4f}"
    assert rows["load average during the run (1 min, 2 cores)"] == [
        "min 1.0, median 2.0, max 3.0 (2 samples)", "min 2.5, median 2.5, max 2.5 (1 samples) |"]
    assert rows["wall time (start to results)"][0] == "3600 s"
    assert "(folder `cnn_wide`, 2026-12-01 06:10-07:10 UTC)" in text
    # A run past midnight keeps the samples on both sides of it.
    assert cnn_tuned.load_figures(load, datetime.strptime("2026-11-30 23:00", day),
                                  datetime.strptime("2026-12-01 05:20", day))["max"] == 9.0
    # Recorded, cnn_tuned's column is kept as written when its folder is gone and only the
    # cnn_wide hour is read anew (the two hours ran on different machines).
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## 5. Other\n\nkept\n")
    cnn_tuned.common.record_section(results, cnn_tuned.SECTION, text)
    kept = cnn_tuned.recorded_run("cnn_tuned", results)
    assert kept.recorded[1]["best trial"] == rows["best trial"][0]
    assert kept.recorded[1]["load average during the run (1 min, 2 cores)"] == (
        "min 1.0, median 2.0, max 3.0 (2 samples)")
    again = cnn_tuned.section([kept, runs[1]], load)
    assert [line for line in again.splitlines() if line.startswith("| ")] == [
        line for line in text.splitlines() if line.startswith("| ")]
    assert f"(folder `{smoke_sweep.sweep_dir.name}`, 2026-12-01 05:00-06:00 UTC)" in again
    assert cnn_tuned.recorded_run("cnn_wide", results) is None


def test_the_bookkeeping_table_sets_each_drivers_wall_time_against_the_ideal():
    import argparse

    from benchmarks.__main__ import _bookkeeping, _bookkeeping_section

    rows = [{"driver": "Ray Tune, default loggers", "concurrent": 8, "interval_s": 0.5,
             "trials": 40, "results": 40, "wall_s": 35.0, "cpu_s": 2.0, "ideal_s": 2.5},
            {"driver": "sweeper", "concurrent": 8, "interval_s": 0.5, "trials": 40,
             "results": 40, "wall_s": 5.0, "cpu_s": 1.0, "ideal_s": 2.5}]
    text = _bookkeeping_section({"rows": rows, "load": [1.0, 2.0, 3.0]})
    assert "## 7. Bookkeeping: 40 trials of 0.5 s, 8 at once" in text
    assert "| Ray Tune, default loggers | 40 | 40 | 35 | 2.5 | 14.00x | 50.0 |" in text
    assert "| sweeper | 40 | 40 | 5 | 2.5 | 2.00x | 25.0 |" in text
    assert _bookkeeping("2000:16:1") == (2000, 16, 1.0)
    for wrong in ("0:0:1", "5:x:1", "5:2"):
        with pytest.raises(argparse.ArgumentTypeError, match="all above 0"):
            _bookkeeping(wrong)
