"""Build the classic MNIST CNN from its config, for the data's input shape and classes.

Conv(f)-MaxPool-Conv(2f)-MaxPool-Conv(2f)-Flatten-Dense(units)-Dense(K, softmax);
with f=32, units=64, 28x28 grayscale images and K=10 this is the network of the
Keras/TensorFlow CNN tutorial. The model takes raw uint8 images of the data's
shape ((N, H, W) or (N, H, W, C)) and rescales them itself, so an exported model
needs no preprocessing code beside it.
"""

from __future__ import annotations

import keras
from keras import layers, regularizers

from sweeper.config import ModelConfig, TrainConfig

OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
}


def build_cnn(model_cfg: ModelConfig, input_shape: tuple[int, ...],
              num_classes: int) -> keras.Model:
    """The uncompiled CNN described by ``model_cfg``.

    Args:
        model_cfg: Filters, kernel, dense units, dropout, L2 and padding.
        input_shape: One image's shape, (H, W) for grayscale or (H, W, C); the data's.
        num_classes: Outputs of the softmax, one per class of the data.
    """
    regularizer = regularizers.l2(model_cfg.l2) if model_cfg.l2 > 0 else None
    kernel = (model_cfg.kernel_size, model_cfg.kernel_size)
    padding = model_cfg.padding

    def conv(filters: int) -> layers.Layer:
        return layers.Conv2D(filters, kernel, activation="relu", padding=padding,
                             kernel_regularizer=regularizer)

    # Images without a channel axis (MNIST's (28, 28)) get one inside the model.
    channels = [layers.Reshape((*input_shape, 1))] if len(input_shape) == 2 else []
    model = keras.Sequential(
        [
            keras.Input(shape=tuple(input_shape), dtype="uint8", name="image"),
            layers.Rescaling(1.0 / 255),
            *channels,
            conv(model_cfg.filters),
            layers.MaxPooling2D((2, 2), padding=padding),
            conv(2 * model_cfg.filters),
            layers.MaxPooling2D((2, 2), padding=padding),
            conv(2 * model_cfg.filters),
            layers.Flatten(),
            layers.Dense(model_cfg.dense_units, activation="relu", kernel_regularizer=regularizer),
            layers.Dropout(model_cfg.dropout),
            # float32 softmax under mixed precision: float16 probabilities underflow.
            layers.Dense(num_classes, activation="softmax", dtype="float32"),
        ],
        name=model_cfg.name,
    )
    return model


def jit_compile_setting(train_cfg: TrainConfig) -> bool | str:
    """Keras' jit_compile for train.jit_compile: "auto" (XLA on GPUs only), True or False."""
    value = str(train_cfg.jit_compile).lower()
    return "auto" if value == "auto" else value == "true"


def compile_model(model: keras.Model, train_cfg: TrainConfig) -> keras.Model:
    optimizer = OPTIMIZERS[train_cfg.optimizer](learning_rate=train_cfg.lr)
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile_setting(train_cfg),
    )
    return model
