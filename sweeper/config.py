"""Typed sweep configuration and its validation.

Hydra composes ``conf/`` on top of :class:`SweepConfig` (registered in the
ConfigStore as ``sweep_schema``), so unknown keys and wrong types fail at
composition with Hydra's own message. Range checks and cross-field checks live
here, in :func:`validate`, which runs before Ray starts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, get_type_hints

from sweeper.metrics import METRIC_NAMES
from sweeper.summary import counted

if TYPE_CHECKING:
    from omegaconf import DictConfig

MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"

DATASETS = ("mnist", "fashion_mnist", "image_folder", "npz", "cifar10", "cifar100")
# Datasets read from a file or folder the user names; the others have a download or a default.
LOCAL_DATASETS = ("fashion_mnist", "image_folder", "npz")
COLOR_MODES = ("rgb", "grayscale")
PADDINGS = ("valid", "same")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
# Learning-rate schedules over the sweep's full budget (train.epochs), after linear warmup.
SCHEDULES = ("constant", "cosine", "exponential", "step")
FLIPS = ("none", "horizontal", "vertical", "horizontal_and_vertical")
POOLINGS = ("flatten", "global_average")
# Keras dtype policies: float16 compute suits GPUs with tensor cores, bfloat16 newer GPUs/CPUs.
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
JIT_COMPILE = ("auto", "true", "false")  # auto: XLA on GPUs, not on CPUs (Keras' default)
SAMPLERS = ("tpe", "random")
SCHEDULERS = ("asha", "none")
MODES = ("min", "max")
# The builder of the classic CNN; a model config's _target_ names any other (sweeper.builder).
CNN_TARGET = "sweeper.model.cnn"
# The builder of a pretrained keras.applications backbone with a head (model=backbone), and the
# backbones it builds, as keras.applications names them.
BACKBONE_TARGET = "sweeper.backbone.backbone"
BACKBONES = ("MobileNetV3Small", "MobileNetV3Large", "EfficientNetV2B0", "ResNet50V2")
IMAGENET = "imagenet"


class ConfigError(ValueError):
    """A user's configuration mistake: one readable line naming key, value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")

    @classmethod
    def from_line(cls, line: str) -> ConfigError:
        """A ConfigError whose message is ``line``, already in the ``KEY=VALUE is invalid:
        ...`` form (Hydra's composition errors, put in one line by sweeper.overrides)."""
        setting, _, allowed = line.partition(" is invalid: ")
        error = cls(setting.partition("=")[0], None, allowed)
        error.args = (line,)  # the message as it came, value and all
        return error


# Field metadata: why a setting may not be sampled by search.space (absent: it may). The one
# rule for which keys a search can change: each reason names what would really happen.
NOT_SEARCHABLE = "not_searchable"
_LOADED_ONCE = ("the driver loads and splits the dataset once per sweep, so every trial trains "
                "on the same images; set it for the whole sweep instead")


def per_sweep(default: Any, why: str = _LOADED_ONCE) -> Any:
    """A dataclass field that stays the same for every trial of a sweep, and says why."""
    return field(default=default, metadata={NOT_SEARCHABLE: why})


@dataclass
class DataConfig:
    """Where the images come from and how much of them a sweep uses."""

    name: str = per_sweep("mnist")
    # A local file or folder; for mnist, None means Keras' downloader and cache.
    path: str | None = per_sweep(None)
    # Download source and checksum for mnist through keras.utils.get_file.
    url: str | None = per_sweep(MNIST_URL)
    sha256: str | None = per_sweep(MNIST_SHA256)
    # Seeded random subsets, for smoke runs and tests; None keeps everything.
    max_train_samples: int | None = per_sweep(None)
    max_test_samples: int | None = per_sweep(None)
    # [height, width] every image is resized to, bilinear, once when the data is loaded
    # (None: the images' own size; an image folder's must then all share one).
    image_size: list[int] | None = per_sweep(None)
    # Image folders only: rgb | grayscale (None: rgb if any image has colour).
    color_mode: str | None = per_sweep(None)
    # Image folders of one level of class folders: the share of each class held out as the
    # test split, chosen with this seed (always the same images for the same folder).
    test_fraction: float = per_sweep(0.2)
    seed: int = per_sweep(0)


@dataclass
class ModelConfig:
    """The classic MNIST CNN: Conv(f)-Pool-Conv(2f)-Pool-Conv(2f)-Flatten-Dense-Dense(K),
    built for the data's input shape and its K classes by :func:`sweeper.model.cnn`.

    A model of the user's own is a plain mapping instead (its keys are its builder's
    keyword arguments, checked against the builder's signature by sweeper.builder).
    """

    _target_: str = per_sweep(CNN_TARGET, "one model family per sweep")
    name: str = per_sweep("cnn", "one model family per sweep")
    filters: int = 32
    kernel_size: int = 3
    dense_units: int = 64
    dropout: float = 0.0
    l2: float = 0.0
    # Convolutions and poolings: valid (the classic network; each layer shrinks the image)
    # or same (zero-padded: small images keep their size through the convolutions).
    padding: str = "valid"
    # Depth: 0 is the classic network (three convolutions, two poolings); N >= 1 stacks N
    # blocks of ``convs_per_block`` convolutions of filters * 2**block each, every block
    # ending in a 2x2 max pooling (VGG-style; each block halves the image).
    blocks: int = 0
    convs_per_block: int = 1
    # Batch normalization between every convolution and its ReLU.
    batch_norm: bool = False
    # How the last feature map becomes a vector: flatten (the classic network) or
    # global_average (one value per channel: far fewer dense weights).
    pooling: str = "flatten"
    # Dropout placement: ``dropout`` before the output layer (the classic place);
    # ``conv_dropout`` after every pooling (spatial regularization).
    conv_dropout: float = 0.0


@dataclass
class TrainConfig:
    """How a trial trains; ``epochs`` is also the scheduler's full budget."""

    epochs: int = per_sweep(10, "it is the sweep's epoch budget (ASHA's max_t, and the full "
                                "budget every trial is measured against); set train.epochs=N "
                                "and let the scheduler decide how far each trial goes")
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    validation_fraction: float = per_sweep(
        0.1, "the driver splits train/validation once per sweep, so that every trial is "
             "scored on the same images; set it for the whole sweep instead")
    seed: int = 0
    precision: str = "float32"
    jit_compile: str = "auto"
    # Optimizer details: momentum of sgd and rmsprop (adam and adamw have their own betas and
    # ignore it, so one search may sample both), Nesterov's variant for sgd, decoupled
    # weight decay (Keras applies it to every optimizer: adamw is Adam with it, Loshchilov &
    # Hutter), and clipping of the gradients' global norm (0: off).
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    clip_norm: float = 0.0
    # Cross-entropy against labels smoothed toward the uniform distribution (0: off).
    label_smoothing: float = 0.0
    # Learning rate over the full budget train.epochs (a trial ASHA stops early saw the rates
    # it would have seen going on): linear warmup from lr / warmup steps to lr over
    # ``warmup_epochs``, then constant, cosine (to lr * min_lr_ratio), exponential (to
    # lr * decay_rate at the end) or step (times decay_rate at 1/2 and 3/4 of the budget).
    schedule: str = "constant"
    warmup_epochs: int = 0
    min_lr_ratio: float = 0.0
    decay_rate: float = 0.1
    # Augmentation, in training only (Keras preprocessing layers inside the model, inactive
    # when it predicts): random flip; translation, zoom as a fraction of the image's size;
    # rotation as a fraction of a full turn; contrast factor; erasing: the chance that a random
    # patch of each image is replaced by noise (random erasing / cutout). 0 / none: off.
    flip: str = "none"
    translation: float = 0.0
    rotation: float = 0.0
    zoom: float = 0.0
    contrast: float = 0.0
    erasing: float = 0.0
    # Within-trial early stopping: stop after this many epochs without a better
    # search.metric (0: off; for sweeps without a scheduler, which stops trials itself).
    patience: int = 0


@dataclass
class SearchConfig:
    """The searcher: Optuna sampler, objective and search space (Hydra sweep grammar)."""

    sampler: str = "tpe"
    num_trials: int = 20
    metric: str = "val_accuracy"
    mode: str = "max"
    seed: int = 0
    # TPE samples at random until this many trials have finished.
    n_startup_trials: int = 5
    # TPE models the parameters jointly (learns that sgd wants a larger learning rate than
    # adam) instead of one at a time.
    multivariate: bool = True
    # Optuna RDB storage URL; None keeps the study in Optuna's journal file
    # <sweep_dir>/optuna.log (a sweep folder begun with optuna.db keeps that SQLite file).
    storage: str | None = None
    # Run one trial at a time, so that the scheduler's decisions and the sampler's history come
    # in the same order on every run: the same command then gives the same trials and best.
    reproducible: bool = False
    # Seed the sampler with an earlier sweep's trials: its folder, a study file or a URL.
    warm_start: str | None = None
    # The study to read from warm_start; None takes its only study.
    warm_start_study: str | None = None
    # The first trial trains the config's own values of the searched settings (a recipe the
    # experiment chose), before the sampler's: a time-limited search starts from it.
    start_with_defaults: bool = False
    # Seconds after which no new trial starts; running trials pause at their next epoch and
    # the sweep ends with its results, resumable by a re-run (which gets the budget anew).
    # None: no limit.
    time_budget_s: float | None = None
    # Nested by config path, e.g. {"train": {"lr": "tag(log, interval(1e-4, 1e-1))"}}.
    space: dict[str, Any] = field(default_factory=dict)


@dataclass
class SchedulerConfig:
    """Early stopping. ASHA's budget unit is the epoch; its max is train.epochs."""

    name: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 3
    # Also stop a trial at a rung that is behind what the others reached in fewer epochs
    # (sweeper.scheduler); false: Ray's ASHA as it is.
    compare_earlier_epochs: bool = True


@dataclass
class ClusterConfig:
    """Where trials run: a Ray started inside this process, or an existing cluster."""

    # None starts Ray in-process; "auto" or "ray://host:10001" joins a cluster.
    address: str | None = None
    # Limits for the in-process Ray; None uses what the machine has.
    num_cpus: int | None = None
    num_gpus: int | None = None
    # A folder every node mounts (EFS, NFS); the sweep is written to <storage_path>/<name>.
    # Required with an address: trials write their results on whichever node runs them.
    storage_path: str | None = None


@dataclass
class ResourcesConfig:
    cpu_per_trial: float = 1.0
    # Fractions let several small trials share one GPU.
    gpu_per_trial: float = 0.0
    # None runs as many trials at once as the resources allow.
    max_concurrent_trials: int | None = None
    # Run the next trial in a finished trial's worker process instead of starting a new one.
    reuse_actors: bool = True


@dataclass
class RecoveryConfig:
    """What survives a trial's process dying: checkpoints and retries."""

    # Epochs between trial checkpoints (model and optimizer state).
    checkpoint_every: int = 1
    # Checkpoints kept per trial, best by the search metric; Ray also keeps the latest.
    keep_checkpoints: int = 1
    # Retries of a trial whose worker died, each from its last checkpoint.
    max_failures: int = 2


@dataclass
class ResumeConfig:
    """Re-running an interrupted sweep resumes it."""

    # Trials that had ended in an error: retry them from their checkpoint, or keep them failed.
    errored: str = "retry"


RESUME_ERRORED = ("retry", "skip")


@dataclass
class FinalConfig:
    """What happens to the best trial after the search."""

    # Score the best trial once on the test split that no trial saw.
    evaluate: bool = True
    # Retrain the best config on train+validation for its best epoch count before scoring,
    # at the learning rates the best trial had in those epochs (its schedule spans
    # train.epochs; no train.patience); false scores the best trial's own checkpoint.
    retrain: bool = False


@dataclass
class SweepConfig:
    name: str = "default"
    sweep_dir: str = "sweeps/${name}"
    # Start a new sweep under a new name even if this name holds an earlier one.
    fresh: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    # ModelConfig for the CNN; a dict of _target_ and its builder's keyword arguments for a
    # model of the user's own (OmegaConf's unions take no dataclasses, hence Any).
    model: Any = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    # What the console shows: 0 the plan, warnings and the results; 1 also one line per trial
    # event; 2 also the composed config and Ray's, TensorFlow's and Optuna's own output.
    verbose: int = 1


def register_configs() -> None:
    """Make the schema available to conf/config.yaml's defaults list."""
    # Imported here: every trial worker imports this module for the dataclasses, and Hydra's
    # config store costs a fresh worker start-up time it never uses.
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(SweepConfig)
    # An empty model: conf/model/cnn.yaml brings the CNN's typed schema (model/cnn_schema), a
    # user's model file its own free-form keys, and neither inherits the other's settings.
    schema.model = {}
    ConfigStore.instance().store(name="sweep_schema", node=schema)
    ConfigStore.instance().store(name="cnn_model_schema", node=ModelConfig, package="model")


# The config groups a search space may touch: what a trial trains with.
SEARCHABLE_GROUPS = ("data", "model", "train")


def setting_type(group: str, name: str) -> type | None:
    """The declared Python type (int, float, bool or str) of ``<group>.<name>``; None if the
    group cannot be searched or has no such setting. ``int | None`` counts as int."""
    if group not in SEARCHABLE_GROUPS:
        return None
    schema = type(getattr(SweepConfig(), group))
    declared = get_type_hints(schema).get(name)
    if declared is None:
        return None
    options = [t for t in getattr(declared, "__args__", (declared,)) if t is not type(None)]
    return options[0] if len(options) == 1 and options[0] in (int, float, bool, str) else None


def not_searchable_reason(group: str, name: str) -> str | None:
    """Why ``search.space.<group>.<name>`` cannot change a trial; None when it can."""
    schema = type(getattr(SweepConfig(), group))
    for item in fields(schema):
        if item.name == name:
            return item.metadata.get(NOT_SEARCHABLE)
    return None


def max_concurrent_trials(cfg: SweepConfig) -> int | None:
    """Trials that may run at once: 1 for a reproducible sweep, else the resources' limit."""
    return 1 if cfg.search.reproducible else cfg.resources.max_concurrent_trials


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _one_of(key: str, value: Any, options: tuple[str, ...]) -> None:
    _require(value in options, key, value, f"must be one of {', '.join(options)}")


def validate_trial_settings(data: DataConfig, model: ModelConfig | Mapping[str, Any],
                            train: TrainConfig) -> None:
    """Check everything a single trial trains with; also run on each search-space bound."""
    _one_of("data.name", data.name, DATASETS)
    for key in ("max_train_samples", "max_test_samples"):
        value = getattr(data, key)
        _require(value is None or value >= 20, f"data.{key}", value, "must be >= 20 or null")
    if data.name in ("mnist", "cifar10", "cifar100") and data.path is None:
        _require(bool(data.url), "data.url", data.url, "a URL is needed when data.path is null")
    if data.name in LOCAL_DATASETS:
        reads = {"fashion_mnist": "IDX files from a folder", "npz": "an .npz file",
                 "image_folder": "a folder of class folders of images"}[data.name]
        _require(bool(data.path), "data.path", data.path, f"data={data.name} reads {reads}")
    folder = data.name == "image_folder"
    if data.image_size is not None:
        _require(len(data.image_size) == 2 and all(side >= 1 for side in data.image_size),
                 "data.image_size", data.image_size, "must be [height, width] in pixels, or null")
    if data.color_mode is not None:
        _require(folder, "data.color_mode", data.color_mode,
                 "only data=image_folder converts images; leave it null")
        _one_of("data.color_mode", data.color_mode, COLOR_MODES)
    _require(0.0 < data.test_fraction < 1.0, "data.test_fraction", data.test_fraction,
             "must be in (0, 1)")

    if isinstance(model, ModelConfig):  # a user's model: its builder checks its own keys
        _require(model.filters >= 1, "model.filters", model.filters, "must be >= 1")
        _require(1 <= model.kernel_size <= 4, "model.kernel_size", model.kernel_size,
                 "must be 1 to 4 (28x28 images shrink to nothing through three larger kernels)")
        _require(model.dense_units >= 1, "model.dense_units", model.dense_units, "must be >= 1")
        _require(0.0 <= model.dropout < 1.0, "model.dropout", model.dropout, "must be in [0, 1)")
        _require(model.l2 >= 0.0, "model.l2", model.l2, "must be >= 0")
        _one_of("model.padding", model.padding, PADDINGS)
        _require(0 <= model.blocks <= 8, "model.blocks", model.blocks,
                 "must be 0 (the classic network) to 8 conv blocks")
        _require(model.convs_per_block >= 1, "model.convs_per_block", model.convs_per_block,
                 "must be >= 1")
        _one_of("model.pooling", model.pooling, POOLINGS)
        _require(0.0 <= model.conv_dropout < 1.0, "model.conv_dropout", model.conv_dropout,
                 "must be in [0, 1)")

    elif model.get("_target_") == BACKBONE_TARGET:
        validate_backbone(model)

    _require(train.epochs >= 1, "train.epochs", train.epochs, "must be >= 1")
    _require(train.batch_size >= 1, "train.batch_size", train.batch_size, "must be >= 1")
    _one_of("train.optimizer", train.optimizer, OPTIMIZERS)
    _one_of("train.precision", train.precision, PRECISIONS)
    _one_of("train.jit_compile", str(train.jit_compile).lower(), JIT_COMPILE)
    _require(math.isfinite(train.lr) and train.lr > 0, "train.lr", train.lr,
             "must be a positive number")
    _require(0.0 < train.validation_fraction < 1.0, "train.validation_fraction",
             train.validation_fraction, "must be in (0, 1)")
    _require(0.0 <= train.momentum < 1.0, "train.momentum", train.momentum, "must be in [0, 1)")
    for key in ("weight_decay", "clip_norm"):
        value = getattr(train, key)
        _require(math.isfinite(value) and value >= 0, f"train.{key}", value,
                 "must be >= 0 (0: off)")
    _require(0.0 <= train.label_smoothing < 1.0, "train.label_smoothing",
             train.label_smoothing, "must be in [0, 1)")
    _one_of("train.schedule", train.schedule, SCHEDULES)
    _require(0 <= train.warmup_epochs < train.epochs, "train.warmup_epochs",
             train.warmup_epochs, f"must be >= 0 and below train.epochs ({train.epochs})")
    _require(0.0 <= train.min_lr_ratio <= 1.0, "train.min_lr_ratio", train.min_lr_ratio,
             "must be in [0, 1]")
    _require(0.0 < train.decay_rate <= 1.0, "train.decay_rate", train.decay_rate,
             "must be in (0, 1]")
    _one_of("train.flip", train.flip, FLIPS)
    for key in ("translation", "rotation", "zoom", "contrast"):
        value = getattr(train, key)
        _require(0.0 <= value < 1.0, f"train.{key}", value, "must be in [0, 1) (0: off)")
    _require(0.0 <= train.erasing <= 1.0, "train.erasing", train.erasing,
             "must be in [0, 1] (the chance an image gets a patch erased; 0: off)")
    _require(train.patience >= 0, "train.patience", train.patience,
             "must be >= 0 epochs (0: no early stopping within a trial)")


def validate_backbone(model: Mapping[str, Any]) -> None:
    """Check the settings of ``model=backbone`` (sweeper.backbone.backbone); the keys it lacks
    take the builder's defaults. Whether a weights file fits the backbone is checked when the
    model is first built, on the driver before Ray starts (sweeper.model.check_network).

    Raises:
        ConfigError: an unknown backbone, weights that are neither ``imagenet``, null nor an
            existing file, or a head or fine-tuning setting out of its range.
    """
    _one_of("model.name", model.get("name", BACKBONES[0]), BACKBONES)
    weights = model.get("weights", IMAGENET)
    if weights is not None and weights != IMAGENET:
        import os

        _require(os.path.isfile(os.path.expanduser(str(weights))), "model.weights", weights,
                 "no such file; give imagenet (Keras' download and cache, ~/.keras/models/), "
                 "null (random initialization) or the path of a weights file")
    dropout = model.get("dropout", 0.0)
    _require(isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0, "model.dropout",
             dropout, "must be in [0, 1)")
    units = model.get("dense_units", 0)
    _require(isinstance(units, int) and units >= 0, "model.dense_units", units,
             "must be >= 0 (0: no hidden layer in the head)")
    fraction = model.get("trainable_fraction", 0.0)
    _require(isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0,
             "model.trainable_fraction", fraction,
             "must be in [0, 1] (0: the backbone frozen, 1: all of it trained)")


def with_absolute_weights(model: dict[str, Any]) -> dict[str, Any]:
    """A backbone's config with a relative ``model.weights`` path made absolute: trials build
    the model in their own working folder, not the one the sweep was started from."""
    weights = model.get("weights")
    if model.get("_target_") != BACKBONE_TARGET or weights in (None, IMAGENET):
        return model
    import os

    return {**model, "weights": os.path.abspath(os.path.expanduser(str(weights)))}


def cnn_stages(model: ModelConfig) -> list[str]:
    """The CNN's layers that change the image's size, in order: "convolution" or "pooling"
    names as :func:`sweeper.model.cnn` stacks them."""
    if model.blocks == 0:  # the classic network: three convolutions, two poolings between
        return ["first convolution", "first pooling", "second convolution", "second pooling",
                "third convolution"]
    stages = []
    for block in range(1, model.blocks + 1):
        stages += [f"block {block} convolution"] * model.convs_per_block
        stages.append(f"block {block} pooling")
    return stages


def feature_map_size(model: ModelConfig, height: int, width: int) -> tuple[int, int, str]:
    """The smallest feature map of the CNN for ``height`` x ``width`` images, and the layer
    where it is reached: plain arithmetic of the layers :func:`sweeper.model.cnn` stacks
    (:func:`cnn_stages`)."""
    size = (height, width)
    stages = cnn_stages(model)
    for stage in stages:
        if stage.endswith("convolution"):
            if model.padding == "valid":
                size = (size[0] - model.kernel_size + 1, size[1] - model.kernel_size + 1)
        elif model.padding == "valid":
            size = (size[0] // 2, size[1] // 2)
        else:  # same-padded pooling rounds up: a 1-pixel map stays one pixel
            size = (-(-size[0] // 2), -(-size[1] // 2))
        if min(size) < 1:
            return max(size[0], 0), max(size[1], 0), stage
    return size[0], size[1], stages[-1]


def check_input_fits(model: ModelConfig, height: int, width: int) -> None:
    """Refuse images the CNN would shrink below one pixel, before any trial builds it.

    Raises:
        ConfigError: naming model.padding (the classic network) or model.blocks, the image
            size and the size it reached.
    """
    rows, cols, stage = feature_map_size(model, height, width)
    if rows >= 1 and cols >= 1:
        return
    if model.blocks == 0:
        raise ConfigError("model.padding", model.padding,
                          f"{height}x{width} images shrink to {rows}x{cols} pixels at the CNN's "
                          f"{stage} (kernel {model.kernel_size}); use model.padding=same, or "
                          "larger images with data.image_size=[height,width]")
    raise ConfigError("model.blocks", model.blocks,
                      f"{height}x{width} images shrink to {rows}x{cols} pixels at the CNN's "
                      f"{stage} (convs_per_block {model.convs_per_block}, kernel "
                      f"{model.kernel_size}, padding {model.padding}); use fewer blocks, "
                      "model.padding=same, or larger images")


def validate_sweep_settings(cfg: SweepConfig) -> None:
    """Check the searcher, scheduler, cluster and resources settings."""
    _require(bool(cfg.name.strip()) and "/" not in cfg.name and cfg.name not in (".", ".."),
             "name", cfg.name, "must be a non-empty name without '/' (and not '.' or '..')")
    _require(cfg.verbose in (0, 1, 2), "verbose", cfg.verbose, "must be one of 0, 1, 2")
    search = cfg.search
    _one_of("search.sampler", search.sampler, SAMPLERS)
    _one_of("search.metric", search.metric, tuple(reversed(METRIC_NAMES)))
    _one_of("search.mode", search.mode, MODES)
    _require(search.num_trials >= 1, "search.num_trials", search.num_trials, "must be >= 1")
    _require(search.n_startup_trials >= 0, "search.n_startup_trials", search.n_startup_trials,
             "must be >= 0")
    budget = search.time_budget_s
    _require(budget is None or (math.isfinite(budget) and budget > 0), "search.time_budget_s",
             budget, "must be a positive number of seconds, or null for no limit")

    scheduler = cfg.scheduler
    _one_of("scheduler.name", scheduler.name, SCHEDULERS)
    _require(scheduler.grace_period >= 1, "scheduler.grace_period", scheduler.grace_period,
             "must be >= 1 epoch")
    _require(scheduler.reduction_factor >= 2, "scheduler.reduction_factor",
             scheduler.reduction_factor, "must be >= 2")
    if scheduler.name == "asha":
        _require(cfg.train.epochs >= scheduler.grace_period, "train.epochs", cfg.train.epochs,
                 f"must be >= scheduler.grace_period ({scheduler.grace_period}) with ASHA")

    recovery = cfg.recovery
    _require(recovery.checkpoint_every >= 1, "recovery.checkpoint_every",
             recovery.checkpoint_every, "must be >= 1 epoch")
    _require(recovery.keep_checkpoints >= 1, "recovery.keep_checkpoints",
             recovery.keep_checkpoints, "must be >= 1")
    _require(recovery.max_failures >= 0, "recovery.max_failures", recovery.max_failures,
             "must be >= 0")
    _one_of("resume.errored", cfg.resume.errored, RESUME_ERRORED)
    if search.storage is not None:
        _require("://" in search.storage, "search.storage", search.storage,
                 "must be a database URL such as sqlite:///path.db or postgresql://host/db")

    for key in ("num_cpus", "num_gpus"):
        value = getattr(cfg.cluster, key)
        _require(value is None or value >= 0, f"cluster.{key}", value, "must be >= 0 or null")

    resources = cfg.resources
    _require(resources.cpu_per_trial > 0, "resources.cpu_per_trial", resources.cpu_per_trial,
             "must be > 0")
    gpu = resources.gpu_per_trial
    _require(gpu >= 0 and (gpu <= 1 or float(gpu).is_integer()), "resources.gpu_per_trial", gpu,
             "must be >= 0; fractions only below 1 (e.g. 0.25 packs four trials on a GPU)")
    limit = resources.max_concurrent_trials
    _require(limit is None or limit >= 1, "resources.max_concurrent_trials", limit,
             "must be >= 1 or null")


def check_resources_fit(resources: ResourcesConfig, cpus: float, gpus: float,
                        where: str) -> None:
    """Refuse per-trial resources ``where`` can never offer (else Ray waits for them forever)."""
    _require(resources.cpu_per_trial <= cpus, "resources.cpu_per_trial",
             resources.cpu_per_trial, f"{where} has {counted(float(cpus), 'CPU')}")
    _require(resources.gpu_per_trial <= gpus, "resources.gpu_per_trial",
             resources.gpu_per_trial, f"{where} has {counted(float(gpus), 'GPU')}")


def to_sweep_config(cfg: DictConfig) -> SweepConfig:
    """Turn Hydra's composed DictConfig into the typed dataclass tree.

    Raises:
        ConfigError: A setting the schema does not have, added with ``+`` (Hydra lifts the
            struct check for ``+key=value``, and OmegaConf would set it as a stray attribute
            that nothing reads: ``+train.lrr=0.1`` trained with the default learning rate).
    """
    # Imported here: trial workers import this module for the dataclasses alone.
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=False)
    stray = unknown_settings(plain, SweepConfig)
    model = plain.get("model")
    if isinstance(model, Mapping) and model.get("_target_", CNN_TARGET) == CNN_TARGET:
        stray += unknown_settings(model, ModelConfig, "model.")
    if stray:
        key, value = stray[0]
        raise ConfigError(key, value, f"no such setting{closest_setting(key)}")
    typed: SweepConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    typed.model = as_model_config(typed.model)
    if isinstance(typed.model, dict):
        typed.model = with_absolute_weights(typed.model)
    return typed


def as_model_config(model: ModelConfig | Mapping[str, Any]) -> ModelConfig | dict[str, Any]:
    """The CNN's settings as a typed ModelConfig (type-checked as Hydra would, e.g. from a
    best_config.yaml that has no schema for them); any other model's as a plain dict."""
    if isinstance(model, ModelConfig):
        # model._target_=... on top of the CNN: its settings go to that builder, and are
        # checked against its signature.
        return model if model._target_ == CNN_TARGET else asdict(model)
    if model.get("_target_", CNN_TARGET) != CNN_TARGET:
        return dict(model)
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), model))


def unknown_settings(node: Mapping[str, Any], schema: type,
                     prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every key in ``node`` (a plain mapping) that the dataclass
    ``schema`` and its nested dataclasses do not declare; free-form dict fields (the search
    space) are not looked into."""
    hints = get_type_hints(schema)
    stray = []
    for key, value in node.items():
        if key not in hints:
            stray.append((f"{prefix}{key}", value))
        elif _is_dataclass_type(hints[key]) and isinstance(value, Mapping):
            stray += unknown_settings(value, hints[key], f"{prefix}{key}.")
    return stray


def _is_dataclass_type(annotation: Any) -> bool:
    return isinstance(annotation, type) and hasattr(annotation, "__dataclass_fields__")


def closest_setting(key: str) -> str:
    """A hint naming the setting closest to a mistyped dotted ``key`` (``; did you mean
    train.lr?`` for train.lrr), or an empty string when none is close."""
    import difflib

    group, _, name = key.rpartition(".")
    section: Any = SweepConfig
    for part in group.split(".") if group else []:
        section = ModelConfig if part == "model" else get_type_hints(section).get(part)
        if not _is_dataclass_type(section):
            return ""
    match = difflib.get_close_matches(name, [item.name for item in fields(section)], n=1)
    return f"; did you mean {group + '.' if group else ''}{match[0]}?" if match else ""


@dataclass(frozen=True)
class TrialSettings:
    """What the trainer needs of a config: the model's and the training's settings (the data
    comes as arrays, sweeper.data.Splits). A script trains one configuration with
    ``train(TrialSettings(ModelConfig(), TrainConfig(epochs=2)), splits)``; a SweepConfig,
    which has both, may stand in for it.

    Attributes:
        model: The CNN's settings, or a user's builder's (``_target_`` and its arguments).
        train: Epochs, batch size, optimizer, learning rate, seed, precision, XLA, ...
        metric, mode: What ``train.patience`` watches (the search's metric and mode).
    """

    model: ModelConfig | dict[str, Any] = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metric: str = "val_accuracy"
    mode: str = "max"

    @classmethod
    def of(cls, cfg: SweepConfig | TrialSettings) -> TrialSettings:
        """The settings of a (trial's) sweep config; TrialSettings come back as they are."""
        if isinstance(cfg, TrialSettings):
            return cfg
        return cls(model=cfg.model, train=cfg.train, metric=cfg.search.metric,
                   mode=cfg.search.mode)


def apply_params(cfg: SweepConfig, params: Mapping[str, Any]) -> SweepConfig:
    """A copy of ``cfg`` with sampled ``{"group.setting": value}`` parameters filled in."""
    trial = copy.deepcopy(cfg)
    for key, value in params.items():
        group, _, name = key.partition(".")
        section = getattr(trial, group)
        declared = section.get(name) if isinstance(section, dict) else getattr(section, name)
        if isinstance(declared, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(section, dict):  # a user's model: keys of its builder's signature
            section[name] = value
        else:
            setattr(section, name, value)
    return trial
