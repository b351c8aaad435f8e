"""Checks for sweeps that run on a Ray cluster of several machines.

A trial may run on any node, and Ray Tune writes each trial's results and
checkpoints where that trial runs; the driver (summary, TensorBoard) writes on
its own node. On more than one machine they only meet in one sweep folder if
that folder is on storage every node mounts, so joining a cluster requires
``cluster.storage_path``. :func:`validate_cluster` runs with the other config
checks, before Ray starts; :func:`log_cluster` says what the sweep found once
connected.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sweeper.config import ClusterConfig, ConfigError
from sweeper.summary import counted

logger = logging.getLogger(__name__)


def joins_cluster(cluster: ClusterConfig) -> bool:
    """Whether the sweep joins a running (possibly multi-node) cluster instead of starting Ray."""
    return bool(cluster.address)


def validate_cluster(cluster: ClusterConfig) -> None:
    """Require shared storage when joining a cluster; raises ConfigError before Ray starts."""
    storage = cluster.storage_path
    if storage and "://" in storage:
        raise ConfigError("cluster.storage_path", storage,
                          "must be a folder every node mounts (e.g. EFS or NFS at "
                          "/mnt/shared/sweeps); object-store URIs are not supported")
    if joins_cluster(cluster) and not storage:
        raise ConfigError("cluster.storage_path", storage,
                          "a folder every node mounts (e.g. /mnt/shared/sweeps) is required "
                          f"with cluster.address={cluster.address!r}: trials write their results "
                          "on whichever node runs them")
    if joins_cluster(cluster) and not Path(storage).expanduser().is_absolute():
        raise ConfigError("cluster.storage_path", storage,
                          "must be an absolute path, the same on every node")
    for key in ("num_cpus", "num_gpus"):
        value = getattr(cluster, key)
        if joins_cluster(cluster) and value is not None:
            raise ConfigError(f"cluster.{key}", value,
                              "must be null when joining a cluster: its nodes declare their own "
                              "resources (it limits the in-process Ray only)")


def log_cluster() -> None:
    """Log the nodes and resources of the Ray the sweep is connected to."""
    import ray

    nodes = [node for node in ray.nodes() if node["Alive"]]
    resources = ray.cluster_resources()
    logger.info("Ray cluster: %s, %s, %s", counted(len(nodes), "node"),
                counted(float(resources.get("CPU", 0)), "CPU"),
                counted(float(resources.get("GPU", 0)), "GPU"))
