"""Build the classic MNIST CNN from its config.

Conv(f)-MaxPool-Conv(2f)-MaxPool-Conv(2f)-Flatten-Dense(units)-Dense(10, softmax);
with f=32 and units=64 this is the network of the Keras/TensorFlow CNN tutorial.
The model takes raw uint8 images (N, 28, 28) and rescales them itself, so an
exported model needs no preprocessing code beside it.
"""

from __future__ import annotations

import keras
from keras import layers, regularizers

from sweeper.config import ModelConfig, TrainConfig
from sweeper.data import IMAGE_SHAPE, NUM_CLASSES

OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
}


def build_cnn(model_cfg: ModelConfig) -> keras.Model:
    """The uncompiled CNN described by ``model_cfg``."""
    regularizer = regularizers.l2(model_cfg.l2) if model_cfg.l2 > 0 else None
    kernel = (model_cfg.kernel_size, model_cfg.kernel_size)

    def conv(filters: int) -> layers.Layer:
        return layers.Conv2D(filters, kernel, activation="relu", kernel_regularizer=regularizer)

    model = keras.Sequential(
        [
            keras.Input(shape=IMAGE_SHAPE, dtype="uint8", name="image"),
            layers.Rescaling(1.0 / 255),
            layers.Reshape((*IMAGE_SHAPE, 1)),
            conv(model_cfg.filters),
            layers.MaxPooling2D((2, 2)),
            conv(2 * model_cfg.filters),
            layers.MaxPooling2D((2, 2)),
            conv(2 * model_cfg.filters),
            layers.Flatten(),
            layers.Dense(model_cfg.dense_units, activation="relu", kernel_regularizer=regularizer),
            layers.Dropout(model_cfg.dropout),
            # float32 softmax under mixed precision: float16 probabilities underflow.
            layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"),
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
