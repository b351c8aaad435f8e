"""The baseline: the same sweep written the plain way from Ray Tune's documentation.

A function trainable that imports TensorFlow, loads the data and builds the model inside
each trial; OptunaSearch and ASHAScheduler with default Tuner settings (no actor reuse).
Only a timing callback is added, the same measurement sweeper's trainer makes, so the two
utilizations compare like with like.
"""

from __future__ import annotations

import gzip
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import FASHION_MNIST, CpuSampler, SweepRun, measured_run, read_rows


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def tutorial_cnn(tf):
    """The CNN of TensorFlow's tutorial, written out as users write it (float input in [0, 1])."""
    return tf.keras.Sequential([
        tf.keras.Input((28, 28, 1)),
        tf.keras.layers.Conv2D(32, 3, activation="relu"),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.Conv2D(64, 3, activation="relu"),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.Conv2D(64, 3, activation="relu"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(10, activation="softmax"),
    ])


def train_fashion_mnist(config: dict) -> None:
    """What a Ray Tune user writes: everything happens inside the trial."""
    import tensorflow as tf
    from ray import tune

    folder = Path(config["data_dir"])
    x = _read_idx(folder / "train-images-idx3-ubyte.gz")[: config["samples"]]
    y = _read_idx(folder / "train-labels-idx1-ubyte.gz")[: config["samples"]]
    x = (x / 255.0).astype("float32")[..., None]
    split = int(len(x) * (1 - config["validation_fraction"]))
    model = tutorial_cnn(tf)
    model.compile(optimizer=tf.keras.optimizers.Adam(config["lr"]),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    trial_started_at = time.time()

    class Report(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.fit_started_at = time.time()

        first_step, first_epoch = 0.0, True

        def on_epoch_begin(self, epoch, logs=None):
            self.started, self.val_time = time.perf_counter(), 0.0

        def on_train_batch_end(self, batch, logs=None):
            if self.first_epoch and batch == 0:
                self.first_step = time.perf_counter() - self.started

        def on_test_begin(self, logs=None):
            self.val_started = time.perf_counter()

        def on_test_end(self, logs=None):
            self.val_time += time.perf_counter() - self.val_started

        def on_epoch_end(self, epoch, logs=None):
            train_time = time.perf_counter() - self.started - self.val_time
            tune.report({"val_accuracy": logs["val_accuracy"], "epoch": epoch + 1,
                         "train_time_s": train_time, "val_time_s": self.val_time,
                         "fit_started_at": self.fit_started_at,
                         "first_step_s": self.first_step if self.first_epoch else 0.0,
                         "trial_started_at": trial_started_at, "reported_at": time.time(),
                         "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            self.first_epoch = False

    model.fit(x[:split], y[:split], batch_size=config["batch_size"], epochs=config["epochs"],
              validation_data=(x[split:], y[split:]), callbacks=[Report()], verbose=0)


@dataclass(frozen=True)
class PlainSweep:
    """What the baseline sweeps: the same as the sweeper experiment it is compared with."""

    samples: int  # training samples before the validation split
    epochs: int
    num_trials: int
    validation_fraction: float
    lr_range: tuple[float, float]  # log-uniform
    batch_size: int
    reduction_factor: int  # ASHA's; grace period 1 epoch


def run_plain_tune(label: str, workdir: Path, sweep: PlainSweep, concurrency: int,
                   seed: int = 0) -> SweepRun:
    """The baseline sweep, written the way Ray Tune's documentation writes it."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    param_space = {"lr": tune.loguniform(*sweep.lr_range), "batch_size": sweep.batch_size,
                   "epochs": sweep.epochs, "samples": sweep.samples,
                   "validation_fraction": sweep.validation_fraction, "data_dir": FASHION_MNIST}
    tuner = tune.Tuner(
        train_fashion_mnist,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric="val_accuracy", mode="max", num_samples=sweep.num_trials,
            search_alg=OptunaSearch(seed=seed),
            scheduler=ASHAScheduler(max_t=sweep.epochs, grace_period=1,
                                    reduction_factor=sweep.reduction_factor),
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(name=label, storage_path=str(workdir), verbose=0),
    )
    with CpuSampler() as cpu:
        started = time.time()
        tuner.fit()
    return measured_run(label, started, read_rows(workdir / label), concurrency, cpu)
