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
