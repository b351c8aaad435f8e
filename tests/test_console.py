"""What a person sees: the console of a real smoke sweep, its sweep.log, and a copied sweep folder
that still reports. All read what the session's smoke sweep (conftest.py) left behind."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from sweeper.data import DEBIAN_FASHION_MNIST
from tests.cli_helpers import cli_env, trial_rows

# Lines that used to fill the console and that no user can act on (issue 25).
KNOWN_NOISE = (
    "cuInit", "absl::InitializeLog", "Could not find cuda drivers", "cpu_feature_guard",
    "Experiment state snapshotting", "Token authentication", "Tuner.restore",
    "fit_started_at", "first_step_s", "node_id", "╭", "│", "completed after",
    "Sweep config:", "View detailed results", "A new study created",
    "Checkpoint successfully created", "Trial status:",
)
# The console's lines besides one per trial event: the plan, the results table and summary.
OTHER_LINES_AT_MOST = 40
EVENT = re.compile(r"^Trial (\d+) (started|epoch|continued|stopped|trained|ended|failed)\b")
TIMESTAMP = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\]"


@pytest.fixture(scope="module")
def console(smoke_sweep):
    assert smoke_sweep.returncode == 0, smoke_sweep.stderr[-3000:]
    return (smoke_sweep.stdout + smoke_sweep.stderr).splitlines()


def events_of(lines: list[str], kind: str) -> list[str]:
    return [line for line in lines if (match := EVENT.match(line)) and match.group(2) == kind]


@pytest.mark.slow
def test_the_console_is_one_line_per_trial_event_plus_a_few(console, smoke_sweep):
    events = [line for line in console if EVENT.match(line)]
    assert len(console) - len(events) <= OTHER_LINES_AT_MOST, "\n".join(console)
    noise = [line for line in console if any(known in line for known in KNOWN_NOISE)]
    assert noise == []


@pytest.mark.slow
def test_each_trial_event_is_one_line(console, smoke_sweep):
    summary, num_trials = smoke_sweep.summary, smoke_sweep.num_trials
    started = events_of(console, "started")
    assert len(started) == num_trials
    assert all("lr=" in line for line in started)  # with its sampled value
    # The number a trial has on the console is its number in summary.json and trials.csv.
    numbers = {re.search(r"\(id (\w+)\)", line).group(1):
               int(re.search(r"Trial (\d+) started", line).group(1)) for line in started}
    assert numbers == {trial["trial_id"]: trial["number"] for trial in summary["trials"]}
    best_line = f"Best: trial {summary['best']['number']} (id {summary['best']['trial_id']}) "
    assert any(line.startswith(best_line) for line in console)
    rows = trial_rows(smoke_sweep.sweep_dir)
    epochs = events_of(console, "epoch")
    assert len(epochs) == sum(len(trial) for trial in rows.values()) == summary["epochs_trained"]
    assert all("val_accuracy" in line and " s)" in line for line in epochs)
    decisions = [line for kind in ("continued", "stopped", "trained")
                 for line in events_of(console, kind)]
    assert len(decisions) == len(summary["scheduler_decisions"])
    assert len(events_of(console, "stopped")) == sum(
        d["decision"] == "stop" for d in summary["scheduler_decisions"])
    assert len(events_of(console, "ended")) == num_trials
    last = events_of(console, "ended")[-1]
    best = summary["best"]["metric_value"]
    assert f"[{num_trials} done, 0 running, 0 pending; best val_accuracy {best:.4f}" in last


@pytest.mark.slow
def test_the_composed_config_is_in_sweep_log_and_hydra_not_on_the_console(console, smoke_sweep):
    log = (smoke_sweep.sweep_dir / "sweep.log").read_text()
    assert "Sweep config:\nname: smoke" in log
    assert (smoke_sweep.sweep_dir / ".hydra" / "config.yaml").is_file()
    assert not any(line.startswith("name: smoke") for line in console)


@pytest.mark.slow
def test_sweep_log_records_every_trial_event_with_its_time_and_the_summary(console, smoke_sweep):
    log = (smoke_sweep.sweep_dir / "sweep.log").read_text()
    for line in console:
        if EVENT.match(line):
            assert re.search(TIMESTAMP + r".*\] - " + re.escape(line) + "$", log, re.M), line
    for line in ("Best: trial", "Sweep directory:", "Best trials (val_accuracy, max):",
                 "Results: "):
        assert line in log
    # Ray's and TensorFlow's warnings are not on the console.
    assert [line for line in console if "WARNING" in line] == []
    # Issue 26: the cause of Tune's snapshot warning is gone (no save forced per checkpoint),
    # not only its line from the console.
    assert "snapshotting has been triggered" not in log


@pytest.mark.slow
def test_a_copied_sweep_folder_still_reports(smoke_sweep, tmp_path):
    """``cp -r`` the sweep elsewhere, move the original out of the way, and report the copy:
    summary.json's paths are relative, so every file it names is found in the copy."""
    original = smoke_sweep.sweep_dir
    copy = tmp_path / "copied sweep"
    shutil.copytree(original, copy)
    hidden = original.with_name(original.name + ".away")
    original.rename(hidden)
    try:
        result = subprocess.run([sys.executable, "-m", "sweeper", "report", str(copy)],
                                cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                                timeout=600)
    finally:
        hidden.rename(original)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["paths"]["best_model"] == "best_model.keras"
    assert str(original) not in (copy / "summary.json").read_text()
    for key in ("best_model", "best_config", "report", "trials_csv"):
        assert f"{copy / summary['paths'][key]}" in result.stdout, key
        assert (copy / summary["paths"][key]).is_file(), key
    assert (copy / summary["best"]["checkpoint"]).is_dir()
    assert str(original) not in (copy / "best_config.yaml").read_text()


def test_help_says_what_the_tool_does_its_subcommand_and_most_used_settings(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sweeper", "--help"], cwd=tmp_path,
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sweeper: hyperparameter search")
    for text in ("python -m sweeper report SWEEP_DIR", "+experiment=", "search.num_trials=N",
                 "verbose=0|1|2", "experiment: cnn_lr, cnn_tuned, cnn_wide, smoke", "README"):
        assert text in result.stdout, text
    assert "powered by Hydra" not in result.stdout


def test_report_help_prints_help_and_exits_zero(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sweeper", "report", "--help"], cwd=tmp_path,
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m sweeper report SWEEP_DIR")
    assert "training nothing" in result.stdout


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's Fashion-MNIST absent")
def test_offline_first_run_suggests_fashion_mnist_and_leaves_nothing_behind(tmp_path):
    """The default sweep downloads MNIST; offline (here: a closed port) it ends with one line
    that names Debian's Fashion-MNIST, and no sweep folder or half-downloaded file stays."""
    keras_home = tmp_path / "keras_home"
    env = {**cli_env(), "KERAS_HOME": str(keras_home)}
    result = subprocess.run(
        [sys.executable, "-m", "sweeper", "+experiment=cnn_lr", "data.url=http://127.0.0.1:9/m.npz",
         "data.sha256=null"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.url=")
    assert "download failed" in lines[0] and "use data=fashion_mnist" in lines[0]
    assert not (tmp_path / "sweeps").exists()
    assert not list(keras_home.glob("datasets/*mnist*"))
