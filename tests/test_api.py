"""The public API: sweeper.compose, sweeper.run and sweeper.load, and the README's example."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import sweeper
from sweeper import sweep
from sweeper.summary import EARLY_STOPPED, STATE_INTERRUPTED, UNFINISHED

REPO = Path(__file__).resolve().parent.parent


def test_compose_gives_a_validated_typed_config_and_one_line_errors(fashion_mnist_dir):
    cfg = sweeper.compose(["+experiment=smoke", "data=fashion_mnist",
                           f"data.path={fashion_mnist_dir}",
                           "search.space.train.lr=tag(log, interval(1e-4, 1e-2))"])
    assert isinstance(cfg, sweeper.SweepConfig) and cfg.name == "smoke"
    assert cfg.search.space["train"]["lr"] == "tag(log, interval(1e-4, 1e-2))"
    with pytest.raises(sweeper.ConfigError) as bad_value:
        sweeper.compose(["train.lr=-1"])
    assert str(bad_value.value) == "train.lr=-1.0 is invalid: must be a positive number"
    with pytest.raises(sweeper.ConfigError) as bad_key:
        sweeper.compose(["train.lrr=1"])
    assert str(bad_key.value) == "train.lrr=1 is invalid: no such setting; did you mean train.lr?"
    assert bad_key.value.key == "train.lrr"


def test_a_composed_config_is_validated_once_unless_it_changes(fashion_mnist_dir, monkeypatch):
    calls = []
    real = sweep.validate
    monkeypatch.setattr(sweep, "validate", lambda cfg: calls.append(1) or real(cfg))
    cfg = sweeper.compose(["+experiment=smoke", "data=fashion_mnist",
                           f"data.path={fashion_mnist_dir}"])
    assert len(calls) == 1
    assert sweep.validated(cfg)[0] is cfg and len(calls) == 1  # run() does not check again
    cfg.train.lr = -1.0  # changed after compose: checked again, and refused
    with pytest.raises(sweeper.ConfigError, match="train.lr"):
        sweep.validated(cfg)
    assert len(calls) == 2


def write_interrupted_sweep(folder: Path) -> None:
    """A sweep folder as a killed driver leaves it: the config, trial folders, no summary."""
    saved = {"name": "cut", "search": {"metric": "val_accuracy", "mode": "max",
                                       "space": {"train": {"lr": "interval(0.001, 0.1)"}}},
             "train": {"epochs": 3}}
    folder.mkdir()
    (folder / "sweep_config.yaml").write_text(yaml.safe_dump(saved))
    for trial_id, values, done in (("aaaa0001", [0.5, 0.6], False), ("aaaa0002", [0.4], True)):
        trial = folder / "trials" / f"trial_{trial_id}"
        trial.mkdir(parents=True)
        (trial / "params.json").write_text(json.dumps({"train.lr": 0.01}))
        rows = [{"epoch": i + 1, "val_accuracy": v, "training_iteration": i + 1,
                 "done": done and i == len(values) - 1} for i, v in enumerate(values)]
        # The last line cut off, as a SIGKILL mid-write leaves it.
        (trial / "result.json").write_text(
            "".join(json.dumps(row) + "\n" for row in rows) + '{"epoch": 3, "val_acc')


def test_load_reads_an_interrupted_sweep_from_its_trial_folders(tmp_path):
    write_interrupted_sweep(tmp_path / "cut")
    result = sweeper.load(tmp_path / "cut")
    assert result.state == STATE_INTERRUPTED and result.sweep_dir == tmp_path / "cut"
    assert [t.status for t in result.trials] == [UNFINISHED, EARLY_STOPPED]
    assert (result.best.trial_id, result.best.metric_value, result.best.epoch) == (
        "aaaa0001", 0.6, 2)
    frame = result.to_dataframe()
    assert list(frame["trial_id"]) == ["aaaa0001", "aaaa0002"]
    assert list(frame["best_val_accuracy"]) == [0.6, 0.4]
    with pytest.raises(FileNotFoundError, match="is .* a sweep"):
        sweeper.load(tmp_path / "nothing")


def test_loading_a_sweep_imports_neither_ray_nor_tensorflow(tmp_path):
    write_interrupted_sweep(tmp_path / "cut")
    code = ("import sys, sweeper; result = sweeper.load(sys.argv[1]); "
            "print(result.best.trial_id, len(result.to_dataframe()), "
            "sorted(m for m in ('ray', 'tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cut")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["aaaa0001", "2", "[]"], out.stderr


@pytest.mark.slow
def test_load_gives_the_smoke_sweeps_summary_without_ray(smoke_sweep):
    assert smoke_sweep.returncode == 0, smoke_sweep.stderr[-3000:]
    code = ("import sys, json, sweeper; r = sweeper.load(sys.argv[1]); "
            "print(json.dumps([r.state, r.best.trial_id, r.test.accuracy, len(r.trials), "
            "str(r.best_model), sorted(m for m in ('ray', 'tensorflow') if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code, str(smoke_sweep.sweep_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    summary = smoke_sweep.summary
    assert json.loads(out.stdout) == [
        "complete", summary["best"]["trial_id"], summary["test"]["accuracy"],
        smoke_sweep.num_trials, str(smoke_sweep.sweep_dir / "best_model.keras"), []], out.stderr


def readme_api_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_api_example_runs(smoke_sweep, tmp_path, monkeypatch, capsys):
    """The README's example, as written, in a folder that holds the smoke sweep's results
    under the example's name: sweeper.run finds it complete (the smoke sweep of the session
    trained it) and everything after reads it."""
    assert smoke_sweep.returncode == 0, smoke_sweep.stderr[-3000:]
    shutil.copytree(smoke_sweep.sweep_dir, tmp_path / "sweeps" / "smoke")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_api_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert f"already_complete {tmp_path / 'sweeps' / 'smoke'}" in out
    assert smoke_sweep.summary["best"]["trial_id"] in out


def test_run_prints_the_clis_lines_where_the_program_set_up_no_logging(capsys):
    """sweeper.run's console in a notebook or script (sweeper.progress.console_for_api):
    sweeper's event lines reach stdout, Ray's and Optuna's info lines do not, and the logging
    of the program is as before afterwards; a program with logging of its own keeps it."""
    import logging

    from sweeper.progress import console_for_api

    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    for handler in saved_handlers:  # pytest's capture handlers: a program without logging
        root.removeHandler(handler)
    try:
        with console_for_api(1):
            logging.getLogger("sweeper.events").info("Trial 1 started (id abc)")
            logging.getLogger("optuna.storages").info("A new study created in RDB")
            logging.getLogger("ray.tune").info("Ray's own line")
            logging.getLogger("sweeper.record").info("kept for sweep.log only")
        assert root.handlers == [] and root.level == saved_level
        assert capsys.readouterr().out == "Trial 1 started (id abc)\n"
        root.addHandler(logging.NullHandler())
        with console_for_api(1):
            logging.getLogger("sweeper.events").info("Trial 2 started (id def)")
        assert capsys.readouterr().out == ""
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
