"""Build a model from its config, for the data's input shape and classes: the classic CNN,
or the builder function a model config's ``_target_`` names (sweeper.builder).

Conv(f)-MaxPool-Conv(2f)-MaxPool-Conv(2f)-Flatten-Dense(units)-Dense(K, softmax);
with f=32, units=64, 28x28 grayscale images and K=10 this is the network of the
Keras/TensorFlow CNN tutorial. The model takes raw uint8 images of the data's
shape ((N, H, W) or (N, H, W, C)) and rescales them itself, so an exported model
needs no preprocessing code beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
from keras import layers, regularizers

from sweeper.builder import builder_kwargs, model_target, resolve_builder
from sweeper.config import ConfigError, ModelConfig, TrainConfig

OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
}


def cnn(input_shape: tuple[int, int, int], num_classes: int, name: str = "cnn",
        filters: int = 32, kernel_size: int = 3, dense_units: int = 64, dropout: float = 0.0,
        l2: float = 0.0, padding: str = "valid") -> keras.Model:
    """The classic CNN as a model builder (``_target_: sweeper.model.cnn``).

    Args:
        input_shape: (H, W, C) of float32 images in [0, 1].
        num_classes: Outputs of the softmax, one per class of the data.
        name: The Keras model's name.
        filters, kernel_size, dense_units, dropout, l2, padding: as in ModelConfig.
    """
    regularizer = regularizers.l2(l2) if l2 > 0 else None
    kernel = (kernel_size, kernel_size)

    def conv(width: int) -> layers.Layer:
        return layers.Conv2D(width, kernel, activation="relu", padding=padding,
                             kernel_regularizer=regularizer)

    return keras.Sequential(
        [
            keras.Input(shape=tuple(input_shape)),
            conv(filters),
            layers.MaxPooling2D((2, 2), padding=padding),
            conv(2 * filters),
            layers.MaxPooling2D((2, 2), padding=padding),
            conv(2 * filters),
            layers.Flatten(),
            layers.Dense(dense_units, activation="relu", kernel_regularizer=regularizer),
            layers.Dropout(dropout),
            # float32 softmax under mixed precision: float16 probabilities underflow.
            layers.Dense(num_classes, activation="softmax", dtype="float32"),
        ],
        name=name,
    )


def build_cnn(model_cfg: ModelConfig | Mapping[str, Any], input_shape: tuple[int, ...],
              num_classes: int) -> keras.Model:
    """The uncompiled model of ``model_cfg``, taking raw uint8 images of ``input_shape``.

    Its builder (``model_cfg._target_``, the classic CNN by default) builds the network for
    float32 (H, W, C) images in [0, 1]; this puts the rescaling (and, for images without
    one, the channel axis) in front of it, so that the exported model needs no preprocessing
    code beside it. A Sequential network's layers follow those in one Sequential model (the
    classic CNN keeps its layers and its 93,322 parameters for 28x28 images and 10 classes);
    any other model is called as one layer.

    Args:
        model_cfg: The model config: ``_target_`` and the builder's keyword arguments.
        input_shape: One image's shape, (H, W) for grayscale or (H, W, C); the data's.
        num_classes: Outputs, one per class of the data.

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
    front = [layers.Rescaling(1.0 / 255)]
    if len(input_shape) == 2:  # MNIST's (28, 28) gets its channel axis inside the model
        front.append(layers.Reshape(image_shape))
    # Under mixed precision float16 probabilities (or logits) underflow: end in float32.
    back = [layers.Activation("linear", dtype="float32", name="float32_outputs")]
    raw = keras.Input(shape=tuple(input_shape), dtype="uint8", name="image")
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


def check_network(model_cfg: ModelConfig | Mapping[str, Any], input_shape: tuple[int, ...],
                  num_classes: int) -> None:
    """Build the model once and check what it gives, before any trial builds it.

    Raises:
        ConfigError: The builder raised, returned no keras.Model, or its output is not one
            score per class, (batch, num_classes).
    """
    target = model_target(model_cfg)
    try:
        model = build_cnn(model_cfg, input_shape, num_classes)
    except ConfigError:
        raise
    except Exception as error:  # the user's code may fail in any way
        message = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError("model._target_", target, f"failed to build the model for "
                          f"{tuple(input_shape)} images and {num_classes} classes "
                          f"({type(error).__name__}: {message})") from None
    finally:
        keras.backend.clear_session()
    shape = tuple(model.output_shape)
    if shape != (None, num_classes):
        raise ConfigError("model._target_", target,
                          f"its output shape is {shape}; the data has {num_classes} classes, "
                          f"so it must be (batch, {num_classes})")


def jit_compile_setting(train_cfg: TrainConfig) -> bool | str:
    """Keras' jit_compile for train.jit_compile: "auto" (XLA on GPUs only), True or False."""
    value = str(train_cfg.jit_compile).lower()
    return "auto" if value == "auto" else value == "true"


def compile_model(model: keras.Model, train_cfg: TrainConfig, logits: bool = False) -> keras.Model:
    """Compile for the training settings; ``logits``: the model outputs logits, not
    probabilities (the model config's ``from_logits``)."""
    optimizer = OPTIMIZERS[train_cfg.optimizer](learning_rate=train_cfg.lr)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=logits),
        metrics=["accuracy"],
        jit_compile=jit_compile_setting(train_cfg),
    )
    return model
