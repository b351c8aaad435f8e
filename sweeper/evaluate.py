"""The best trial, once, on the test split no trial saw; and the files a user takes away.

After the search picked a trial on validation scores only, :func:`export_best`
saves its model (its own checkpoint at the epoch it reported, or a retrain on
train+validation when ``final.retrain`` asks for one, run by a *retrainer*: here
in this process, or on the cluster by :func:`sweeper.trial.retrain_on_cluster`)
as ``best_model.keras``,
scores that saved file on the test split, and writes the config that trains it
again as ``best_config.yaml``. The scores themselves are plain numpy
(:func:`classification_metrics`), so they can be checked without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from sweeper.builder import from_logits, model_target
from sweeper.config import SweepConfig, TrialSettings, apply_params
from sweeper.data import Splits
from sweeper.layout import SweepLayout, write_json
from sweeper.results import TrialRecord
from sweeper.summary import Baseline

logger = logging.getLogger(__name__)

PREDICT_BATCH = 256

SOURCE_CHECKPOINT = "checkpoint"
SOURCE_RETRAIN = "retrain"


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int,
                           class_names: list[str] | tuple[str, ...] | None = None
                           ) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, per-class figures and the confusion matrix.

    The macro averages are taken over the classes that occur in ``y_true`` or ``y_pred``
    (scikit-learn's ``precision_recall_fscore_support(average="macro")`` with its default
    labels): a class absent from both says nothing about the model, and averaging its zeros
    in made two-class test data with accuracy 0.98 score a macro F1 of 0.20 (issue 20). A
    scored class never predicted (or never present) counts 0 precision (or recall) rather
    than NaN, as scikit-learn does with ``zero_division=0``. ``per_class["scored"]`` says
    which classes the averages include.

    Args:
        y_true: True labels, shape (N,).
        y_pred: Predicted labels, shape (N,).
        num_classes: Rows and columns of the confusion matrix.
        class_names: The name of each class, as ``per_class["class_names"]``; None names
            them by their labels 0..num_classes-1.

    Returns:
        JSON-ready dict; ``confusion_matrix[i][j]`` counts true class i predicted as j.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    hits = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    support = matrix.sum(axis=1).astype(float)
    precision = np.divide(hits, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros(num_classes), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(num_classes), where=both > 0)
    scored = (support > 0) | (predicted > 0)

    def macro(values: np.ndarray) -> float:
        return float(values[scored].mean()) if scored.any() else 0.0

    return {
        "num_samples": int(len(y_true)),
        "accuracy": float(hits.sum() / max(len(y_true), 1)),
        "precision_macro": macro(precision),
        "recall_macro": macro(recall),
        "f1_macro": macro(f1),
        "per_class": {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": support.astype(int).tolist(),
            "scored": scored.tolist(),
            "class_names": [str(name) for name in (class_names or range(num_classes))],
        },
        "confusion_matrix": matrix.tolist(),
    }


def majority_baseline(splits: Splits) -> Baseline:
    """The majority-class baseline of ``splits``: the training split's most frequent class
    (of equally frequent ones the lowest label, as scikit-learn's
    ``DummyClassifier(strategy="most_frequent")`` fit on ``y_train`` picks it) and the
    accuracy of always predicting it on the validation and test splits (None for an empty
    split). Every score of the sweep is shown beside it (summary.json's ``baseline``)."""
    label = int(np.bincount(np.asarray(splits.y_train, dtype=np.int64),
                            minlength=splits.num_classes).argmax())

    def accuracy(labels: np.ndarray) -> float | None:
        return float(np.mean(np.asarray(labels) == label)) if len(labels) else None

    return Baseline(class_index=label, class_name=str(splits.class_names[label]),
                    val_accuracy=accuracy(splits.y_val), test_accuracy=accuracy(splits.y_test),
                    val_samples=int(len(splits.y_val)), test_samples=int(len(splits.y_test)))


def predict_labels(model, images: np.ndarray) -> np.ndarray:
    """Class predictions of a Keras classifier for uint8 images."""
    return np.argmax(model.predict(images, batch_size=PREDICT_BATCH, verbose=0), axis=1)


def best_config(cfg: SweepConfig, best: TrialRecord) -> SweepConfig:
    """``cfg`` with the best trial's sampled values filled in."""
    return apply_params(cfg, best.config)


def retrain_config(cfg: SweepConfig, best: TrialRecord) -> dict[str, Any]:
    """The best trial's full config as a primary Hydra config that trains it once more.

    Everything is the sweep's composed config with the sampled values filled in, so the
    trial-level settings are the best trial's: model, data and split, seed, train.epochs
    (the budget its learning-rate schedule spans) and train.patience. The sweep-level
    settings are those of a sweep of this one trial (:data:`BEST_CONFIG_HEADER` says why):
    each searched setting pinned with a one-value ``choice``, one trial, no scheduler, no
    time budget, no warm start, the study in the new sweep's own folder, and a new name (so
    the original sweep folder is not resumed).
    """
    filled = OmegaConf.to_container(OmegaConf.structured(best_config(cfg, best)))
    space: dict[str, dict[str, str]] = {}
    for key, value in best.config.items():
        group, _, name = key.partition(".")
        space.setdefault(group, {})[name] = f"choice({_hydra_literal(value)})"
    filled["search"].update(space=space, num_trials=1, time_budget_s=None, warm_start=None,
                            warm_start_study=None, storage=None)
    filled["scheduler"]["name"] = "none"
    filled["name"] = f"{cfg.name}_best"
    filled["sweep_dir"] = "sweeps/${name}"
    return {
        "defaults": ["sweep_schema", "_self_"],
        **filled,
        "hydra": {"run": {"dir": "${sweep_dir}"}, "output_subdir": ".hydra",
                  "job": {"name": "sweep", "chdir": False}},
    }


def _hydra_literal(value: Any) -> str:
    """``value`` in Hydra's override grammar: read back, it is the same value of the same type
    (lists and dicts, nested too, for a builder's settings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_hydra_literal(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{name}: {_hydra_literal(item)}"
                               for name, item in value.items()) + "}"
    return repr(value)


# What "train the best configuration again" means, setting by setting: best_config.yaml's
# header below the first lines that name the trial and the command.
BEST_CONFIG_HEADER = """\
# It trains what the best trial trained: the same model, data, split, seed (initial weights,
# data order, augmentation) and training settings. train.epochs is the sweep's: the budget
# the learning-rate schedule and warmup span, as in the best trial, and the epochs the run
# trains. Its first epochs train as the best trial's did (same seed, data order and rates);
# where the best trial was stopped early (by ASHA or the time budget) this run goes on to
# train.epochs (train.patience still applies), and its summary picks the best epoch again.
# What belonged to the search rather than to the trial is set for a sweep of one trial:
#   search.num_trials 1, the searched settings pinned with choice(best value);
#   scheduler none (ASHA stops a trial only against other trials);
#   search.time_budget_s null (a budget of the search, not of the trial: the run trains to
#   its end); search.warm_start null; search.storage null (the study goes to the new sweep's
#   own folder, not into the sweep it came from); a new name and folder (<name>_best).
# final.retrain (if true) retrains on train+validation for the best epoch's count, with the
# learning rates of the same epochs of the full train.epochs schedule.
"""


def write_best_config(cfg: SweepConfig, best: TrialRecord, sweep_dir: Path) -> Path:
    path = SweepLayout(sweep_dir).best_config
    header = (
        f"# The best trial ({best.trial_id}) of sweep '{cfg.name}': the composed config with its\n"
        "# sampled values filled in and pinned. Train it again in a sweep of its own with\n"
        "#   python -m sweeper --config-dir FOLDER --config-name best_config\n"
        f"# where FOLDER is the one that holds this file (the sweep folder, {sweep_dir.name}/).\n"
        + BEST_CONFIG_HEADER
    )
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(retrain_config(cfg, best))))
    return path


@dataclass(frozen=True)
class RetrainedModel:
    """A model retrained for ``final.retrain``: its ``.keras`` archive, and where it trained
    (the Ray node, its GPUs and CPUs; None when it trained in this process)."""

    archive: bytes
    node_id: str | None = None
    gpu_ids: str | None = None
    cpus: float | None = None


Retrainer = Callable[[SweepConfig, TrialRecord, Splits], RetrainedModel]


def retrain_epochs(cfg: SweepConfig, best: TrialRecord) -> int:
    """Epochs of a retrain: as many as the best trial had trained when it scored best."""
    return best.best_epoch or cfg.train.epochs


def retrain_model(cfg: SweepConfig, best: TrialRecord, splits: Splits):
    """A fresh model of the best config trained on train+validation for its best epoch count.

    It trains as the best trial did up to the epoch it scored best at: the learning-rate
    schedule (and warmup) stays defined over the sweep's ``train.epochs``, so the rate at
    epoch k is the best trial's at epoch k, and training ends after :func:`retrain_epochs`
    epochs. The trainer still wants a validation split; it gets the validation images, which
    are now part of training, so its validation figures mean nothing: they are not used, and
    ``train.patience`` (which would stop on them) is off.
    """
    from sweeper.trainer import train

    cfg_best = best_config(cfg, best)
    cfg_best.train.patience = 0
    epochs = retrain_epochs(cfg, best)
    merged = dataclasses.replace(
        splits,
        x_train=np.concatenate([splits.x_train, splits.x_val]),
        y_train=np.concatenate([splits.y_train, splits.y_val]),
    )
    logger.info("Retraining trial %s on train+validation for %d of %d epochs", best.trial_id,
                epochs, cfg_best.train.epochs)
    return train(TrialSettings.of(cfg_best), merged, last_epoch=epochs)


def retrain_here(cfg: SweepConfig, best: TrialRecord, splits: Splits) -> RetrainedModel:
    """:func:`retrain_model` in this process, returned as its saved archive."""
    from sweeper.model import save_portable

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / SweepLayout.BEST_MODEL
        save_portable(retrain_model(cfg, best, splits), path)
        return RetrainedModel(path.read_bytes())


def export_best(cfg: SweepConfig, best: TrialRecord, splits: Splits, sweep_dir: Path,
                retrainer: Retrainer = retrain_here) -> dict[str, Any] | None:
    """Save the best model and its config; score the saved model on the test split.

    Writes ``best_model.keras`` (raw uint8 images of the data's shape in, one probability
    per class out), ``best_config.yaml`` and ``best_model.json`` (where the model came from,
    its input shape, its class names in output order, and its test scores, which
    re-reporting reads back). ``retrainer``
    trains the model when ``final.retrain`` asks for it or the trial kept no checkpoint.

    Returns:
        The test block for summary.json, or None when ``final.evaluate`` is false.
    """
    import keras

    from sweeper import checkpoint as trial_checkpoint
    from sweeper.model import save_portable
    from sweeper.trainer import build_model

    layout = SweepLayout(Path(sweep_dir))
    path = layout.best_model
    checkpoint = Path(best.best_checkpoint) if best.best_checkpoint else None
    retrain = cfg.final.retrain
    if not retrain and (checkpoint is None or not trial_checkpoint.exists(checkpoint)):
        logger.warning("Trial %s kept no checkpoint of epoch %s; retraining it instead",
                       best.trial_id, best.best_epoch)
        retrain = True
    retrained = None
    if retrain:
        retrained = retrainer(cfg, best, splits)
        path.write_bytes(retrained.archive)
    else:
        model, _ = trial_checkpoint.restore(
            checkpoint,
            lambda: build_model(TrialSettings.of(best_config(cfg, best)), splits.input_shape,
                                splits.num_classes))
        save_portable(model, path)
    write_best_config(cfg, best, sweep_dir)

    test = None
    if cfg.final.evaluate:
        model = keras.models.load_model(path)  # score the file users get, not an in-memory twin
        test = classification_metrics(splits.y_test, predict_labels(model, splits.x_test),
                                      splits.num_classes, splits.class_names)
        test.update(trial_id=best.trial_id, epoch=best.best_epoch,
                    source=SOURCE_RETRAIN if retrain else SOURCE_CHECKPOINT)
    info = {"trial_id": best.trial_id, "epoch": best.best_epoch,
            "source": SOURCE_RETRAIN if retrain else SOURCE_CHECKPOINT,
            "checkpoint": None if retrain else layout.relative(checkpoint),
            # What the model takes and gives: raw uint8 images of this shape, and one
            # probability per class in this order.
            "input_shape": list(splits.input_shape), "input_dtype": "uint8",
            "class_names": list(splits.class_names), "test": test,
            # The code that built it: its module must be importable to load a model with
            # custom layers (registered with keras.saving.register_keras_serializable).
            "builder": model_target(cfg.model),
            "import": model_target(cfg.model).rpartition(".")[0],
            "outputs": "logits" if from_logits(cfg.model) else "probabilities"}
    if retrained is not None and retrained.node_id is not None:
        info["retrained_on"] = {"node_id": retrained.node_id, "gpu_ids": retrained.gpu_ids,
                                "cpus": retrained.cpus}
    write_json(layout.best_model_info, info, indent=2)
    return test
