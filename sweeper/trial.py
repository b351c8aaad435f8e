"""What Ray runs on the workers: the trainable that trains one trial, and the final retrain.

A worker imports this module (Ray pickles these functions by reference) and the trainer it
calls, not the driver's side (searcher, search-space grammar, TensorBoard writer, Hydra):
every fresh worker pays its imports once, before its first trial trains.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune

from sweeper import checkpoint as trial_checkpoint
from sweeper import compat
from sweeper.config import SweepConfig, TrialSettings, apply_params
from sweeper.data import Splits
from sweeper.metrics import DIVERGED, FAILURE
from sweeper.trainer import TrialDiverged, WarmModel, configure_tensorflow, gpu_peak_mb, train

if TYPE_CHECKING:
    from sweeper.evaluate import RetrainedModel
    from sweeper.results import TrialRecord

logger = logging.getLogger(__name__)

# Tune's Trainable.restore logs "Restored on <ip> from checkpoint: <path>" at INFO in the
# trial's worker before the trial runs, and Ray sends the line, colour codes and all, to the
# driver's console; the driver's own event line says it for people (sweeper.progress).
logging.getLogger("ray.tune.trainable.trainable").setLevel(logging.WARNING)


# Lives as long as the worker process: a reused worker hands its compiled model to the next trial.
_WARM_MODEL = WarmModel()


def run_trial(params: dict[str, Any], *, splits: Splits, base: SweepConfig) -> None:
    """The Ray Tune trainable: train one sampled configuration, reporting every epoch.

    Every ``recovery.checkpoint_every`` epochs (and at the last) the report carries a
    checkpoint of the model and optimizer state; a retried trial continues from its last
    checkpoint. A diverged trial reports its non-finite figures once, flagged, and ends:
    a retry would only diverge again. Each report names the Ray node that trained the epoch.
    """
    trial_started_at = time.time()
    # Ray reuses this worker only if a stopped trial's thread ends within this many seconds
    # (default 2); tracing or a long validation pass can outlast that before the per-batch
    # stop check below is reached. Read by this process when the next trial arrives.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
    node, usable_gpus = _prepare_worker(base.resources.cpu_per_trial, base.search.reproducible,
                                        base.verbose)
    cfg = apply_params(base, params)
    settings = TrialSettings.of(cfg)  # what the trainer needs of it
    model, initial_epoch = None, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        model = _WARM_MODEL.get(settings, splits.input_shape, splits.num_classes)
    else:
        with checkpoint.as_directory() as folder:
            model, initial_epoch = trial_checkpoint.restore(
                Path(folder),
                lambda: _WARM_MODEL.get(settings, splits.input_shape, splits.num_classes))
        logger.info("Trial continues from its checkpoint after epoch %d", initial_epoch)
    every = base.recovery.checkpoint_every

    def with_context(metrics) -> dict[str, Any]:
        memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if usable_gpus:
            memory["gpu_peak_mb"] = gpu_peak_mb()
        return {**metrics.as_dict(), **node, **memory, "trial_started_at": trial_started_at,
                "reported_at": time.time()}

    def report(metrics, trained_model) -> None:
        if metrics.epoch % every and metrics.epoch < cfg.train.epochs:
            tune.report(with_context(metrics))
            return
        with tempfile.TemporaryDirectory() as folder:
            trial_checkpoint.save(trained_model, Path(folder), metrics.epoch)
            tune.report(with_context(metrics), checkpoint=tune.Checkpoint.from_directory(folder))

    try:
        train(settings, splits, on_epoch_end=report, model=model, initial_epoch=initial_epoch,
              should_stop=compat.trial_stop_check())
    except TrialDiverged as error:
        tune.report({**with_context(error.metrics), DIVERGED: True, FAILURE: str(error)})


_warned_gpu_unusable = False  # once per worker process, not once per trial it runs


def _prepare_worker(cpus: float, deterministic: bool = False,
                    verbose: int = 1) -> tuple[dict[str, str], int]:
    """Set TensorFlow up for the CPUs and GPUs Ray gave this task or trial.

    Returns where it runs (``node_id``, and ``gpu_ids`` when Ray gave GPUs) and how many
    GPUs TensorFlow can use. ``deterministic``: TensorFlow's op determinism
    (``search.reproducible``). Below ``verbose=2`` the worker does not send Ray Train's
    "Checkpoint successfully created" line per epoch to the driver's console.
    """
    global _warned_gpu_unusable
    node = {"node_id": ray.get_runtime_context().get_node_id()}
    gpu_ids = ray.get_gpu_ids()
    if gpu_ids:  # which GPU trained the trial; several trials share one with gpu_per_trial < 1
        node["gpu_ids"] = ",".join(str(gpu) for gpu in gpu_ids)
    else:
        # Ray leaves CUDA_VISIBLE_DEVICES alone for trials without a GPU; hide the node's GPUs
        # so TensorFlow takes no memory on GPUs that Ray gave to other trials.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if verbose < 2:
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    usable_gpus = configure_tensorflow(cpus, use_gpu=bool(gpu_ids), deterministic=deterministic)
    if gpu_ids and not usable_gpus and not _warned_gpu_unusable:
        # Nodes may declare GPUs to Ray that TensorFlow cannot drive (no CUDA build or driver).
        logger.warning("Ray gave this worker GPU %s but TensorFlow sees none, so it trains on "
                       "the CPU; for GPU training install TensorFlow with its CUDA libraries: "
                       "pip install 'tensorflow[and-cuda]'", node["gpu_ids"])
        _warned_gpu_unusable = True
    return node, usable_gpus


def retrain_cpus(cfg: SweepConfig, ray_cpus: float) -> float:
    """CPUs of the ``final.retrain`` task: it runs alone, after the search.

    With the Ray this process started (no ``cluster.address``), the machine is the sweep's:
    the retrain takes all ``ray_cpus`` it has (cnn_tuned's retrain on one trial's CPU took
    72 s an epoch, against 34 s on both cores: benchmarks/RESULTS.md "cnn_tuned"). On a
    joined cluster a trial's CPUs (a shared cluster's other work would leave a larger task
    waiting), and with ``search.reproducible`` too (the retrain trains as the trials did).
    """
    if cfg.cluster.address is not None or cfg.search.reproducible:
        return cfg.resources.cpu_per_trial
    return max(cfg.resources.cpu_per_trial, ray_cpus)


def retrain_on_cluster(cfg: SweepConfig, best: TrialRecord, splits: Splits) -> RetrainedModel:
    """``final.retrain`` as a Ray task with one trial's GPUs and :func:`retrain_cpus` CPUs.

    On a cluster the driver's machine may have no GPU (``cluster/gpu.yaml``'s head has none
    to give); the task trains on a node that could run a trial. A task cut off with its node
    is retried ``recovery.max_failures`` times.
    """
    from sweeper.evaluate import retrain_epochs

    cpus = retrain_cpus(cfg, ray.cluster_resources().get("CPU", 0.0))
    logger.info("Retraining trial %s on train+validation for %d epochs as a Ray task "
                "(%g CPUs, %g GPUs)", best.trial_id, retrain_epochs(cfg, best),
                cpus, cfg.resources.gpu_per_trial)
    task = ray.remote(_retrain_task).options(num_cpus=cpus,
                                             num_gpus=cfg.resources.gpu_per_trial,
                                             max_retries=cfg.recovery.max_failures)
    return ray.get(task.remote(cfg, best, splits, cpus))


def _retrain_task(cfg: SweepConfig, best: TrialRecord, splits: Splits,
                  cpus: float) -> RetrainedModel:
    from sweeper.evaluate import retrain_here  # only where a retrain runs

    node, _ = _prepare_worker(cpus, cfg.search.reproducible, cfg.verbose)
    retrained = retrain_here(cfg, best, splits)
    return dataclasses.replace(retrained, node_id=node["node_id"], gpu_ids=node.get("gpu_ids"),
                               cpus=cpus)


