"""Every workaround of Ray's, Optuna's and TensorFlow's internals still fits the installed
versions, and one that no longer fits fails loudly, naming itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sweeper import compat


def test_every_workaround_fits_the_installed_versions():
    assert compat.check_installed() == []


def test_a_moved_internal_raises_naming_the_workaround():
    with pytest.raises(compat.CompatibilityError, match=r"_ot_study has changed .*OptunaSearch"):
        compat.searcher_study(object())
    with pytest.raises(compat.CompatibilityError, match=r"checked with ray 2\.60\.0"):
        compat.count_stopped(object())


def test_no_other_module_reaches_into_ray_or_optuna_internals():
    """Private names of Ray, Optuna and TensorFlow appear in compat.py only."""
    private = re.compile(r"\b(_private|_internal|_ot_study|_ot_trials|_completed_trials|"
                         r"_num_stopped|_brackets|_rungs|_contains|_system_config|"
                         r"DEFAULT_ENV_VARS|get_json_state|run_metadata|experiment_fs_path|"
                         r"_gradient_registry|_experiment_analysis)\b")
    package = Path(compat.__file__).parent
    offenders = [f"{path.name}:{number}" for path in sorted(package.glob("*.py"))
                 if path.name != "compat.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if private.search(line.split("#")[0])]
    assert offenders == []


def test_the_experiment_state_reaches_the_sweep_folder_after_the_results_it_names(tmp_path):
    """Ray's own syncer uploads a driver staging folder (built here: two trial folders, the
    searcher state and the experiment state at the top) while snapshots_on_a_timer is on:
    every trial file is written to the storage before any top-level state file, and the
    experiment state last. Without the ordering Tune's one copy has no order, and a driver
    killed during it left a state naming results the sweep folder lacked (CI, stop 30).
    Tune's temporary files of a save in progress are never copied."""
    import fsspec.implementations.local
    import pyarrow.fs
    from ray.train._internal.storage import _FilesystemSyncer

    staging, storage = tmp_path / "staging", tmp_path / "storage"
    for trial in ("trial_a", "trial_b"):
        (staging / trial).mkdir(parents=True)
        for name in ("result.json", "progress.csv", "params.json"):
            (staging / trial / name).write_text(f"{trial} {name}\n")
    for name in ("experiment_state-2026.json", "searcher-state-2026.pkl",
                 "callback-states-2026.pkl"):
        (staging / name).write_text(name)
    # A save in progress: Tune's temporary names (.{uuid}-tmp-{name}), renamed away at any
    # moment; copying one raced the rename (FileNotFoundError).
    (staging / ".0f3c-tmp-searcher-state-2026.pkl").write_text("half written")
    (staging / "trial_a" / ".9e1d-tmp-checkpoint.json").write_text("half written")
    written = []

    class RecordingFileSystem(fsspec.implementations.local.LocalFileSystem):
        def open(self, path, mode="rb", **kwargs):
            if "w" in mode:
                written.append(Path(path).relative_to(storage).as_posix())
            return super().open(path, mode=mode, **kwargs)

    filesystem = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(RecordingFileSystem()))
    syncer = _FilesystemSyncer(storage_filesystem=filesystem, sync_period=0)
    with compat.snapshots_on_a_timer():
        assert syncer.sync_up(str(staging), str(storage))
        syncer.wait()

    trial_files = {f"{trial}/{name}" for trial in ("trial_a", "trial_b")
                   for name in ("result.json", "progress.csv", "params.json")}
    assert set(written[:6]) == trial_files
    assert set(written[6:]) == {"searcher-state-2026.pkl", "callback-states-2026.pkl",
                                "experiment_state-2026.json"}
    assert written[-1] == "experiment_state-2026.json"
    assert not any("-tmp-" in name for name in written)
    assert (storage / "trial_b" / "result.json").read_text() == "trial_b result.json\n"
