"""Mixed precision trains, checkpoints and exports as its float32 twin does (issue 41).

Under ``mixed_float16`` Keras' compile wraps the optimizer in a LossScaleOptimizer; everything
that reaches into the optimizer (the schedule's steps per epoch, weight decay, clipping, the
reset of a reused model, checkpoints, the export) must see through it. Real Keras on a tiny
Fashion-MNIST subset and a small CNN: float16 on a CPU is slow.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from sweeper.config import ModelConfig, TrainConfig, TrialSettings

SMALL_CNN = ModelConfig(filters=8, dense_units=16)
MIXED = ("mixed_float16", "mixed_bfloat16")

# Every optimizer, schedule, warmup, clipping and weight decay at least once.
COMBINATIONS = {
    "adam_cosine_warmup": dict(optimizer="adam", lr=0.01, schedule="cosine", warmup_epochs=1),
    "adamw_exponential_decay": dict(optimizer="adamw", lr=0.01, weight_decay=0.05,
                                    schedule="exponential"),
    "sgd_step_clipped": dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True,
                             schedule="step", clip_norm=1.0),
    "rmsprop_warmup_clipped_decay": dict(optimizer="rmsprop", lr=0.003, warmup_epochs=1,
                                         clip_norm=0.5, weight_decay=0.01),
}


@pytest.fixture(scope="module")
def tiny_splits(small_splits):
    """320 training and 100 validation images: 10 steps an epoch at batch size 32."""
    return dataclasses.replace(small_splits, x_train=small_splits.x_train[:320],
                               y_train=small_splits.y_train[:320])


@pytest.fixture(autouse=True)
def float32_afterwards():
    """The dtype policy is global to the process: leave it as the other tests expect it."""
    yield
    import keras

    keras.mixed_precision.set_dtype_policy("float32")


def settings(precision: str, epochs: int = 2, **train: object) -> TrialSettings:
    return TrialSettings(model=SMALL_CNN, train=TrainConfig(
        epochs=epochs, batch_size=32, precision=precision, jit_compile="false", **train))


def trained(cfg: TrialSettings, splits, checkpoints=None, stop_after: int | None = None,
            **kwargs):
    """The model, and per epoch: (training loss, the learning rate Keras reads back after it,
    the optimizer's step count). ``checkpoints``: a folder to checkpoint into every epoch;
    ``stop_after``: epochs after which the trial is stopped (as ASHA or a dead worker does)."""
    from sweeper import checkpoint
    from sweeper.trainer import train

    seen: list[tuple[float, float, int]] = []

    def on_epoch_end(metrics, model) -> None:
        seen.append((metrics.loss, float(model.optimizer.learning_rate),
                     int(model.optimizer.iterations)))
        if checkpoints is not None:
            checkpoint.save(model, checkpoints, metrics.epoch)

    should_stop = None if stop_after is None else (lambda: len(seen) >= stop_after)
    return train(cfg, splits, on_epoch_end=on_epoch_end, should_stop=should_stop,
                 **kwargs), seen


@pytest.fixture(scope="module")
def float32_twins(tiny_splits):
    """Each combination trained in float32 (computed once per module)."""
    twins = {name: trained(settings("float32", **train), tiny_splits)[1]
             for name, train in COMBINATIONS.items()}
    import keras

    keras.mixed_precision.set_dtype_policy("float32")
    return twins


@pytest.mark.parametrize("precision", MIXED)
@pytest.mark.parametrize("name", COMBINATIONS)
def test_mixed_precision_trains_as_its_float32_twin(name, precision, tiny_splits,
                                                    float32_twins):
    """The learning rate each epoch is the float32 twin's (a schedule the LossScaleOptimizer
    hid never learned the steps per epoch and trained at 0 after the first epoch), and the
    loss falls as far."""
    model, seen = trained(settings(precision, **COMBINATIONS[name]), tiny_splits)
    twin = float32_twins[name]
    assert [rate for _, rate, _ in seen] == pytest.approx([rate for _, rate, _ in twin],
                                                         rel=1e-6)
    assert [steps for _, _, steps in seen] == [steps for _, _, steps in twin] == [10, 20]
    losses, twin_losses = [loss for loss, _, _ in seen], [loss for loss, _, _ in twin]
    learned = twin_losses[0] - twin_losses[-1]
    assert learned > 0.2  # the twin learns in its second epoch: the comparison means something
    assert abs(losses[-1] - twin_losses[-1]) < learned / 4, (losses, twin_losses)
    assert model.layers[1].compute_dtype == precision.removeprefix("mixed_")


def test_a_warm_workers_next_mixed_float16_trial_trains_as_the_first(tiny_splits):
    """A reused model's optimizer state goes back to a fresh build's: the loss scale too (set
    to 0 with the moments, it made every update NaN)."""
    from sweeper.trainer import WarmModel

    cfg = settings("mixed_float16", epochs=1, lr=0.01)
    warm = WarmModel()
    first = warm.get(cfg, tiny_splits.input_shape, tiny_splits.num_classes)
    _, first_seen = trained(cfg, tiny_splits, model=first)
    again = warm.get(cfg, tiny_splits.input_shape, tiny_splits.num_classes)
    assert again is first
    assert float(again.optimizer.dynamic_scale) == again.optimizer.initial_scale
    _, again_seen = trained(cfg, tiny_splits, model=again)
    assert again_seen[0][0] == pytest.approx(first_seen[0][0], abs=1e-3)


def test_a_mixed_float16_checkpoint_resumes_with_its_schedule_and_loss_scale(tiny_splits,
                                                                             tmp_path):
    """Saved and restored by key, the LossScaleOptimizer's as well as the optimizer's own;
    the rates after the resume are the uninterrupted run's."""
    from sweeper import checkpoint
    from sweeper.trainer import build_model

    cfg = settings("mixed_float16", epochs=3, lr=0.01, schedule="cosine", warmup_epochs=1)
    _, whole = trained(cfg, tiny_splits)
    stopped, before = trained(cfg, tiny_splits, checkpoints=tmp_path, stop_after=1)
    keys = checkpoint.variables_by_key(stopped)
    assert {"optimizer/iteration", "optimizer/dynamic_scale", "optimizer/step_counter"} <= set(
        keys)
    assert keys["optimizer/iteration"] is stopped.optimizer.inner_optimizer.iterations
    model, epoch = checkpoint.restore(
        tmp_path, lambda: build_model(cfg, tiny_splits.input_shape, tiny_splits.num_classes))
    assert int(model.optimizer.iterations) == 10
    assert float(model.optimizer.dynamic_scale) == float(stopped.optimizer.dynamic_scale)
    _, after = trained(cfg, tiny_splits, model=model, initial_epoch=epoch)
    # Warmup ends with epoch 1; the cosine spans the 2 epochs left of the budget.
    assert [rate for _, rate, _ in whole] == pytest.approx([0.01, 0.005, 0.0], abs=1e-7)
    assert [rate for _, rate, _ in before + after] == pytest.approx(
        [rate for _, rate, _ in whole], abs=1e-7)
    assert [steps for _, _, steps in before + after] == [10, 20, 30]


@pytest.mark.slow
def test_the_mixed_precision_export_loads_and_predicts_without_sweeper(tiny_splits, tmp_path):
    """best_model.keras of mixed precision with a schedule, weight decay and label smoothing
    loads with plain Keras in a fresh Python (no EpochSchedule to look up) with its optimizer
    state, and predicts as the trained model does."""
    from sweeper.model import save_portable

    images = tiny_splits.x_val[:16]
    np.save(tmp_path / "images.npy", images)
    exports = {"mixed_float16": 0.0, "mixed_float16_smoothed": 0.1, "mixed_bfloat16": 0.1}
    for name, smoothing in exports.items():
        cfg = settings(name.removesuffix("_smoothed"), epochs=2, optimizer="adamw", lr=0.01,
                       weight_decay=0.01, schedule="cosine", warmup_epochs=1,
                       min_lr_ratio=0.1, label_smoothing=smoothing)
        model, _ = trained(cfg, tiny_splits)
        np.save(tmp_path / f"{name}.npy", model.predict(images, verbose=0))
        save_portable(model, tmp_path / f"{name}.keras")
    # Keras warns (UserWarning) when an archive's optimizer state does not fit the optimizer.
    script = f"""
import sys, warnings
warnings.filterwarnings("error", category=UserWarning)
import keras, numpy as np
for name in {list(exports)}:
    model = keras.models.load_model(f"{{name}}.keras")
    np.testing.assert_allclose(model.predict(np.load("images.npy"), verbose=0),
                               np.load(f"{{name}}.npy"), atol=1e-6)
    assert int(model.optimizer.iterations) == 20, int(model.optimizer.iterations)
    np.testing.assert_allclose(float(model.optimizer.learning_rate), 0.001, rtol=1e-5)
    print(name, type(model.optimizer).__name__)
assert "sweeper" not in sys.modules
"""
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split() == ["mixed_float16", "LossScaleOptimizer",
                                     "mixed_float16_smoothed", "LossScaleOptimizer",
                                     "mixed_bfloat16", "AdamW"]
