"""How the sweep drives Ray Tune: how many trials Tune may start at once, and which of
Tune's loggers run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from ray import tune
from ray.tune.execution.tune_controller import _get_max_pending_trials
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
from ray.tune.search import SearchGenerator
from ray.tune.utils.callback import _create_default_callbacks

from sweeper.config import to_sweep_config
from sweeper.space import build_search_space
from sweeper.tuner import (
    TUNE_SIGNALS,
    ProgressCsvOnce,
    ResultJsonOnce,
    make_scheduler,
    make_searcher,
    pending_trials,
    sweep_callbacks,
    tune_settings,
)

PENDING = "TUNE_MAX_PENDING_TRIALS_PG"


@pytest.mark.parametrize("overrides, cpus, gpus, expected", [
    (["resources.max_concurrent_trials=3"], 8, 0, 3),  # the limit, even where more would fit
    ([], 8, 0, 8),  # no limit: as many 1-CPU trials as the CPUs hold
    (["resources.cpu_per_trial=3"], 8, 0, 2),
    (["resources.cpu_per_trial=1", "resources.gpu_per_trial=0.25"], 8, 1, 4),  # GPUs bind
    (["resources.cpu_per_trial=4"], 2, 0, 1),  # never fewer than one
])
def test_pending_trials_is_the_concurrency_limit_or_what_fits(compose, overrides, cpus, gpus,
                                                             expected):
    cfg = to_sweep_config(compose("+experiment=smoke", "resources.max_concurrent_trials=null",
                                  *overrides))
    assert pending_trials(cfg, cpus, gpus) == expected


def test_tune_starts_as_many_trials_together_as_may_run(compose, ray_local, monkeypatch):
    """Ray Tune itself (its own auto-detection) waits for each trial of a custom searcher
    before asking for the next; inside the context it starts all that may run at once."""
    monkeypatch.delenv(PENDING, raising=False)
    cfg = to_sweep_config(compose("+experiment=smoke", "resources.max_concurrent_trials=2"))
    search = SearchGenerator(make_searcher(cfg.search, build_search_space(cfg), cfg.name,
                                            cfg.train.epochs))
    assert _get_max_pending_trials(search) == 1
    with tune_settings(cfg):
        assert _get_max_pending_trials(search) == 2
    assert PENDING not in os.environ  # nothing left behind for the next sweep in this process


def test_a_pending_trials_setting_of_the_users_own_is_kept(compose, ray_local, monkeypatch):
    monkeypatch.setenv(PENDING, "5")
    cfg = to_sweep_config(compose("+experiment=smoke", "resources.max_concurrent_trials=2"))
    with tune_settings(cfg):
        assert os.environ[PENDING] == "5"
    assert os.environ[PENDING] == "5"


def test_tune_writes_result_files_but_no_tensorboard_files_of_its_own(compose, ray_local,
                                                                      tmp_path, monkeypatch):
    """What Tune's fit() adds to the sweep's callbacks: no second JSON or CSV logger, and no
    TensorBoardX logger (sweeper's TensorBoardCallback writes the events); outside the
    context Tune's defaults come back."""
    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    cfg = to_sweep_config(compose("+experiment=smoke"))
    space = build_search_space(cfg)

    def loggers() -> list[type]:
        scheduler = make_scheduler(cfg.scheduler, "val_accuracy", "max", cfg.train.epochs)
        callbacks = sweep_callbacks(tmp_path, space, "val_accuracy", scheduler)
        kinds = (JsonLoggerCallback, CSVLoggerCallback, TBXLoggerCallback)
        return sorted((type(callback) for callback in _create_default_callbacks(callbacks)
                       if isinstance(callback, kinds)), key=lambda kind: kind.__name__)

    # sweeper's own writers of Tune's files (each epoch once) count as Tune's for Tune.
    with tune_settings(cfg):
        assert loggers() == [ProgressCsvOnce, ResultJsonOnce]
    assert loggers() == [ProgressCsvOnce, ResultJsonOnce, TBXLoggerCallback]


def test_trials_get_no_runtime_env_of_tunes(compose, ray_local, tmp_path, monkeypatch):
    """Tune gives its trial actors environment variables for PyTorch Lightning, a runtime env
    that makes Ray start every trial's worker through a second Python process (its
    setup_worker.py shim); inside the context the trials' runtime env is empty, a variable
    Tune forwards from the driver still reaches them, and afterwards Tune's own comes back."""
    cfg = to_sweep_config(compose("+experiment=smoke"))

    def trial_env_vars() -> str:
        def trainable(config):
            env_vars = ray.get_runtime_context().runtime_env.get("env_vars", {})
            tune.report({"env_vars": ",".join(sorted(env_vars))})

        tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(num_samples=1),
                           run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
        return tuner.fit()[0].metrics["env_vars"]

    with tune_settings(cfg):
        assert trial_env_vars() == ""
        monkeypatch.setenv("RAY_CHDIR_TO_TRIAL_DIR", "1")  # Tune's default, set explicitly
        assert trial_env_vars() == "RAY_CHDIR_TO_TRIAL_DIR"
    monkeypatch.delenv("RAY_CHDIR_TO_TRIAL_DIR")
    assert trial_env_vars() == "PL_DISABLE_FORK"


IDLE_WORKERS = """
import os, sys, time
sys.path.insert(0, {tests!r})
import ray
from cli_helpers import processes, process_tree
from sweeper.config import ClusterConfig
from sweeper.tuner import connect

def idle_workers():
    table = processes()
    return sum(1 for pid in process_tree(os.getpid(), table)
               if table[pid][2][0].startswith("ray::IDLE"))

started = time.monotonic()
ray.init(address="local", num_cpus=2, include_dashboard=False)  # Ray's default
while idle_workers() < 2 and time.monotonic() - started < 30:
    time.sleep(0.1)
waited = time.monotonic() - started
print("default", idle_workers())
ray.shutdown()
connect(ClusterConfig(num_cpus=2))  # sweeper's in-process Ray
time.sleep(max(3.0, 2 * waited))
print("sweeper", idle_workers())
ray.shutdown()
"""


def test_a_local_ray_starts_no_idle_workers_ahead_of_the_trials():
    """Ray's default starts an idle worker per CPU as the driver connects; starting them ahead
    of the trials gained nothing measured (see LOCAL_RAY_SYSTEM_CONFIG), so the in-process
    Ray starts none."""
    script = IDLE_WORKERS.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    counts = dict(line.split() for line in done.stdout.splitlines() if line.strip())
    assert counts == {"default": "2", "sweeper": "0"}, done.stderr[-2000:]


def test_ctrl_c_after_fit_is_not_left_to_tunes_handler(compose, ray_local, tmp_path):
    """Tune installs SIGINT and SIGUSR1 handlers for fit() and keeps them after a fit that was
    not interrupted; after the context the process's own handlers are back, so a Ctrl-C during
    the final retrain stops it instead of being swallowed."""
    cfg = to_sweep_config(compose("+experiment=smoke"))
    own = {number: signal.getsignal(number) for number in TUNE_SIGNALS}
    tuner = tune.Tuner(lambda config: tune.report({"x": 1.0}),
                       tune_config=tune.TuneConfig(num_samples=1),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
    with tune_settings(cfg):
        tuner.fit()
        during = {number: signal.getsignal(number) for number in TUNE_SIGNALS}
    assert during != own  # Tune's own, still installed after its fit
    assert {number: signal.getsignal(number) for number in TUNE_SIGNALS} == own


@pytest.mark.parametrize("overrides, ray_cpus, cpus", [
    ([], 16, 16),  # the in-process Ray: the machine is the sweep's, the retrain runs alone
    (["resources.cpu_per_trial=4"], 2, 4),  # never fewer than a trial's
    (["cluster.address=auto", "cluster.storage_path=/tmp/x"], 16, 1),  # a shared cluster
    (["search.reproducible=true"], 16, 1),  # trains as its trials did
])
def test_the_final_retrain_takes_the_machine_only_where_it_is_the_sweeps(
        compose, overrides, ray_cpus, cpus):
    from sweeper.trial import retrain_cpus

    assert retrain_cpus(compose("+experiment=smoke", *overrides), ray_cpus) == cpus


def test_a_real_sweep_never_runs_more_trials_at_once_than_its_limit(ray_local, tmp_path):
    """resources.max_concurrent_trials through Ray Tune itself: 6 dummy trials (the scaling
    benchmark's, through the driver a sweep builds), a limit of 2, each trial asking a quarter
    CPU so that Ray alone would run 8 at once. The searcher holds the limit (it counts its live
    trials at every step of Tune's loop: issue 26 made that count O(1)); every trial ends."""
    import json

    from benchmarks.scaling import dummy_sweep

    cfg, tuner = dummy_sweep(tmp_path / "sweep", concurrent=2, interval=1.0, trials=6,
                             epochs=3, grace=3, trial_cpus=0.25)
    with tune_settings(cfg):
        grid = tuner.fit()
    spans = []
    for result in grid:
        rows = [json.loads(line) for line in
                (Path(result.path) / "result.json").read_text().splitlines()]
        assert [row["epoch"] for row in rows] == [1, 2, 3]
        # From the start of its first epoch (1 s before its first report) to its last report.
        spans.append((rows[0]["reported_at"] - 1.0, rows[-1]["reported_at"]))
    assert len(spans) == 6
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    at_once, most = 0, 0
    for _, step in edges:
        at_once += step
        most = max(most, at_once)
    assert most == 2, spans


@pytest.mark.slow
def test_a_sweep_whose_last_trial_fails_after_the_budget_ends_at_once(compose, ray_local,
                                                                      tmp_path, caplog):
    """Issue 41: with the time budget spent while the last trial failed, Tune waited up to
    600 s for the searcher's next trial (nothing pending, running or paused), deaf to Ctrl-C.
    Now the searcher is finished once the budget is spent: the run ends when its last trial
    does. The trial reports an epoch at once (it runs when the budget ends), then fails."""
    import time

    from sweeper.layout import SweepLayout
    from sweeper.scheduler import TIME_BUDGET
    from sweeper.study import open_storage, study_location
    from sweeper.sweep import validated
    from sweeper.tuner import build_tuner

    def fails_after_the_budget(config, fail_after_s):
        tune.report({"val_accuracy": 0.5, "val_loss": 0.5, "epoch": 1})
        time.sleep(fail_after_s)
        raise RuntimeError("this trial fails once the time budget is spent")

    cfg, space = validated(compose(
        "+experiment=smoke", "data=fashion_mnist", f"sweep_dir={tmp_path}/sweep",
        "search.num_trials=3", "resources.max_concurrent_trials=1", "scheduler=none",
        "recovery.max_failures=0", "search.time_budget_s=8"))
    layout = SweepLayout.for_config(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(fails_after_the_budget, fail_after_s=15), {"cpu": 1})
    tuner = build_tuner(cfg, space, None, layout,
                        open_storage(study_location(None, layout.root)), trainable=trainable)
    TIME_BUDGET.arm(8)
    started = time.monotonic()
    try:
        with tune_settings(cfg), caplog.at_level("INFO", logger="sweeper.events"):
            grid = tuner.fit()
    finally:
        TIME_BUDGET.arm(None)
    took = time.monotonic() - started
    assert took < 120, took  # 600 s and more before the fix; about 20 s now
    assert len(grid) == 1 and grid[0].error is not None  # the one trial, failed
    spent = [record.getMessage() for record in caplog.records
             if record.getMessage().startswith("The time budget of 8 s is spent: ")]
    assert spent and "trial 1 finishes the epoch it trains, then pauses" in spent[0], spent


def test_a_searcher_sees_tunes_stop_request_at_once(compose):
    """Ctrl-C during Tune's wait for a new trial (up to 600 s, asking only whether the
    searcher is finished) ended the run only when the wait did: the searcher is finished as
    soon as Tune's own Ctrl-C handler has been called."""
    from ray.tune.tune import _setup_signal_catching

    from sweeper.searcher import BudgetedSearch

    cfg = to_sweep_config(compose("+experiment=smoke"))
    search = BudgetedSearch(make_searcher(cfg.search, build_search_space(cfg), "s", 1))
    search.add_configurations({"s": {"run": lambda config: None, "num_samples": 3}})
    own = signal.getsignal(signal.SIGINT)
    try:
        _setup_signal_catching()  # what tune.run installs for its loop
        assert not search.is_finished()
        os.kill(os.getpid(), signal.SIGINT)
        assert search.is_finished()
    finally:
        signal.signal(signal.SIGINT, own)
