"""The sweep folder belongs to one sweep at a time (issue 20): a second driver on a running
sweep is refused, and a refused re-run writes nothing into the sweep it was refused by."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import pytest
from cli_helpers import cli_env, kill_tree, run_cli, start_cli, sweep_study, wait_for

pytestmark = pytest.mark.slow


def folder_contents(root) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file()}


def test_one_driver_per_sweep_folder_and_a_refused_rerun_writes_nothing(tmp_path,
                                                                        fashion_mnist_dir):
    sweep_dir = tmp_path / "sweep"
    args = ["+experiment=smoke", "data=fashion_mnist", f"data.path={fashion_mnist_dir}",
            "search.num_trials=3", "data.max_train_samples=600", "data.max_test_samples=200",
            f"sweep_dir={sweep_dir}"]
    first = start_cli(args, cwd=tmp_path, log=tmp_path / "first.log")
    try:
        # Started for real: Tune has saved the experiment once, as a live sweep does.
        wait_for(lambda: list((sweep_dir / "trials").glob("experiment_state-*.json")),
                 timeout=300, what="the first driver's trials")
        second = run_cli(args, cwd=tmp_path, timeout=300)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert "a sweep is running in" in lines[0] and f"process {first.pid} on" in lines[0]
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        kill_tree(first)
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["num_trials"] == 3
    study = sweep_study(sweep_dir, "smoke")
    assert len(study.trials) == 3
    assert len(list((sweep_dir / "trials").glob("trial_*"))) == 3

    # The same name with another config is refused before Hydra writes its files (it had
    # rewritten .hydra/config.yaml and overrides.yaml and appended to sweep.log).
    before = folder_contents(sweep_dir)
    refused = run_cli([*args, "search.num_trials=4"], cwd=tmp_path, timeout=300)
    assert refused.returncode == 2, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "holds a sweep with a different config (search.num_trials)" in refused.stderr
    assert folder_contents(sweep_dir) == before

    # The same command again: the sweep is complete, so it reports and writes nothing (Hydra
    # had rewritten .hydra/ and appended to sweep.log before the sweep said so).
    again = run_cli(args, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("Sweep 'smoke' is already complete")
    best = summary["best"]  # its number as on the console, then Ray's id (since 4e12690)
    assert f"Best: trial {best['number']} (id {best['trial_id']})" in again.stdout
    assert folder_contents(sweep_dir) == before


def test_names_and_paths_as_users_type_them(tmp_path, fashion_mnist_dir):
    """Issue 20: `~`, spaces and non-ASCII letters in name, sweep_dir and data.path work
    everywhere the sweep writes, Hydra's own .hydra/ and sweep.log included, and the commands
    printed for the user paste back into a shell."""
    home, cwd = tmp_path / "home", tmp_path / "work"
    data = home / "my data ü"
    home.mkdir()
    cwd.mkdir()
    shutil.copytree(fashion_mnist_dir, data)
    name = "lauf über Wörter"
    args = ["+experiment=smoke", "data=fashion_mnist", "data.path=~/my data ü",
            f"name={name}", "sweep_dir=~/sweeps ä/${name}", "search.num_trials=2",
            "train.epochs=2", "data.max_train_samples=400", "data.max_test_samples=100"]
    env = {**cli_env(), "HOME": str(home)}
    result = subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = home / "sweeps ä" / name
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["experiment"] == name and summary["num_trials"] == 2
    assert (sweep_dir / ".hydra" / "config.yaml").is_file()
    assert (sweep_dir / "sweep.log").stat().st_size > 0
    assert list(cwd.iterdir()) == []  # no folder named "~" (or anything else) here
    command = next(line for line in result.stdout.splitlines() if "tensorboard --logdir" in line)
    assert shlex.split(command.split(":", 1)[1])[-1] == str(sweep_dir / "tensorboard")
