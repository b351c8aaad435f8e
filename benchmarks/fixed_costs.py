"""Costs a trial pays per epoch and per hand-over, beside what they cost before a lever.

    python -m benchmarks.fixed_costs     # prints one JSON line

In a fresh process with one TensorFlow thread, on Fashion-MNIST, median of repeats:
- writing a checkpoint: sweeper's (the model's and optimizer's variables as .npz) against a
  Keras archive of the same trained model (what trials wrote before);
- the first training step of a trial that gets a worker's warm model: as sweeper hands it
  over, and with TensorFlow's global seed set again (what the hand-over did before);
- a new model's build and first step (a fresh worker's first trial, every trial of a search
  over dropout): with the optimizer's and metrics' variables created up front, as
  ``build_model`` does, and left to Keras' first trace (before), which then traces twice.
On short epochs all are a visible share of a worker's time; on GPU epochs a large one.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CHECKPOINT_REPEATS = 15
HANDOVER_REPEATS = 5
NEW_MODEL_REPEATS = 5


def _checkpoint_ms(write) -> float:
    times = []
    for _ in range(CHECKPOINT_REPEATS):
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            write(Path(folder))
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure() -> dict:
    import keras

    from benchmarks.common import sweeper_config
    from sweeper import checkpoint
    from sweeper.data import load_splits
    from sweeper.trainer import (
        WarmModel,
        build_model,
        configure_tensorflow,
        create_training_variables,
        make_dataset,
    )

    configure_tensorflow(1, use_gpu=False)
    cfg = sweeper_config(["+experiment=cnn_lr", "data=fashion_mnist",
                          "data.max_train_samples=2000"])
    splits = load_splits(cfg.data, 0.1, 0)
    first_steps: list[float] = []

    class FirstStep(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.began = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                first_steps.append(time.perf_counter() - self.began)
            elif batch == 2:
                self.model.stop_training = True

    warm = WarmModel()

    def handover_ms(reset_global_seed: bool) -> float:
        first_steps.clear()
        for _ in range(HANDOVER_REPEATS):
            model = warm.get(cfg, splits.input_shape, splits.num_classes)
            if reset_global_seed:
                keras.utils.set_random_seed(cfg.train.seed)
            model.fit(make_dataset(splits.x_train, splits.y_train, 32, 0), epochs=1,
                      verbose=0, callbacks=[FirstStep()])
        return statistics.median(first_steps) * 1000

    handover_ms(False)  # the worker's first trial: builds and traces the training step
    handover = {"sweeper": handover_ms(False), "seed reset (before)": handover_ms(True)}

    def new_model_s(variables_up_front: bool) -> float:
        keras.backend.clear_session()
        first_steps.clear()
        began = time.perf_counter()
        with mock.patch("sweeper.trainer.create_training_variables",
                        create_training_variables if variables_up_front else lambda model: None):
            model = build_model(cfg, splits.input_shape, splits.num_classes)
        built = time.perf_counter() - began
        model.fit(make_dataset(splits.x_train, splits.y_train, 32, 0), epochs=1, verbose=0,
                  callbacks=[FirstStep()])
        return built + first_steps[0]

    new_model: dict[str, list[float]] = {"sweeper": [], "variables in the first trace (before)": []}
    for _ in range(NEW_MODEL_REPEATS):  # alternating, so both see the same machine
        for name, up_front in zip(new_model, (True, False), strict=True):
            new_model[name].append(new_model_s(up_front))
    model = warm.get(cfg, splits.input_shape, splits.num_classes)
    checkpoints = {"sweeper": _checkpoint_ms(lambda folder: checkpoint.save(model, folder, 1)),
                   "Keras archive (before)": _checkpoint_ms(
                       lambda folder: model.save(folder / "model.keras"))}
    return {"checkpoint_ms": checkpoints, "first_step_after_handover_ms": handover,
            "new_model_first_step_ms": {name: statistics.median(times) * 1000
                                        for name, times in new_model.items()}}


if __name__ == "__main__":
    print(json.dumps(measure()))
