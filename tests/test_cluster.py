"""Past one machine: the cluster-launcher YAMLs, shared storage, and sweeps on real Ray nodes.

The multi-node tests start real Ray nodes on this machine with ``ray start`` (a head and
workers, each its own raylet and object store, all on 127.0.0.1), run ``python -m sweeper``
joined to them by address, and stop every process they started, by process id.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib
import pytest
import yaml
from cli_helpers import process_tree, processes, trial_rows, trial_tensorboard_run, wait_for
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from sweeper.config import ConfigError
from sweeper.layout import SweepLayout
from sweeper.sweep import validate

ROOT = Path(__file__).resolve().parent.parent
GPU_YAML = ROOT / "cluster" / "gpu.yaml"
LOCAL_YAML = ROOT / "cluster" / "local.yaml"
LOOPBACK = "127.0.0.1"

# `ray start` (Ray 2.60) swaps 127.0.0.1 for the machine's outward address before using it,
# unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, with which it refuses to start worker nodes.
# The network here is loopback only, so the nodes run Ray's own CLI with that swap turned off.
RAY_CLI = """import sys
from ray._private import services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.exit(main())
"""

# The smoke sweep cut to what these tests need: 4 trials x 2 epochs, every trial to the end.
TINY_SWEEP = ["+experiment=smoke", "data=fashion_mnist",
              "data.path=/usr/share/datasets/fashion-mnist",
              "data.max_train_samples=800", "data.max_test_samples=200", "train.epochs=2",
              "search.num_trials=4", "search.n_startup_trials=4", "scheduler=none",
              "resources.cpu_per_trial=1", "resources.gpu_per_trial=0.5"]


# --- the cluster-launcher configs ------------------------------------------------------------

def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_gpu_yaml_passes_ray_up_config_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load(GPU_YAML))  # what `ray up` does: defaults filled, then checked
    validate_config(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    assert sorted(spec["resources"]["GPU"] for spec in workers.values()) == [1, 4]
    assert all(spec["min_workers"] == 0 < spec["max_workers"] for spec in workers.values())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in GPU_YAML.read_text()
    # The project (with conf/) reaches every node, and sweeps land on the shared mount.
    assert config["file_mounts"] == {"/home/ray/sweeper": "."}
    assert "pip install -q /home/ray/sweeper" in config["setup_commands"]
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    storage = _load(ROOT / "conf" / "cluster" / "gpu.yaml")["storage_path"]
    assert storage.startswith("/mnt/shared/")


def test_local_yaml_has_the_node_types_of_gpu_yaml_and_passes_ray_schema():
    from ray.autoscaler._private.util import validate_config

    # The wheel lacks the fake provider's defaults file, so local.yaml is written complete and
    # checked as the autoscaler checks it (schema and completeness), without prepare_config.
    local = _load(LOCAL_YAML)
    validate_config(local)
    gpu = _load(GPU_YAML)
    local_workers = set(local["available_node_types"]) - {local["head_node_type"]}
    assert local_workers == set(gpu["available_node_types"]) - {gpu["head_node_type"]}
    for name in local_workers:
        local_gpus = local["available_node_types"][name]["resources"]["GPU"]
        assert local_gpus == gpu["available_node_types"][name]["resources"]["GPU"]
    assert local["available_node_types"][local["head_node_type"]]["resources"] == {"CPU": 0}
    assert local["provider"]["type"] == "fake_multinode"


def test_cluster_setup_installs_the_versions_pyproject_allows_and_tests_use():
    from importlib.metadata import version

    config = _load(GPU_YAML)
    pins = {}
    for command in config["setup_commands"]:
        for text in re.findall(r'"([^"]+==[^"]+)"', command):
            requirement = Requirement(text)
            pins[requirement.name] = str(requirement.specifier).removeprefix("==")
    project = _pyproject()
    for dependency in map(Requirement, project["dependencies"]):
        assert dependency.name in pins, f"{dependency.name} is not pinned in setup_commands"
        assert pins[dependency.name] in dependency.specifier, dependency
        assert pins[dependency.name] == version(dependency.name), dependency.name
    image = re.fullmatch(r"rayproject/ray:([\d.]+)-py3(\d+)-gpu", config["docker"]["image"])
    assert image[1] == pins["ray"] == version("ray")
    assert f"3.{image[2]}" in SpecifierSet(project["requires-python"])


# --- shared storage ----------------------------------------------------------------------------

def test_joining_a_cluster_without_shared_storage_is_a_config_error(compose):
    with pytest.raises(ConfigError) as error:
        validate(compose("cluster=remote"))
    assert error.value.key == "cluster.storage_path"
    assert "every node mounts" in str(error.value)
    with pytest.raises(ConfigError, match="object-store URIs"):
        validate(compose("cluster=remote", "cluster.storage_path=s3://bucket/sweeps"))
    with pytest.raises(ConfigError, match="must be null when joining"):
        validate(compose("cluster=remote", "cluster.storage_path=/mnt/shared/sweeps",
                         "cluster.num_gpus=1"))


def test_the_sweep_folder_is_on_shared_storage_when_given(compose, tmp_path):
    cfg, _ = validate(compose("cluster=remote", f"cluster.storage_path={tmp_path}", "name=lr"))
    assert SweepLayout.for_config(cfg).root == tmp_path / "lr"
    cfg, _ = validate(compose("name=lr", f"sweep_dir={tmp_path / 'here'}"))
    assert SweepLayout.for_config(cfg).root == tmp_path / "here"


def test_cli_refuses_a_cluster_without_storage_before_ray_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sweeper", "cluster=remote"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: cluster.storage_path=None is invalid")
    assert not (tmp_path / "sweeps").exists()


# --- real Ray nodes on this machine ------------------------------------------------------------

def _free_port(taken: set[int]) -> int:
    """A port free now and not in ``taken`` (which it joins): the kernel can hand out a port it
    just gave, and two of Ray's components given one port stop the node from starting."""
    while True:
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


class LocalRayCluster:
    """A head and worker nodes started with ``ray start --block``, each its own process tree."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Short: Ray's socket paths under it must stay below the 107-character limit.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self.ports: set[int] = set()  # every port given to this cluster's nodes
        self.port = _free_port(self.ports)
        self.address = f"{LOOPBACK}:{self.port}"
        # TUNE_GLOBAL_CHECKPOINT_S: the tests watch the trials' result.json, which the sweep
        # folder gets with each experiment-state save (see tests/cli_helpers.cli_env).
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0", "TF_CPP_MIN_LOG_LEVEL": "2",
                    "TUNE_GLOBAL_CHECKPOINT_S": os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "1")}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: dict[str, subprocess.Popen] = {}
        self.drivers: list[subprocess.Popen] = []

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--metrics-export-port", "--runtime-env-agent-port"]
        log = self.root / f"{name}.log"
        self.nodes[name] = subprocess.Popen(
            [sys.executable, "-c", RAY_CLI, "start", "--block", f"--node-ip-address={LOOPBACK}",
             "--object-store-memory=150000000", "--disable-usage-stats",
             *(f"{flag}={_free_port(self.ports)}" for flag in ports), *args],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: "Ray runtime started" in log.read_text()
                  or self.nodes[name].poll() is not None, 120, f"Ray node {name}")
        if self.nodes[name].poll() is not None:
            raise RuntimeError(f"Ray node {name} did not start:\n{log.read_text()[-3000:]}")

    def start_head(self, *args: str, **env: str) -> None:
        """The head: no CPUs, so it runs no trials. Its monitor sees 127.0.0.1 as its address."""
        self._start("head", ["--head", f"--port={self.port}", "--num-cpus=0", "--num-gpus=0",
                             f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
                             f"--dashboard-port={_free_port(self.ports)}",
                             f"--ray-client-server-port={_free_port(self.ports)}", *args],
                    {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **env})

    def add_worker(self, name: str, *args: str) -> None:
        self._start(name, [f"--address={self.address}", *args],
                    {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})

    def raylet(self, name: str) -> int:
        """The process id of a node's raylet."""
        table = processes()
        return next(pid for pid in process_tree(self.nodes[name].pid, table)
                    if table[pid][1] == "raylet")

    def node_id(self, name: str) -> str:
        cmdline = " ".join(processes()[self.raylet(name)][2])
        return re.search(r"--node_id=(\w+)", cmdline).group(1)

    def sweep(self, name: str, *overrides: str) -> tuple[subprocess.Popen, Path]:
        """Start ``python -m sweeper`` on the tiny sweep, joined to this cluster by address.

        Returns the driver process and the sweep folder on the shared storage it was given.
        """
        shared = self.root / "shared"
        driver = subprocess.Popen(
            [sys.executable, "-m", "sweeper", *TINY_SWEEP, f"name={name}", *overrides,
             "cluster=remote", f"cluster.address={self.address}",
             f"cluster.storage_path={shared}"],
            cwd=self.root, env={**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
            stdout=(self.root / f"{name}.log").open("w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.drivers.append(driver)
        return driver, shared / name

    def summary_when_done(self, driver: subprocess.Popen, sweep_dir: Path) -> dict[str, Any]:
        """Wait for a sweep started by :meth:`sweep` to succeed; returns its summary.json."""
        driver.wait(timeout=600)
        log = self.root / f"{sweep_dir.name}.log"
        assert driver.returncode == 0, log.read_text()[-4000:]
        return json.loads((sweep_dir / "summary.json").read_text())

    def own_processes(self) -> list[int]:
        """Every live process these nodes and drivers started: their process trees, and what
        left a tree but names this cluster's temp dir or address (e.g. Ray's client server)."""
        table = processes()
        found = {pid for popen in [*self.nodes.values(), *self.drivers]
                 for pid in process_tree(popen.pid, table)}
        marks = (str(self.temp_dir), self.address)
        found |= {pid for pid, (_, _, cmdline) in table.items()
                  if any(mark in arg for arg in cmdline for mark in marks)}
        found.discard(os.getpid())
        return sorted(found)

    def shutdown(self) -> None:
        for pid in self.own_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for popen in [*self.nodes.values(), *self.drivers]:
            popen.wait(timeout=30)
        wait_for(lambda: not self.own_processes(), 30, "the cluster's processes to end")
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_cluster(tmp_path):
    """A real multi-node Ray cluster on this machine, torn down by process id even on failure."""
    cluster = LocalRayCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.shutdown()
        assert not cluster.own_processes(), "Ray processes of the test outlived it"


def _gpu_workers(cluster: LocalRayCluster) -> None:
    """Two workers, 1 CPU and 1 (declared) GPU each: trials asking for a GPU run only there."""
    cluster.start_head()
    for name in ("worker_a", "worker_b"):
        cluster.add_worker(name, "--num-cpus=1", "--num-gpus=1", f'--resources={{"{name}": 1}}')


def _trial_nodes(sweep_dir: Path) -> dict[str, list[str]]:
    """Each trial's node id per reported epoch, read from Ray Tune's result.json files."""
    nodes = {}
    for result in sorted((sweep_dir / "trials").glob("trial_*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        nodes[result.parent.name.removeprefix("trial_")] = [row["node_id"] for row in rows]
    return nodes


@pytest.mark.slow
def test_sweep_joined_by_address_runs_trials_on_both_workers(ray_cluster, tmp_path):
    _gpu_workers(ray_cluster)
    driver, sweep_dir = ray_cluster.sweep("cluster", "final.retrain=true")
    summary = ray_cluster.summary_when_done(driver, sweep_dir)

    assert summary["num_trials"] == 4
    assert summary["trial_counts"]["completed"] == 4
    nodes = _trial_nodes(sweep_dir)
    assert len(nodes) == 4 and all(len(epochs) == 2 for epochs in nodes.values())
    used = {node for epochs in nodes.values() for node in epochs}
    assert used == {ray_cluster.node_id("worker_a"), ray_cluster.node_id("worker_b")}
    # Every report names the GPU Ray gave the trial (each worker declares one: index 0); no
    # GPU memory figure, since TensorFlow finds no GPU to train on behind the declared ones.
    rows = [row for trial in trial_rows(sweep_dir).values() for row in trial]
    assert {row.get("gpu_ids") for row in rows} == {"0"}
    assert not any("gpu_peak_mb" in row for row in rows)
    for trial_id in nodes:
        run = trial_tensorboard_run(sweep_dir, trial_id)
        assert [event.step for event in run.Scalars("val_accuracy")] == [1, 2]
    # The best config was retrained as a Ray task with a trial's resources, on a worker node
    # (the head gives no CPUs, like cluster/gpu.yaml's), not in the driver; then test-scored.
    info = json.loads((sweep_dir / "best_model.json").read_text())
    assert info["source"] == summary["test"]["source"] == "retrain"
    assert info["retrained_on"]["node_id"] in used
    assert info["retrained_on"]["gpu_ids"] == "0"
    assert summary["test"]["accuracy"] > 0.3  # chance is 0.1
    # Only Hydra's own .hydra/ and log stay in the driver's sweep_dir.
    assert not (tmp_path / "sweeps" / "cluster" / "summary.json").exists()
    assert not (tmp_path / "sweeps" / "cluster" / "trials").exists()


@pytest.mark.slow
def test_sweep_survives_a_worker_node_dying_mid_sweep(ray_cluster):
    _gpu_workers(ray_cluster)
    # Longer trials than the others, so that worker_b dies with a trial half done: an epoch
    # reaches the shared folder up to a second or so after it ends (the driver's state save),
    # and on a quiet machine 6 epochs of 1 500 images were over by then (clean-clone CI).
    driver, sweep_dir = ray_cluster.sweep("failover", "train.epochs=8",
                                          "data.max_train_samples=3000")
    victim = ray_cluster.node_id("worker_b")
    survivor = ray_cluster.node_id("worker_a")
    try:
        wait_for(lambda: any(victim in epochs for epochs in _trial_nodes(sweep_dir).values()),
                  300, "a trial epoch on worker_b", every=0.2)
    finally:
        os.kill(ray_cluster.raylet("worker_b"), signal.SIGKILL)
    summary = ray_cluster.summary_when_done(driver, sweep_dir)

    assert summary["num_trials"] == 4
    assert summary["trial_counts"]["completed"] == 4
    nodes = _trial_nodes(sweep_dir)
    # The trial cut off on worker_b went on from its last checkpoint on worker_a: each of its
    # eight epochs was trained once.
    moved = [epochs for epochs in nodes.values() if victim in epochs and epochs[-1] == survivor]
    assert moved, nodes
    assert len(moved[0]) == 8


@pytest.mark.slow
def test_autoscaler_adds_worker_nodes_for_a_sweep_the_head_cannot_run(ray_cluster, tmp_path):
    config = _load(LOCAL_YAML)
    config["provider"]["gcs_address"] = ray_cluster.address
    autoscaling = tmp_path / "local.yaml"
    autoscaling.write_text(yaml.safe_dump(config))
    ray_cluster.start_head(f"--autoscaling-config={autoscaling}", RAY_FAKE_CLUSTER="1")
    driver, sweep_dir = ray_cluster.sweep("autoscaled")
    summary = ray_cluster.summary_when_done(driver, sweep_dir)

    assert summary["trial_counts"]["completed"] == 4
    used = {node for epochs in _trial_nodes(sweep_dir).values() for node in epochs}
    assert used and ray_cluster.node_id("head") not in used  # all on nodes the autoscaler added
    monitor_log = next(ray_cluster.temp_dir.glob("session_*/logs/monitor.log")).read_text()
    assert re.search(r"Launching \d+ nodes, type gpu_(1x|4x)", monitor_log)


@pytest.mark.slow
def test_a_users_model_reaches_worker_nodes_that_lack_its_folder(ray_cluster, tmp_path):
    """The driver imports my_models from a folder only it has on its path (PYTHONPATH, run
    from another folder): trials on the worker nodes import the copy Ray's runtime env shipped."""
    from test_own_model import write_user_folder

    ray_cluster.start_head()
    for name in ("worker_a", "worker_b"):
        ray_cluster.add_worker(name, "--num-cpus=1")
    code = write_user_folder(tmp_path / "code")
    module, calls = code / "my_models.py", tmp_path / "calls.jsonl"
    # Worker processes get no environment from the driver: the log's path is written in.
    module.write_text(module.read_text().replace('os.environ.get("MY_MODELS_CALLS")',
                                                 repr(str(calls))))
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    path = os.pathsep.join(filter(None, [str(code), ray_cluster.env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "sweeper", "--config-dir", str(code / "conf_mine"), *TINY_SWEEP,
         "resources.gpu_per_trial=0", "model=mlp", "search.space.model.width=choice(16, 32)",
         "name=mine", "cluster=remote", f"cluster.address={ray_cluster.address}",
         f"cluster.storage_path={tmp_path / 'shared'}"],
        cwd=driver_dir, env={**ray_cluster.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                             "PYTHONPATH": path},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "shared" / "mine" / "summary.json").read_text())
    assert summary["trial_counts"]["completed"] == 4
    used = {node for epochs in _trial_nodes(tmp_path / "shared" / "mine").values()
            for node in epochs}
    assert used == {ray_cluster.node_id("worker_a"), ray_cluster.node_id("worker_b")}
    built = [json.loads(line) for line in calls.read_text().splitlines()]
    on_workers = [call for call in built if call["file"] != str(module)]
    # Both worker nodes built the model from the shipped copy (the driver built it from its
    # own for its checks), every sampled width among them (a worker reuses a built model for
    # the next trial of the same width).
    assert len(on_workers) >= 2
    assert all("runtime_resources" in call["file"] for call in on_workers)
    sampled = {trial["config"]["model.width"] for trial in summary["trials"]}
    assert {call["width"] for call in on_workers} == sampled
