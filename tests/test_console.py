"""What a person sees: the console of a real smoke sweep, its sweep.log, and a copied sweep folder
that still reports. All read what the session's smoke sweep (conftest.py) left behind."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sweeper.data import DEBIAN_FASHION_MNIST
from tests.cli_helpers import (
    cli_env,
    run_in_terminal,
    sweep_study,
    trial_rows,
    trial_tensorboard_run,
)

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
    # Output to a pipe or file holds no terminal escape codes (colours, resets).
    assert "\x1b" not in smoke_sweep.stdout + smoke_sweep.stderr


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
    for line in ("Best: trial", "Sweep directory:",
                 "Best 5 of 6 trials by val_accuracy (max); all in trials.csv:", "Results: "):
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


@pytest.mark.slow
def test_one_numbering_on_the_console_in_summary_trials_csv_plots_tensorboard_and_study(
        console, smoke_sweep):
    """Trials are numbered in the order the searcher proposed them (Tune's creation order;
    Optuna's trial number + 1 in a sweep without a warm start), wherever a number shows."""
    from sweeper.report import plot_best_so_far
    from sweeper.results import records_from_trial_folders
    from sweeper.summary import Summary

    summary = smoke_sweep.summary
    numbers = {trial["trial_id"]: trial["number"] for trial in summary["trials"]}
    assert sorted(numbers.values()) == list(range(1, smoke_sweep.num_trials + 1))
    started = {re.search(r"\(id (\w+)\)", line).group(1): int(EVENT.match(line).group(1))
               for line in events_of(console, "started")}
    assert started == numbers
    with (smoke_sweep.sweep_dir / "trials.csv").open() as stream:
        assert {row["trial_id"]: int(row["trial"]) for row in csv.DictReader(stream)} == numbers
    study = sweep_study(smoke_sweep.sweep_dir, summary["experiment"])
    assert {t.user_attrs["ray_trial_id"]: t.number + 1 for t in study.trials} == numbers
    for trial_id, number in numbers.items():
        run = trial_tensorboard_run(smoke_sweep.sweep_dir, trial_id)
        assert run.path.split("/")[-1].startswith(f"trial{number:02d} "), run.path
    records = records_from_trial_folders(smoke_sweep.sweep_dir / "trials", summary["metric"],
                                         summary["mode"], smoke_sweep.max_epochs)
    assert {record.trial_id: record.number for record in records} == numbers
    # The plot numbers trials as everything else does, whichever started first: here the
    # first-numbered trial is made the last to start.
    first = min(records, key=lambda record: record.number)
    later = [{**row, "timestamp": row["timestamp"] + 10_000} for row in first.history]
    records = [dataclasses.replace(r, history=later) if r is first else r for r in records]
    figure = plot_best_so_far(Summary.from_dict(summary), records)
    points = figure.axes[1].collections[0].get_offsets()
    best = {trial["number"]: trial["best_metric_value"] for trial in summary["trials"]
            if trial["best_metric_value"] is not None and trial["status"] != "failed"}
    assert {int(x): pytest.approx(y) for x, y in points} == best


def test_help_says_what_the_tool_does_its_subcommand_and_most_used_settings(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sweeper", "--help"], cwd=tmp_path,
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sweeper: hyperparameter search")
    for text in ("python -m sweeper report SWEEP_DIR", "+experiment=", "search.num_trials=N",
                 "verbose=0|1|2", "experiment: cnn_lr, cnn_tuned, cnn_wide, smoke", "README",
                 "--config-dir FOLDER", "(in any order)", "--config-name best_config",
                 "FOLDER/model/NAME.yaml", "_target_:", "data.image_size=[H,W]",
                 "model.padding=same"):
        assert text in result.stdout, text
    assert "powered by Hydra" not in result.stdout
    # Every option listed for a group is one a user may choose (no schema entries).
    assert "\nmodel: backbone, cnn\n" in result.stdout and "schema" not in result.stdout


# What the command line itself can get wrong, each with the config otherwise valid: one line,
# exit code 2, nothing written (no sweep folder, no lock, no Hydra multirun folder).
COMMAND_LINE_MISTAKES = [
    (["--foo"], "--foo is invalid: not an option of python -m sweeper; options: --config-dir"),
    (["--confg-dir", "conf_mine"], "(did you mean --config-dir?)"),
    (["-m"], "-m is invalid: sweeper runs the search itself"),
    (["--multirun"], "--multirun is invalid: sweeper runs the search itself"),
    (["--config-dir"], "--config-dir is invalid: it needs a value: --config-dir FOLDER"),
    (["--config-dir", "--cfg", "job"], "--config-dir is invalid: it needs a value"),
    (["--config-dir", "missing"], "--config-dir=missing is invalid: "),
    (["--config-name"], "--config-name is invalid: it needs a value"),
    (["--config-name", "missing"], "--config-name=missing is invalid: no config missing.yaml"),
    (["--config-path", "conf_mine"], "--config-path is invalid: sweeper's own configs are"),
    (["--cfg", "bad"], "--cfg=bad is invalid: allowed: job, hydra, all"),
    (["--cfg"], "--cfg is invalid: it needs a value: --cfg job|hydra|all"),
    (["--help=yes"], "--help=yes is invalid: --help takes no value"),
    (["--cfg", "job", "model=cnn_schema"],
     "model=cnn_schema is invalid: not a config option; allowed: backbone, cnn"),
    (["model=cnn_schema"],
     "model=cnn_schema is invalid: not a config option; allowed: backbone, cnn"),
]
VALID_REST = ["+experiment=mine", "data=fashion_mnist", f"data.path={DEBIAN_FASHION_MNIST}"]


@pytest.fixture
def users_folder(tmp_path):
    """A working folder with a config folder of the user's own (conf_mine/experiment/mine)."""
    (tmp_path / "conf_mine" / "experiment").mkdir(parents=True)
    (tmp_path / "conf_mine" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /scheduler: none\n\nname: mine\n")
    return tmp_path


def _everything_in(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.parametrize(("mistake", "message"), COMMAND_LINE_MISTAKES,
                         ids=[" ".join(m) for m, _ in COMMAND_LINE_MISTAKES])
def test_a_command_line_mistake_is_one_line_exit_2_and_leaves_nothing(users_folder, mistake,
                                                                      message):
    before = _everything_in(users_folder)
    # The mistake after the overrides, where Hydra's own parser took no override after a flag.
    args = ["+experiment=mine", "--config-dir", "conf_mine", *VALID_REST[1:], *mistake]
    result = subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=users_folder,
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
        result.stderr
    assert result.stdout == ""
    assert _everything_in(users_folder) == before


@pytest.mark.parametrize("args", [["report"], ["report", "a", "b"], ["report", "--foo"],
                                  ["report", "missing"]])
def test_a_report_command_mistake_is_one_line_exit_2(tmp_path, args):
    result = subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=tmp_path,
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_options_and_overrides_come_in_any_order(users_folder):
    """Hydra's flags before, between and after the overrides compose the same config."""
    orders = [["--config-dir", "conf_mine", "--cfg", "job", *VALID_REST, "train.epochs=2"],
              [*VALID_REST[:1], "--config-dir", "conf_mine", *VALID_REST[1:], "--cfg", "job",
               "train.epochs=2"],
              [*VALID_REST, "train.epochs=2", "--cfg=job", "-cd", "conf_mine"]]
    printed = []
    for args in orders:
        result = subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=users_folder,
                                env=cli_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        printed.append(result.stdout)
    assert printed[0] == printed[1] == printed[2]
    assert "name: mine" in printed[0] and "epochs: 2" in printed[0]
    assert "\nscheduler:\n  name: none" in printed[0]


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


@pytest.mark.slow
def test_a_one_trial_sweep_at_a_terminal_counts_in_words_and_leaves_no_escape_codes(
        tmp_path, fashion_mnist_dir):
    """One trial of one epoch at a (pseudo-)terminal: every count reads right for one
    (``1 trial``, ``1 epoch``), and the terminal gets no escape code, at the end included
    (Ray's colorama wrote ESC[0m at exit)."""
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        code, seen = run_in_terminal(
            ["+experiment=smoke", "data=fashion_mnist", f"data.path={fashion_mnist_dir}",
             "search.num_trials=1", "train.epochs=1", "data.max_train_samples=300",
             "data.max_test_samples=100", "name=one"],
            cwd=tmp_path, env=cli_env(ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert code == 0, seen[-3000:]
    assert "\x1b" not in seen, repr(seen[-300:])
    assert "Sweep 'one': 1 trial of up to 1 epoch, " in seen
    assert "Trial 1 trained the full budget (1 epoch): " in seen
    assert "Trial 1 ended after 1 epoch " in seen
    assert "The trial by val_accuracy (max):" in seen
    assert "for a full-budget search of the same 1 trial (100%); early stopping saved 0 epochs" \
        in seen
    wrong = re.findall(r"\b(?:1 (?:trials|epochs|classes|nodes|CPUs|GPUs)|0 (?:trial|epoch)\b)"
                       r"|\w\(s\)", seen)
    assert wrong == [], wrong
