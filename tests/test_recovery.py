"""Nothing lost: a killed trial worker, a killed driver, Ctrl-C (real processes, real signals)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from cli_helpers import (
    cli_env,
    kill_tree,
    run_cli,
    start_cli,
    sweep_study,
    trial_rows,
    trial_tensorboard_run,
    wait_for,
)

import sweeper
from sweeper.compat import checkpoints_in_saved_state, newest_experiment_state

pytestmark = pytest.mark.slow

SMOKE = ["+experiment=smoke", "data=fashion_mnist"]


def _summary(sweep_dir):
    return json.loads((sweep_dir / "summary.json").read_text())


def _first_epoch_reported(sweep_dir):
    """(trial id, worker pid) of a trial whose last report is its first epoch, if any."""
    for trial_id, rows in trial_rows(sweep_dir).items():
        if rows and rows[-1]["epoch"] == 1:
            return trial_id, rows[-1]["pid"]
    return None


def _resumed_after_kill(process, args, cwd):
    """The same command run again after the driver and its Ray were killed (SIGKILL)."""
    assert process.returncode == -signal.SIGKILL
    resumed = run_cli(args, cwd=cwd)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return resumed


def _bests_shown(output):
    """Each "; best <metric> 0.1234 (trial N)" of the console's status lines, in order."""
    return re.findall(r"; best \S+ [0-9.]+ \(trial \d+\)", output)


def _first_status(output):
    """The first console line with the running count of trials (a trial started or
    continued, on a resumed run before any epoch of its own)."""
    return next(line for line in output.splitlines() if " pending" in line and "running," in line)


def _latest(folder, pattern):
    """The file of the newest Ray session: names end in the session's start time."""
    return max(folder.glob(pattern), key=lambda path: path.name)


# Trials whose worker a test kills after their first epoch reached the sweep folder: long
# enough that the kill lands before their last epoch, however fast the machine.
EPOCHS = 5


def test_killed_trial_worker_is_retried_from_its_last_checkpoint(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [*SMOKE, f"sweep_dir={sweep_dir}", "search.num_trials=2", "scheduler=none",
            f"train.epochs={EPOCHS}", "data.max_train_samples=6000"]
    process = start_cli(args, cwd=tmp_path, log=tmp_path / "run.log")
    try:
        trial_id, worker_pid = wait_for(lambda: _first_epoch_reported(sweep_dir), 600,
                                       "a trial's first epoch")
        os.kill(worker_pid, signal.SIGKILL)  # mid-epoch 2 or so of that trial, never its last
        assert process.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        kill_tree(process)

    rows = trial_rows(sweep_dir)[trial_id]
    before = [row["epoch"] for row in rows if row["pid"] == worker_pid]
    after = [row["epoch"] for row in rows if row["pid"] != worker_pid]
    # The retry continued from the checkpoint of the last epoch the killed worker reported.
    assert after, "the killed trial was never retried"
    assert after[0] == before[-1] + 1
    assert before + after == list(range(1, EPOCHS + 1))
    # The console says so in sweeper's words, not with Tune's worker line.
    console = (tmp_path / "run.log").read_text()
    # A retry after a failure says it is one (issue 41: it looked like a second start).
    retried = next(line for line in console.splitlines() if " retried (attempt 2 of " in line)
    assert f"from its checkpoint of epoch {before[-1]} (id {trial_id})" in retried
    assert "failed: The actor died unexpectedly" in console and "it is retried" in console
    assert "Restored on" not in console

    summary = _summary(sweep_dir)
    assert summary["num_trials"] == 2
    assert all(trial["status"] == "completed" for trial in summary["trials"])
    run = trial_tensorboard_run(sweep_dir, trial_id)
    assert [event.step for event in run.Scalars("val_accuracy")] == list(range(1, EPOCHS + 1))


def test_an_epoch_trained_again_after_a_restore_is_recorded_once(tmp_path):
    """Issue 20: a trial restored from a checkpoint older than its last reported epoch trains
    that epoch again (on a loaded machine Tune logged a result whose checkpoint's save had not
    come back when the node died: 7 results for 6 epochs). Here checkpoints come every 2
    epochs and the worker dies in epoch 4, so the retry starts from epoch 2's checkpoint and
    reports epoch 3 again: every record keeps one value per epoch, the first."""
    sweep_dir = tmp_path / "sweep"
    args = [*SMOKE, f"sweep_dir={sweep_dir}", "search.num_trials=1", "scheduler=none",
            "train.epochs=5", "data.max_train_samples=12000", "recovery.checkpoint_every=2"]
    process = start_cli(args, cwd=tmp_path, log=tmp_path / "run.log")
    try:
        def third_epoch_reported():
            for trial_id, rows in trial_rows(sweep_dir).items():
                if rows and rows[-1]["epoch"] == 3:
                    return trial_id, rows[-1]["pid"], rows[-1]["val_accuracy"]
            return None

        trial_id, worker_pid, third = wait_for(third_epoch_reported, 600, "epoch 3", every=0.1)
        os.kill(worker_pid, signal.SIGKILL)  # in epoch 4: its checkpoint is epoch 2's
        assert process.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        kill_tree(process)

    rows = trial_rows(sweep_dir)[trial_id]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4, 5]
    # Epochs 1-3 from the killed worker, 4-5 from its retry: the retry began at epoch 2's
    # checkpoint (there is none of epoch 3), so it trained epoch 3 again, unrecorded.
    assert [row["pid"] == worker_pid for row in rows] == [True, True, True, False, False]
    assert rows[2]["val_accuracy"] == third
    progress = (sweep_dir / "trials" / f"trial_{trial_id}" / "progress.csv").read_text()
    assert len(progress.strip().splitlines()) == 1 + 5  # header and one row per epoch
    run = trial_tensorboard_run(sweep_dir, trial_id)
    assert [event.step for event in run.Scalars("val_accuracy")] == [1, 2, 3, 4, 5]
    study = sweep_study(sweep_dir, "smoke")
    assert study.trials[0].intermediate_values[3] == pytest.approx(third)
    assert sorted(study.trials[0].intermediate_values) == [1, 2, 3, 4, 5]
    summary = _summary(sweep_dir)
    assert summary["trials"][0]["epochs_trained"] == 5
    assert summary["epochs_trained"] == 5


def _ended_in_saved_state(sweep_dir):
    """Ids of the trials that the experiment state in the sweep folder saw end (TERMINATED):
    what a resume restores as ended. None while no state (or a half-copied one) is there."""
    try:
        state = json.loads(_latest(sweep_dir / "trials", "experiment_state-*.json").read_text())
    except (ValueError, OSError):
        return None
    trials = [json.loads(trial_json) for trial_json, _ in state["trial_data"]]
    return {trial["trial_id"] for trial in trials if trial["status"] == "TERMINATED"}


def test_killed_driver_resumes_with_searcher_and_asha_history(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # 8 trials: once two have ended, six remain for the resume (ASHA stops most after one
    # epoch of about a second here: five trials left could all end before the kill).
    args = [*SMOKE, f"sweep_dir={sweep_dir}", "search.num_trials=8", "train.epochs=3",
            "data.max_train_samples=2000"]
    process = start_cli(args, cwd=tmp_path, log=tmp_path / "first.log")
    try:
        def two_trials_ended():
            ended = _ended_in_saved_state(sweep_dir) if (sweep_dir / "trials").is_dir() else None
            return ended if ended and len(ended) >= 2 else None

        # Kill the driver and its Ray once the saved state has two trials ended. The state
        # reaches the sweep folder after the results it names (compat.snapshots_on_a_timer).
        ended_before = wait_for(two_trials_ended, 600, "two finished trials", every=0.1)
        before = trial_rows(sweep_dir)
    finally:
        kill_tree(process)
    # sweeper.load reads the killed sweep from its folders, numbered as the console numbered.
    loaded = sweeper.load(sweep_dir)
    assert loaded.state == "interrupted"
    numbers = {trial.trial_id: trial.number for trial in loaded.trials}
    assert ended_before <= set(numbers) and all(numbers.values())
    # And the worst moment of the study's write path on top (issue 26): what a kill inside
    # Optuna's JournalFileBackend.append_logs leaves, the first bytes of an entry with no end,
    # and the journal's lock. The resume drops both and keeps every whole entry.
    journal = sweep_dir / "optuna.log"
    entries = journal.read_bytes()
    entries = entries[:entries.rfind(b"\n") + 1]  # the kill itself may have cut one
    journal.write_bytes(entries + entries.splitlines()[-1][:40])
    lock = sweep_dir / "optuna.log.lock"
    lock.symlink_to(sweep_dir / "killed-owner")
    os.utime(lock, (1, 1), follow_symlinks=False)  # as old as a killed driver's
    resumed = _resumed_after_kill(process, args, tmp_path)
    assert "Resuming" in resumed.stdout + resumed.stderr
    assert journal.read_bytes().startswith(entries)
    # sweep.log is appended to: the first run's trial events, the marker, then the resumed run's
    # events and the final summary.
    log = (sweep_dir / "sweep.log").read_text()
    marker = log.index("==== Resuming the interrupted sweep in")
    assert "] - Trial 1 started" in log[:marker]
    assert "ended after" in log[marker:] and "Best: trial" in log[marker:]
    assert "ended in half an entry" in log  # the resumed run's: the first had no journal
    assert not lock.is_symlink()

    summary = _summary(sweep_dir)
    trial_ids = [trial["trial_id"] for trial in summary["trials"]]
    assert len(trial_ids) == 8 and len(set(trial_ids)) == 8
    assert {trial["trial_id"]: trial["number"] for trial in summary["trials"]
            if trial["trial_id"] in numbers} == numbers
    after = trial_rows(sweep_dir)
    for trial_id in ended_before:  # finished trials were not trained again
        assert after[trial_id] == before[trial_id]
    for trial_id, rows in after.items():  # no epoch reported twice, none missing
        epochs = [row["epoch"] for row in rows]
        assert epochs == list(range(1, len(epochs) + 1)), (trial_id, epochs)

    # The searcher restored its history: it still knows the trials that ended before the kill.
    searcher = pickle.loads(_latest(sweep_dir / "trials", "searcher-state-*.pkl").read_bytes())
    assert ended_before <= searcher["_completed_trials"]
    assert set(trial_ids) <= set(searcher["_ot_trials"])
    # ASHA kept its rung records: trials that ended before the kill never reported again,
    # so they are in the final rungs only if the restored scheduler started from its saved state.
    callback_states = pickle.loads(
        _latest(sweep_dir / "trials", "callback-states-*.pkl").read_bytes())
    # The state as ASHA's own save() writes it (ray-project/ray#30838): its attributes, pickled.
    scheduler = pickle.loads(next(state["scheduler"] for state in callback_states.values()
                                  if state and "scheduler" in state))
    recorded = {trial_id for bracket in scheduler["_brackets"]
                for _, rung in bracket._rungs for trial_id in rung}
    assert ended_before <= recorded

    # The persistent study: one finished Optuna trial per Tune trial; orphans closed as failed.
    study = sweep_study(sweep_dir, "smoke")
    by_tune_id = {}
    for trial in study.trials:
        tune_id = trial.user_attrs.get("ray_trial_id")
        if tune_id in trial_ids:
            assert tune_id not in by_tune_id
            by_tune_id[tune_id] = trial
        else:
            assert trial.state == optuna.trial.TrialState.FAIL
    assert set(by_tune_id) == set(trial_ids)
    assert all(trial.state.is_finished() for trial in by_tune_id.values())


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_leaves_a_resumable_sweep(tmp_path, stop):
    """Ctrl-C, or SIGTERM as a preempted job gets: the trials stop, the summary says
    interrupted, the resume command is printed, and running it finishes the sweep."""
    sweep_dir = tmp_path / "sweep"
    # Trials long enough to be running when the signal comes: the first result reaches the
    # sweep folder with the next experiment-state save, a second or more after the epoch;
    # with 2 epochs of 2 000 images (half a second each) the whole sweep had ended by then
    # once, on a loaded machine, and the run finished instead of stopping.
    args = [*SMOKE, f"sweep_dir={sweep_dir}", "search.num_trials=3", "scheduler=none",
            "train.epochs=3", "data.max_train_samples=6000"]
    log = tmp_path / "first.log"
    process = start_cli(args, cwd=tmp_path, log=log)
    try:
        wait_for(lambda: any(trial_rows(sweep_dir).values()), 600, "a first result")
        process.send_signal(stop)
        returncode = process.wait(timeout=300)
    finally:
        kill_tree(process)
    output = log.read_text()
    assert returncode == 130, output[-3000:]
    assert "Resume with: python -m sweeper" in output
    assert _summary(sweep_dir)["state"] == "interrupted"

    resumed = run_cli(args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # The resumed run's first line shows the best the first run had reached (issue 41: it
    # showed none, then the resumed trials' own best as the sweep's).
    if _bests_shown(output):
        assert _bests_shown(output)[-1] in _first_status(resumed.stdout), resumed.stdout[-3000:]
    summary = _summary(sweep_dir)
    assert summary["state"] == "complete" and summary["num_trials"] == 3

    if stop == signal.SIGTERM:
        return  # what follows does not depend on how the sweep was interrupted
    again = run_cli(args, cwd=tmp_path)  # a complete sweep is not run twice
    assert again.returncode == 0 and "already complete" in again.stdout
    changed = run_cli([*args, "train.batch_size=32"], cwd=tmp_path)
    assert changed.returncode == 2
    assert "train.batch_size" in changed.stderr and "fresh=true" in changed.stderr


def test_resume_retries_or_keeps_a_trial_that_had_failed(tmp_path):
    """A trial that ended in an error before the sweep was interrupted: resuming with
    resume.errored=retry continues it from its last checkpoint, with skip it stays failed."""
    sweep_dir = tmp_path / "sweep"
    # 5 epochs: the kill lands an epoch or so after the first one reached the sweep folder
    # (on a quiet machine a 3-epoch trial had trained 2 by then: clean-clone CI).
    settings = [*SMOKE, "search.num_trials=3", "scheduler=none", f"train.epochs={EPOCHS}",
                "data.max_train_samples=6000", "recovery.max_failures=0"]
    log = tmp_path / "first.log"
    process = start_cli([*settings, f"sweep_dir={sweep_dir}"], cwd=tmp_path, log=log)
    try:
        failed_id, worker_pid = wait_for(lambda: _first_epoch_reported(sweep_dir), 600,
                                       "a trial's first epoch")
        os.kill(worker_pid, signal.SIGKILL)  # no retries left (max_failures=0): the trial fails
        error_file = sweep_dir / "trials" / f"trial_{failed_id}" / "error.txt"
        wait_for(error_file.exists, 300, "the trial's error")
        # All trials created: Ctrl-C must not pass the cut-off ones for ended.
        wait_for(lambda: len(trial_rows(sweep_dir)) == 3, 300, "a third trial")
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=300)
    finally:
        kill_tree(process)
    assert returncode == 130, log.read_text()[-3000:]
    before = trial_rows(sweep_dir)[failed_id]
    cut = len(before)  # the epochs it trained before its worker died
    assert [row["epoch"] for row in before] == list(range(1, cut + 1)) and 1 <= cut < EPOCHS

    # The same interrupted sweep twice: resumed each way.
    copy_dir = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy_dir)
    outcomes = {}
    for errored, folder in (("skip", sweep_dir), ("retry", copy_dir)):
        resumed = run_cli([*settings, f"sweep_dir={folder}", f"resume.errored={errored}"],
                          cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        summary = _summary(folder)
        assert summary["state"] == "complete" and summary["num_trials"] == 3
        outcomes[errored] = (next(t for t in summary["trials"] if t["trial_id"] == failed_id),
                             trial_rows(folder)[failed_id])
        # The trials Ctrl-C cut off went on to their last epoch.
        for trial in summary["trials"]:
            if trial["trial_id"] != failed_id:
                assert trial["status"] == "completed" and trial["epochs_trained"] == EPOCHS

    kept, kept_rows = outcomes["skip"]
    assert kept["status"] == "failed" and kept["epochs_trained"] == cut
    assert kept_rows == before  # not trained again
    retried, retried_rows = outcomes["retry"]
    assert retried["status"] == "completed" and retried["epochs_trained"] == EPOCHS
    # It went on from its last checkpoint on a new worker, no epoch trained twice.
    assert [row["epoch"] for row in retried_rows] == list(range(1, EPOCHS + 1))
    assert retried_rows[:cut] == before
    assert all(row["pid"] != worker_pid for row in retried_rows[cut:])


def test_a_trial_that_failed_stays_failed_after_a_killed_driver_resumes(tmp_path):
    """resume.errored=skip after the driver was killed (no last save by Tune): the trial whose
    worker died for good is not trained again, the others finish."""
    sweep_dir = tmp_path / "sweep"
    args = [*SMOKE, f"sweep_dir={sweep_dir}", "search.num_trials=3", "scheduler=none",
            f"train.epochs={EPOCHS}", "data.max_train_samples=6000", "recovery.max_failures=0",
            "resume.errored=skip"]
    process = start_cli(args, cwd=tmp_path, log=tmp_path / "first.log")
    try:
        failed_id, worker_pid = wait_for(lambda: _first_epoch_reported(sweep_dir), 600,
                                         "a trial's first epoch")
        os.kill(worker_pid, signal.SIGKILL)  # no retries left: the trial fails
        record = sweep_dir / "trials" / "failed_trials.json"
        wait_for(lambda: record.exists() and failed_id in json.loads(record.read_text()), 300,
                 "the failure recorded")
        before = trial_rows(sweep_dir)[failed_id]
    finally:
        kill_tree(process)
    _resumed_after_kill(process, args, tmp_path)
    summary = _summary(sweep_dir)
    assert summary["state"] == "complete" and summary["num_trials"] == 3
    # Not trained again: every epoch of the failed trial is the dead worker's (an epoch it
    # trained may reach the sweep folder after the failure was recorded).
    after = trial_rows(sweep_dir)[failed_id]
    assert after[:len(before)] == before and all(row["pid"] == worker_pid for row in after)
    assert 1 <= len(after) < EPOCHS
    for trial in summary["trials"]:
        if trial["trial_id"] == failed_id:
            assert trial["status"] == "failed" and trial["epochs_trained"] == len(after), trial
        else:
            assert trial["status"] == "completed" and trial["epochs_trained"] == EPOCHS, trial


def test_trials_all_ended_but_no_summary_yet_completes_without_training(tmp_path):
    """The driver stopped after the last trial but before the summary (killed, or Ctrl-C in
    the final retrain): running the command again restores the finished experiment, trains
    no trial and completes the sweep (trials that ran to their last epoch count as ended),
    retraining the best config with every CPU of the Ray it started (the retrain runs alone)."""
    sweep_dir = tmp_path / "sweep"
    args = [*SMOKE, f"sweep_dir={sweep_dir}", "search.num_trials=2", "scheduler=none",
            "train.epochs=2", "data.max_train_samples=2000", "final.retrain=true",
            "cluster.num_cpus=2"]
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rows = trial_rows(sweep_dir)
    (sweep_dir / "summary.json").unlink()

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Resuming" in again.stdout + again.stderr
    summary = _summary(sweep_dir)
    assert summary["state"] == "complete"
    assert [trial["status"] for trial in summary["trials"]] == ["completed", "completed"]
    assert trial_rows(sweep_dir) == rows  # nothing trained again
    assert (sweep_dir / "best_model.keras").is_file()
    info = json.loads((sweep_dir / "best_model.json").read_text())
    assert summary["test"]["source"] == info["source"] == "retrain"
    assert info["retrained_on"]["cpus"] == 2  # cluster.num_cpus: all of the Ray it started


# A driver like `python -m sweeper`'s (sweeper.tuner.build_tuner, tune_settings) whose trials are
# the scaling benchmark's dummy trials: 60 epochs of 0.25 s, a checkpoint each, resumable (Tune
# saves the state as the sweep starts and 10 s later: the kill comes after the second save).
DUMMY_DRIVER = """
import sys
from pathlib import Path

import ray

from benchmarks.scaling import dummy_sweep
from sweeper.tuner import tune_settings

ray.init(address="local", num_cpus=2, include_dashboard=False)
cfg, tuner = dummy_sweep(Path(sys.argv[1]), concurrent=4, interval=0.25, trials=4, epochs=60,
                         grace=60)
with tune_settings(cfg):
    tuner.fit()
"""


def _checkpoint_epoch(name: str) -> int:
    return int(name.removeprefix("checkpoint_")) + 1  # Tune numbers them from 0


def test_driver_killed_while_dropped_checkpoints_wait_for_the_next_save(tmp_path):
    """Issue 26: Tune saves the experiment state on its timer, no longer at every trial
    checkpoint, and a checkpoint Tune drops (one kept per trial besides the latest) is deleted
    only once a newer saved state is stored. The worst moment to kill the driver: trials have
    checkpointed (and dropped) at least twice since the last save. Every checkpoint that saved
    state names is still there, the resume finishes every trial from them, each epoch is
    recorded once, and the checkpoints the killed driver left behind are removed."""
    sweep_dir = tmp_path / "sweep"
    script = tmp_path / "driver.py"
    script.write_text(DUMMY_DRIVER)
    env = cli_env()
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))

    def start(log: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(sweep_dir)], cwd=tmp_path,
                                env=env, stdout=(tmp_path / log).open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    def saved_state_behind():
        """The saved state's checkpoints once a trial has written two checkpoints past the one
        the saved state names for it (Tune has dropped that one since)."""
        state = newest_experiment_state(sweep_dir / "trials")
        if state is None:
            return None
        try:
            named = checkpoints_in_saved_state(state)
        except (OSError, ValueError):  # being replaced right now
            return None
        for trial_id, names in named.items():
            written = [_checkpoint_epoch(path.name) for path in
                       (sweep_dir / "trials" / f"trial_{trial_id}").glob("checkpoint_*")]
            if names and max(written, default=0) >= max(map(_checkpoint_epoch, names)) + 2:
                return named
        return None

    process = start("first.log")
    try:
        named = wait_for(saved_state_behind, 300, "a saved state behind the trials", every=0.1)
    finally:
        kill_tree(process)
    assert process.returncode == -signal.SIGKILL
    for trial_id, names in named.items():  # what the resume restores from is all there
        for name in names:
            assert (sweep_dir / "trials" / f"trial_{trial_id}" / name).is_dir(), (trial_id, name)

    resumed = start("resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    rows = trial_rows(sweep_dir)
    assert len(rows) == 4
    for trial_id, trial in rows.items():
        assert [row["epoch"] for row in trial] == list(range(1, 61)), trial_id
        # One checkpoint kept (the best, here also the latest): none left behind by the kill.
        kept = sorted(path.name for path in (sweep_dir / "trials" / f"trial_{trial_id}")
                      .glob("checkpoint_*"))
        assert len(kept) == 1, (trial_id, kept)
    study = sweep_study(sweep_dir, "scaling")
    finished = [trial for trial in study.trials
                if trial.user_attrs.get("ray_trial_id") in rows]
    assert len(finished) == 4
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in finished)
    assert all(sorted(trial.intermediate_values) == list(range(1, 61)) for trial in finished)


def _folder_state(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder`` with its modification time and bytes."""
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_time_budget_ends_a_sweep_with_results_and_a_rerun_resumes_it(tmp_path, fashion_npz):
    """search.time_budget_s: no trial starts after it; a running trial pauses at its next
    epoch; the sweep ends with a summary (the best model and its test score when a trial had
    an epoch by then); the same command with no budget continues the paused trials.

    With no limit on concurrent trials (the default), each trial paused freed a worker that
    Tune gave to a new trial without asking the scheduler (issue 24); then the trials Tune had
    queued still started after the budget (issue 41: trials 5 and 6 started 30 ms after the
    line saying it was spent). Now one line says which trials may still finish an epoch, and
    no "Trial N started" follows it.

    Between the two runs the npz is overwritten with a 4-class file: the resume is refused in
    one line naming what changed, and leaves the sweep folder as it was (issue 41: it resumed
    and trials failed on the checkpoints' shapes)."""
    data = tmp_path / "data.npz"
    shutil.copyfile(fashion_npz, data)
    sweep_dir = tmp_path / "sweep"
    args = ["+experiment=smoke", "data=npz", f"data.path={data}", f"sweep_dir={sweep_dir}",
            "search.num_trials=5", "scheduler=none", "train.epochs=3",
            "data.max_train_samples=600", "search.start_with_defaults=true",
            "train.lr=0.00123", "resources.max_concurrent_trials=null"]
    # One second: spent while the first trials' workers still import TensorFlow, however fast
    # the machine (a budget of 20 s was outlasted by none of the 5 trials on a quiet machine),
    # the others queued behind them.
    first = run_cli([*args, "search.time_budget_s=1"], cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    budget_line = next(line for line in first.stdout.splitlines()
                       if line.startswith("Time budget of 1 s spent after"))
    assert "Continue the sweep for another 1 s with: python -m sweeper" in budget_line
    assert "{" not in budget_line  # the trials by status in words, not a dict
    lines = first.stdout.splitlines()
    spent = next(i for i, line in enumerate(lines)
                 if line.startswith("The time budget of 1 s is spent: no trial starts"))
    started_before = {line.split()[1] for line in lines[:spent]
                      if line.startswith("Trial ") and " started (id " in line}
    assert not [line for line in lines[spent:] if " started (id " in line], lines[spent:]
    may_finish = lines[spent].partition("; ")[2]
    paused = [i for i, line in enumerate(lines) if " paused after epoch " in line]
    for i in paused:  # each after its epoch's own line, and named by the budget's line
        number = lines[i].split()[1]
        assert any(line.startswith(f"Trial {number} epoch ") for line in lines[:i])
        assert number in may_finish and number in started_before
    summary = _summary(sweep_dir)
    assert summary["state"] == "time_budget" and summary["time_budget_s"] == 1
    rows = {trial: [row["epoch"] for row in epochs]
            for trial, epochs in trial_rows(sweep_dir).items() if epochs}
    numbers = {trial["trial_id"]: str(trial["number"]) for trial in summary["trials"]}
    assert {numbers[trial] for trial in rows} <= started_before, (rows, started_before)
    if rows:  # a trial had an epoch within the budget: the best so far is scored
        assert summary["test"]["accuracy"] > 0.1 and (sweep_dir / "best_model.keras").is_file()

    # The data changed on disk: refused in one line, the sweep folder untouched.
    before = _folder_state(sweep_dir)
    arrays = dict(np.load(fashion_npz))
    four = {split: arrays[f"y_{split}"] < 4 for split in ("train", "test")}
    np.savez(data, **{f"{kind}_{split}": arrays[f"{kind}_{split}"][four[split]]
                      for kind in ("x", "y") for split in ("train", "test")})
    changed = run_cli([*args, "search.time_budget_s=null"], cwd=tmp_path)
    assert changed.returncode == 2, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert changed.stderr.startswith(f"error: data.path='{data}' is invalid: the data changed")
    assert "class names 10 -> 4" in changed.stderr and len(changed.stderr.splitlines()) == 1
    assert _folder_state(sweep_dir) == before
    shutil.copyfile(fashion_npz, data)

    resumed = run_cli([*args, "search.time_budget_s=null"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    if _bests_shown(first.stdout):  # the best so far is the first run's, from the first line
        assert _bests_shown(first.stdout)[-1] in _first_status(resumed.stdout), resumed.stdout
    summary = _summary(sweep_dir)
    assert summary["state"] == "complete" and summary["num_trials"] == 5
    after = {trial: [row["epoch"] for row in epochs]
             for trial, epochs in trial_rows(sweep_dir).items()}
    assert len(after) == 5 and all(epochs == [1, 2, 3] for epochs in after.values()), after
