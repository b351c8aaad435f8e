"""Build a model from its config, for the data's input shape and classes: the classic CNN,
or the builder function a model config's ``_target_`` names (sweeper.builder).

Conv(f)-MaxPool-Conv(2f)-MaxPool-Conv(2f)-Flatten-Dense(units)-Dense(K, softmax);
with f=32, units=64, 28x28 grayscale images and K=10 this is the network of the
Keras/TensorFlow CNN tutorial. The model takes raw images of the data's
shape ((N, H, W) or (N, H, W, C)): uint8 pixels, or floats in [0, 1] (:func:`pixel_scale`),
and rescales them itself, so an exported model needs no preprocessing code beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
from keras import layers, regularizers

from sweeper import compat
from sweeper.builder import builder_kwargs, model_target, resolve_builder
from sweeper.config import ConfigError, ModelConfig, TrainConfig
from sweeper.summary import counted

OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
}


def cnn(input_shape: tuple[int, int, int], num_classes: int, name: str = "cnn",
        filters: int = 32, kernel_size: int = 3, dense_units: int = 64, dropout: float = 0.0,
        l2: float = 0.0, padding: str = "valid", blocks: int = 0, convs_per_block: int = 1,
        batch_norm: bool = False, pooling: str = "flatten",
        conv_dropout: float = 0.0) -> keras.Model:
    """The classic CNN as a model builder (``_target_: sweeper.model.cnn``).

    With the defaults this is the classic network of this module's docstring; ``blocks`` >= 1
    stacks that many blocks of ``convs_per_block`` convolutions of
    ``filters * 2**block`` channels instead, each block ending in 2x2 max pooling.

    Args:
        input_shape: (H, W, C) of float32 images in [0, 1].
        num_classes: Outputs of the softmax, one per class of the data.
        name: The Keras model's name.
        filters, kernel_size, dense_units, dropout, l2, padding, blocks, convs_per_block,
            batch_norm, pooling, conv_dropout: as in ModelConfig.
    """
    regularizer = regularizers.l2(l2) if l2 > 0 else None
    kernel = (kernel_size, kernel_size)

    def conv(width: int) -> list[layers.Layer]:
        if not batch_norm:
            return [layers.Conv2D(width, kernel, activation="relu", padding=padding,
                                  kernel_regularizer=regularizer)]
        # Batch norm between the convolution and its ReLU; its shift makes a bias redundant.
        return [layers.Conv2D(width, kernel, padding=padding, use_bias=False,
                              kernel_regularizer=regularizer),
                layers.BatchNormalization(), layers.ReLU()]

    def pool() -> list[layers.Layer]:
        after = [layers.Dropout(conv_dropout)] if conv_dropout > 0 else []
        return [layers.MaxPooling2D((2, 2), padding=padding), *after]

    if blocks == 0:  # the classic network
        features = [*conv(filters), *pool(), *conv(2 * filters), *pool(), *conv(2 * filters)]
    else:
        features = []
        for block in range(blocks):
            for _ in range(convs_per_block):
                features += conv(filters * 2**block)
            features += pool()
    to_vector = layers.Flatten() if pooling == "flatten" else layers.GlobalAveragePooling2D()
    return keras.Sequential(
        [
            keras.Input(shape=tuple(input_shape)),
            *features,
            to_vector,
            layers.Dense(dense_units, activation="relu", kernel_regularizer=regularizer),
            layers.Dropout(dropout),
            # float32 softmax under mixed precision: float16 probabilities underflow.
            layers.Dense(num_classes, activation="softmax", dtype="float32"),
        ],
        name=name,
    )


def augmentation(train_cfg: TrainConfig) -> list[layers.Layer]:
    """The random augmentation layers ``train_cfg`` asks for, for float images in [0, 1].

    Keras preprocessing layers: they change images only when the model trains (``training=True``)
    and pass them through when it predicts or is scored. Shifted, rotated and zoomed images
    are filled with zeros (the background of MNIST-like data; torchvision's RandomAffine does
    the same), not Keras' default reflection, which mirrors strokes in from the border.
    """
    fill = {"fill_mode": "constant", "fill_value": 0.0}
    chosen: list[layers.Layer] = []
    if train_cfg.flip != "none":
        chosen.append(layers.RandomFlip(train_cfg.flip))
    if train_cfg.translation > 0:
        chosen.append(layers.RandomTranslation(train_cfg.translation, train_cfg.translation,
                                               **fill))
    if train_cfg.rotation > 0:
        chosen.append(layers.RandomRotation(train_cfg.rotation, **fill))
    if train_cfg.zoom > 0:
        chosen.append(layers.RandomZoom(train_cfg.zoom, train_cfg.zoom, **fill))
    if train_cfg.contrast > 0:
        chosen.append(layers.RandomContrast(train_cfg.contrast, value_range=(0.0, 1.0)))
    if train_cfg.erasing > 0:
        # (p, p): every image has exactly chance p (one float would draw p from [0, p)).
        chosen.append(layers.RandomErasing((train_cfg.erasing, train_cfg.erasing),
                                           value_range=(0.0, 1.0)))
    return chosen


def build_cnn(model_cfg: ModelConfig | Mapping[str, Any], input_shape: tuple[int, ...],
              num_classes: int, augment: list[layers.Layer] | None = None) -> keras.Model:
    """The uncompiled model of ``model_cfg``, taking raw images of ``input_shape``: uint8
    pixels, or floats in [0, 1] (:func:`pixel_scale`).

    Its builder (``model_cfg._target_``, the classic CNN by default) builds the network for
    float32 (H, W, C) images in [0, 1]; this puts the rescaling (and, for images without
    one, the channel axis) in front of it, so that the exported model needs no preprocessing
    code beside it. The ``augment`` layers (:func:`augmentation`) come right after the
    rescaling, in front of any builder's network. A Sequential network's layers follow those
    in one Sequential model (the classic CNN keeps its layers and its 93,322 parameters for
    28x28 images and 10 classes); any other model is called as one layer.

    Args:
        model_cfg: The model config: ``_target_`` and the builder's keyword arguments.
        input_shape: One image's shape, (H, W) for grayscale or (H, W, C); the data's.
        num_classes: Outputs, one per class of the data.
        augment: Random augmentation layers, active in training only; None: none.

    Raises:
        ConfigError: The builder did not return a keras.Model.
    """
    target = model_target(model_cfg)
    builder = resolve_builder(target)
    image_shape = (*input_shape, 1) if len(input_shape) == 2 else tuple(input_shape)
    network = builder(image_shape, num_classes, **builder_kwargs(model_cfg, builder))
    if not isinstance(network, keras.Model):
        raise ConfigError("model._target_", target,
                          f"returned a {type(network).__name__}, not a keras.Model")
    front = [pixel_scale(tuple(input_shape))]
    if len(input_shape) == 2:  # MNIST's (28, 28) gets its channel axis inside the model
        front.append(layers.Reshape(image_shape))
    front += augment or []
    # Under mixed precision float16 probabilities (or logits) underflow: end in float32.
    back = [layers.Activation("linear", dtype="float32", name="float32_outputs")]
    # float32, not uint8: Keras casts what a model is given to its input's dtype, and floats
    # in [0, 1] cast to uint8 are 0 or 1, black images (issue 41: 0.10 accuracy, no word).
    raw = keras.Input(shape=tuple(input_shape), dtype="float32", name="image")
    if isinstance(network, keras.Sequential):
        if network.layers[-1].compute_dtype == "float32":
            back = []
        return keras.Sequential([raw, *front, *network.layers, *back], name=network.name)
    outputs = raw
    for layer in front:
        outputs = layer(outputs)
    outputs = network(outputs)
    if outputs.dtype == "float32":
        back = []
    for layer in back:
        outputs = layer(outputs)
    return keras.Model(raw, outputs, name=network.name)


def pixel_scale(input_shape: tuple[int, ...]) -> keras.Model:
    """Images of ``input_shape`` to float32 in [0, 1], each as its values mean: pixels 0-255
    (uint8, or any number type) are divided by 255, and an image whose every value is at most
    1 is taken as already in [0, 1] (floats a user scaled) and kept as it is.

    Built of Keras operations only, so the exported model loads with plain
    ``keras.models.load_model``. A uint8 image whose pixels are all 0 or 1 (next to black) is
    read as [0, 1] too, in training as in prediction.
    """
    ops = keras.ops
    images = keras.Input(shape=input_shape, dtype="float32", name="pixels")
    peak = ops.max(ops.reshape(images, (-1, math.prod(input_shape))), axis=1, keepdims=True)
    unit = ops.cast(ops.less_equal(peak, 1.0), "float32")  # 1: already in [0, 1]
    scale = ops.reshape(1.0 / 255 + unit * (1.0 - 1.0 / 255), (-1,) + (1,) * len(input_shape))
    return keras.Model(images, images * scale, name="pixel_scale")


def check_network(model_cfg: ModelConfig | Mapping[str, Any], input_shape: tuple[int, ...],
                  num_classes: int) -> None:
    """Build the model once and check what it gives, before any trial builds it.

    Raises:
        ConfigError: The builder raised, returned no keras.Model, its output is not one
            score per class, (batch, num_classes), or the model does not survive being saved
            as a ``.keras`` archive and loaded back as the export will do after the sweep
            (a custom layer that is not registered, or whose ``get_config`` misses an
            argument).
    """
    target = model_target(model_cfg)
    try:
        try:
            model = build_cnn(model_cfg, input_shape, num_classes)
        except ConfigError:
            raise
        except Exception as error:  # the user's code may fail in any way
            raise ConfigError("model._target_", target, f"failed to build the model for "
                              f"{tuple(input_shape)} images and "
                              f"{counted(num_classes, 'class', 'classes')} "
                              f"({type(error).__name__}: {_first_line(error)})") from None
        shape = tuple(model.output_shape)
        if shape != (None, num_classes):
            raise ConfigError("model._target_", target,
                              f"its output shape is {shape}; the data has "
                              f"{counted(num_classes, 'class', 'classes')}, "
                              f"so it must be (batch, {num_classes})")
        _check_save_and_load(model, target)
    finally:
        keras.backend.clear_session()


def _check_save_and_load(model: keras.Model, target: str) -> None:
    """Save ``model`` as a ``.keras`` archive, load it back and compare their predictions."""
    import tempfile

    import numpy as np

    images = np.random.default_rng(0).integers(0, 256, (2, *model.input_shape[1:]),
                                               dtype=np.uint8)
    advice = ("; register custom layers with @keras.saving.register_keras_serializable and "
              "give them a get_config that returns every argument of their __init__")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        try:
            model.save(path)
            loaded = keras.models.load_model(path, compile=False)
        except Exception as error:  # Keras raises many kinds; any one means the export fails
            raise ConfigError("model._target_", target, "its model does not survive save and "
                              f"load: {_first_line(error)}{advice}") from None
    before, after = np.asarray(model(images)), np.asarray(loaded(images))
    if before.shape != after.shape or not np.allclose(before, after, rtol=1e-5, atol=1e-6):
        raise ConfigError("model._target_", target, "its model gives other outputs after "
                          "save and load (a layer's get_config leaves out a setting)" + advice)


def _first_line(error: BaseException) -> str:
    """The part of an error message that says what went wrong, on one line: Keras wraps the
    cause of a failed deserialization after "Exception encountered:" and appends the whole
    config of the layer to "Could not locate class ..."; an error raised in a layer's call
    is wrapped in "Exception encountered when calling <layer>" (the user's message follows)."""
    from sweeper.compat import keras_layer_message

    text = str(error).strip()
    if "Exception encountered:" in text:
        text = text.rsplit("Exception encountered:", 1)[1].strip()
    line = keras_layer_message(text.splitlines()) or (text.splitlines() or [""])[0]
    return line.split(". Make sure custom classes", 1)[0].rstrip(".")


def jit_compile_setting(train_cfg: TrainConfig) -> bool | str:
    """Keras' jit_compile for train.jit_compile: "auto" (XLA on GPUs only), True or False."""
    value = str(train_cfg.jit_compile).lower()
    return "auto" if value == "auto" else value == "true"


@keras.saving.register_keras_serializable(package="sweeper")
class EpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The learning rate at each training step, defined over the sweep's full epoch budget.

    Linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_epochs``, then
    ``constant``, ``cosine`` (to ``lr * min_lr_ratio`` at the end of ``epochs``),
    ``exponential`` (to ``lr * decay_rate`` at the end) or ``step`` (times ``decay_rate`` at
    1/2 and again at 3/4 of the epochs after warmup). A function of the optimizer's step count
    alone: a trial restored from a checkpoint (which holds the count) goes on with the rates
    it would have had, and a trial ASHA stops at a rung trained with the same rates as the
    ones it is compared with, over the same full budget, rather than with a schedule squeezed
    into the epochs it happened to get.

    ``steps_per_epoch`` is a variable the trainer sets before it fits (the batches per epoch
    depend on the data the model trains on); outside the optimizer's variables, so checkpoints
    keep their layout.
    """

    def __init__(self, lr: float, epochs: int, schedule: str = "constant",
                 warmup_epochs: int = 0, min_lr_ratio: float = 0.0, decay_rate: float = 0.1,
                 steps_per_epoch: int = 1) -> None:
        self.lr, self.epochs, self.schedule = float(lr), int(epochs), schedule
        self.warmup_epochs, self.min_lr_ratio = int(warmup_epochs), float(min_lr_ratio)
        self.decay_rate = float(decay_rate)
        self.steps_per_epoch = keras.Variable(float(steps_per_epoch), dtype="float32",
                                              trainable=False, name="steps_per_epoch")

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        epochs_done = step / self.steps_per_epoch
        rate = ops.convert_to_tensor(self.lr, "float32")
        if self.warmup_epochs > 0:
            rate = rate * ops.minimum(1.0, (step + 1.0) / (self.warmup_epochs *
                                                            self.steps_per_epoch))
        decay_epochs = max(self.epochs - self.warmup_epochs, 1)
        progress = ops.clip((epochs_done - self.warmup_epochs) / decay_epochs, 0.0, 1.0)
        if self.schedule == "cosine":
            cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
            rate = rate * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
        elif self.schedule == "exponential":
            rate = rate * ops.power(self.decay_rate, progress)
        elif self.schedule == "step":
            drops = ops.cast(progress >= 0.5, "float32") + ops.cast(progress >= 0.75, "float32")
            rate = rate * ops.power(self.decay_rate, drops)
        return rate

    def get_config(self) -> dict[str, Any]:
        return {"lr": self.lr, "epochs": self.epochs, "schedule": self.schedule,
                "warmup_epochs": self.warmup_epochs, "min_lr_ratio": self.min_lr_ratio,
                "decay_rate": self.decay_rate,
                "steps_per_epoch": float(self.steps_per_epoch.numpy())}


def uses_schedule(train_cfg: TrainConfig) -> bool:
    """Whether the learning rate changes during training (else it is a plain float)."""
    return train_cfg.schedule != "constant" or train_cfg.warmup_epochs > 0


def base_optimizer(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer :func:`make_optimizer` made, that updates the weights.

    Under ``mixed_float16`` Keras' ``compile`` wraps it in a ``LossScaleOptimizer``, which
    scales the loss and hands the unscaled gradients on; the learning rate, its schedule,
    weight decay and clipping are the inner optimizer's, and so is its state (step count,
    moments) but for the loss scale. Any other optimizer is returned as it is.
    """
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def epoch_schedule(optimizer: keras.optimizers.Optimizer) -> EpochSchedule | None:
    """The :class:`EpochSchedule` ``optimizer`` (or the one it wraps) follows; None: none."""
    rate = compat.learning_rate_of(base_optimizer(optimizer))
    return rate if isinstance(rate, EpochSchedule) else None


def set_steps_per_epoch(model: keras.Model, steps: int) -> bool:
    """Tell the model's learning-rate schedule (if any) how many batches an epoch has.

    Returns:
        Whether the model's optimizer follows an :class:`EpochSchedule` (the trainer checks
        this against ``train.schedule``: a schedule never told would run its whole budget
        within the first epochs).
    """
    schedule = epoch_schedule(model.optimizer)
    if schedule is not None:
        schedule.steps_per_epoch.assign(float(steps))
    return schedule is not None


def make_optimizer(train_cfg: TrainConfig) -> keras.optimizers.Optimizer:
    """The optimizer of ``train_cfg``: its learning rate (or :class:`EpochSchedule`), momentum
    (sgd, rmsprop), Nesterov (sgd), decoupled weight decay and global-norm clipping.

    Settings at their off values are not passed, so the default is Keras' plain Adam(1e-3).
    Weight decay leaves biases and batch norm's scale and shift alone (the usual practice:
    decaying them only shifts activations).
    """
    learning_rate: float | EpochSchedule = train_cfg.lr
    if uses_schedule(train_cfg):
        learning_rate = EpochSchedule(train_cfg.lr, train_cfg.epochs, train_cfg.schedule,
                                      train_cfg.warmup_epochs, train_cfg.min_lr_ratio,
                                      train_cfg.decay_rate)
    kwargs: dict[str, Any] = {"learning_rate": learning_rate}
    if train_cfg.optimizer in ("sgd", "rmsprop") and train_cfg.momentum > 0:
        kwargs["momentum"] = train_cfg.momentum
    if train_cfg.optimizer == "sgd" and train_cfg.nesterov and train_cfg.momentum > 0:
        kwargs["nesterov"] = True
    # AdamW's own default decay (0.004) would apply where train.weight_decay says none.
    if train_cfg.weight_decay > 0 or train_cfg.optimizer == "adamw":
        kwargs["weight_decay"] = train_cfg.weight_decay
    if train_cfg.clip_norm > 0:
        kwargs["global_clipnorm"] = train_cfg.clip_norm
    optimizer = OPTIMIZERS[train_cfg.optimizer](**kwargs)
    if train_cfg.weight_decay > 0:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


@keras.saving.register_keras_serializable(package="sweeper")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of integer labels smoothed toward the uniform distribution.

    Keras' SparseCategoricalCrossentropy has no ``label_smoothing``; this one-hots the labels
    and uses ``categorical_crossentropy``'s: the target is ``1 - s + s/K`` for the true class
    and ``s/K`` for the other K-1.
    """

    def __init__(self, label_smoothing: float = 0.0, from_logits: bool = False,
                 name: str = "sparse_categorical_crossentropy", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.label_smoothing, self.from_logits = float(label_smoothing), bool(from_logits)

    def call(self, y_true, y_pred):
        ops = keras.ops
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        one_hot = ops.one_hot(labels, ops.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            one_hot, y_pred, from_logits=self.from_logits, label_smoothing=self.label_smoothing)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing,
                "from_logits": self.from_logits}


def compile_model(model: keras.Model, train_cfg: TrainConfig, logits: bool = False) -> keras.Model:
    """Compile for the training settings; ``logits``: the model outputs logits, not
    probabilities (the model config's ``from_logits``)."""
    if train_cfg.label_smoothing > 0:
        loss = SmoothedSparseCrossentropy(train_cfg.label_smoothing, from_logits=logits)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=logits)
    model.compile(
        optimizer=make_optimizer(train_cfg),
        loss=loss,
        metrics=["accuracy"],
        jit_compile=jit_compile_setting(train_cfg),
    )
    return model


def save_portable(model: keras.Model, path: Path | str) -> None:
    """Save ``model`` as a ``.keras`` archive that plain ``keras.models.load_model`` reads.

    A model compiled with sweeper's :class:`EpochSchedule` or :class:`SmoothedSparseCrossentropy`
    would need ``import sweeper.model`` before loading (Keras looks the classes up by their
    registered names); its training config is saved with Keras' own instead: the same
    optimizer at the learning rate the schedule had reached (inside Keras' LossScaleOptimizer
    under ``mixed_float16``, as compile wraps it), and sparse cross-entropy. The weights and
    layers (augmentation included) are saved as they are.
    """
    optimizer, loss = model.optimizer, model.loss
    if epoch_schedule(optimizer) is not None or isinstance(loss, SmoothedSparseCrossentropy):
        inner = base_optimizer(optimizer)
        config = {**inner.get_config(), "learning_rate": float(inner.learning_rate)}
        if isinstance(loss, SmoothedSparseCrossentropy):
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=loss.from_logits)
        portable = type(inner).from_config(config)
        if inner is not optimizer:  # the loss scaling stays, its scale carried over below
            portable = keras.optimizers.LossScaleOptimizer(
                portable, initial_scale=optimizer.initial_scale,
                dynamic_growth_steps=optimizer.dynamic_growth_steps, name=optimizer.name)
        if optimizer.built:
            # Built and given the trained optimizer's state (step count, moments, loss scale),
            # matched by variable path: an unbuilt optimizer is saved with 2 variables, and
            # loading the archive then warns "Skipping variable loading for optimizer" and
            # drops them.
            portable.build(model.trainable_variables)
            state = {variable.path: variable for variable in optimizer.variables}
            for variable in portable.variables:
                source = state.get(variable.path)
                if source is not None and tuple(source.shape) == tuple(variable.shape):
                    variable.assign(keras.ops.cast(source, variable.dtype))
        model.compile(optimizer=portable, loss=loss, metrics=["accuracy"])
    model.save(path)
