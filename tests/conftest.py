"""Shared fixtures: real data on disk, a real local Ray, composed configs."""

from __future__ import annotations

import os

# The network here is loopback only: keep every Ray node of these tests on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    return FASHION_MNIST


@pytest.fixture(scope="session")
def fashion_npz(tmp_path_factory, fashion_mnist_dir) -> Path:
    """A slice of Fashion-MNIST saved in Keras' mnist.npz layout."""
    from sweeper.data import load_idx_folder

    arrays = load_idx_folder(fashion_mnist_dir)
    path = tmp_path_factory.mktemp("npz") / "mnist.npz"
    np.savez_compressed(path, x_train=arrays["x_train"][:2000], y_train=arrays["y_train"][:2000],
                        x_test=arrays["x_test"][:500], y_test=arrays["y_test"][:500])
    return path


@pytest.fixture(scope="session")
def small_splits(fashion_mnist_dir):
    """1000 Fashion-MNIST training images (900 train, 100 validation), for training without Ray."""
    from sweeper.config import DataConfig
    from sweeper.data import load_splits
    from sweeper.trainer import configure_tensorflow

    configure_tensorflow(num_cpus=1, use_gpu=False)
    data = DataConfig(name="fashion_mnist", path=str(fashion_mnist_dir),
                      max_train_samples=1000, max_test_samples=100)
    return load_splits(data, validation_fraction=0.1, seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """One real in-process Ray for the test session (2 CPUs, loopback)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def compose():
    """Compose the sweep config exactly as `python -m sweeper ARGS` would."""
    from sweeper.overrides import compose_config, quote_space_overrides

    def _compose(*overrides: str):
        return compose_config(quote_space_overrides(list(overrides)))

    return _compose


@dataclass(frozen=True)
class SmokeSweep:
    """One finished smoke sweep on Fashion-MNIST, run through the real CLI."""

    returncode: int
    stdout: str
    stderr: str
    sweep_dir: Path
    summary: dict
    num_trials: int
    max_epochs: int
    # The sweep's RAY_TMPDIR: Ray keeps its session folders under <ray_tmpdir>/ray.
    ray_tmpdir: Path


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory, fashion_mnist_dir):
    """``python -m sweeper +experiment=smoke data=fashion_mnist`` once for the whole session.

    The sweep and TensorBoard tests read what it leaves behind; running it once keeps the
    end-to-end tests to about a minute on 2 cores.
    """
    from sweeper.overrides import compose_config

    cwd = tmp_path_factory.mktemp("smoke")
    sweep_dir = cwd / "sweep"
    args = ["+experiment=smoke", "data=fashion_mnist", f"data.path={fashion_mnist_dir}"]
    cfg = compose_config(args)
    # Short, under /tmp: Ray's socket paths inside it must stay under 107 characters.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir)}
    result = subprocess.run([sys.executable, "-m", "sweeper", *args, f"sweep_dir={sweep_dir}"],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    summary_path = sweep_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    yield SmokeSweep(result.returncode, result.stdout, result.stderr, sweep_dir, summary,
                     cfg.search.num_trials, cfg.train.epochs, ray_tmpdir)
    shutil.rmtree(ray_tmpdir, ignore_errors=True)


def visible_gpus() -> int:
    """GPUs on this machine as Ray counts them (no TensorFlow import, no GPU memory taken)."""
    from sweeper.config import ClusterConfig
    from sweeper.tuner import local_capacity

    return int(local_capacity(ClusterConfig())[1])


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked gpu run only where a GPU is visible; elsewhere they are skipped, saying so."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if gpu_tests and not visible_gpus():
        skip = pytest.mark.skip(reason="needs a GPU; none is visible on this machine")
        for item in gpu_tests:
            item.add_marker(skip)
