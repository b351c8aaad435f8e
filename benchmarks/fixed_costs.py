"""Costs a trial pays per epoch and per hand-over, beside what they cost before a lever.

    python -m benchmarks.fixed_costs     # prints one JSON line

In a fresh process with one TensorFlow thread, on Fashion-MNIST, median of repeats:
- writing a checkpoint: sweeper's (the model's and optimizer's variables as .npz) against a
  Keras archive of the same trained model (what trials wrote before);
- the first training step of a trial that gets a worker's warm model: as sweeper hands it
  over, and with TensorFlow's global seed set again (what the hand-over did before).
On short epochs both are a visible share of a worker's time; on GPU epochs a large one.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CHECKPOINT_REPEATS = 15
HANDOVER_REPEATS = 5


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
    from sweeper.trainer import WarmModel, configure_tensorflow, make_dataset

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
            model = warm.get(cfg)
            if reset_global_seed:
                keras.utils.set_random_seed(cfg.train.seed)
            model.fit(make_dataset(splits.x_train, splits.y_train, 32, 0), epochs=1,
                      verbose=0, callbacks=[FirstStep()])
        return statistics.median(first_steps) * 1000

    handover_ms(False)  # the worker's first trial: builds and traces the training step
    handover = {"sweeper": handover_ms(False), "seed reset (before)": handover_ms(True)}
    model = warm.get(cfg)
    checkpoints = {"sweeper": _checkpoint_ms(lambda folder: checkpoint.save(model, folder, 1)),
                   "Keras archive (before)": _checkpoint_ms(
                       lambda folder: model.save(folder / "model.keras"))}
    return {"checkpoint_ms": checkpoints, "first_step_after_handover_ms": handover}


if __name__ == "__main__":
    print(json.dumps(measure()))
