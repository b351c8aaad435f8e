"""The shared trainer: the classic CNN trains epoch by epoch on real data, without Ray."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest

from sweeper.config import ModelConfig, SweepConfig
from sweeper.trainer import (
    EpochMetrics,
    TrialDiverged,
    WarmModel,
    build_model,
    make_dataset,
    train,
)


def trial_config(epochs: int, **train: object) -> SweepConfig:
    cfg = SweepConfig()
    cfg.train.epochs = epochs
    cfg.train.batch_size = 64
    for name, value in train.items():
        setattr(cfg.train, name, value)
    return cfg


def test_build_cnn_is_the_classic_tutorial_network():
    from sweeper.model import build_cnn

    model = build_cnn(ModelConfig(), (28, 28), 10)
    stack = [(type(layer).__name__, getattr(layer, "filters", getattr(layer, "units", None)))
             for layer in model.layers
             if type(layer).__name__ in ("Conv2D", "MaxPooling2D", "Flatten", "Dense")]
    assert stack == [("Conv2D", 32), ("MaxPooling2D", None), ("Conv2D", 64), ("MaxPooling2D", None),
                     ("Conv2D", 64), ("Flatten", None), ("Dense", 64), ("Dense", 10)]
    # 320 + 18,496 + 36,928 + 36,928 (3*3*64 -> 64) + 650: the TensorFlow CNN tutorial's count.
    assert model.count_params() == 93_322
    assert model.input_shape == (None, 28, 28)


def test_build_cnn_sizes_come_from_the_config():
    from sweeper.model import build_cnn

    model = build_cnn(ModelConfig(filters=16, dense_units=32, kernel_size=3, dropout=0.25),
                      (28, 28), 10)
    convs = [layer.filters for layer in model.layers if type(layer).__name__ == "Conv2D"]
    dense = [layer.units for layer in model.layers if type(layer).__name__ == "Dense"]
    assert (convs, dense) == ([16, 32, 32], [32, 10])
    # 160 + 4,640 + 9,248 + (288*32 + 32) + 330
    assert model.count_params() == 23_626


def test_train_reports_every_epoch_and_beats_chance(small_splits):
    seen: list[EpochMetrics] = []
    model = train(trial_config(epochs=2, batch_size=32, lr=2e-3), small_splits,
                  on_epoch_end=lambda metrics, model: seen.append(metrics))

    assert [m.epoch for m in seen] == [1, 2]
    assert all(math.isfinite(v) for m in seen for v in m.as_dict().values())
    assert seen[-1].loss < seen[0].loss
    assert seen[-1].val_accuracy > 0.5  # chance is 0.1 for ten classes; 0.65 here
    assert model.optimizer.iterations.numpy() == 2 * math.ceil(900 / 32)


def test_the_first_step_of_a_fit_is_timed_apart_because_it_traces(small_splits):
    """The first epoch of a fit names how long its first step took (on a new model, tracing
    the training step); the other epochs carry 0. The benchmarks show it as its own share."""
    seen: list[EpochMetrics] = []
    train(trial_config(epochs=2), small_splits, on_epoch_end=lambda m, _: seen.append(m))
    first, second = seen
    assert 0 < first.first_step_s < first.train_time_s
    assert first.first_step_s > 5 * second.train_time_s / math.ceil(900 / 64)  # > 5 steps
    assert second.first_step_s == 0.0


def test_a_new_model_traces_its_training_and_validation_steps_once(small_splits):
    """A tf.function that creates variables is traced twice; build_model creates the optimizer's
    and the metrics' variables up front, so a new model's first step traces once."""
    model = build_model(trial_config(epochs=1), (28, 28), 10)
    traced: list[str] = []
    for name in ("train_step", "test_step"):
        step = getattr(model, name)  # Keras calls the Python step only while tracing

        def counted(data, step=step, name=name):
            traced.append(name)
            return step(data)

        setattr(model, name, counted)
    train(trial_config(epochs=1), small_splits, model=model)
    assert sorted(traced) == ["test_step", "train_step"]
    assert model.optimizer.iterations.numpy() == math.ceil(900 / 64)


def test_creating_the_variables_up_front_changes_no_result(small_splits):
    """Dropout draws from the seeded stream: the eager call on a zero image must not."""
    def history():
        cfg = trial_config(epochs=2)
        cfg.model.dropout = 0.4
        seen: list[tuple[float, float]] = []
        train(cfg, small_splits, on_epoch_end=lambda m, _: seen.append((m.loss, m.val_accuracy)))
        return seen

    up_front = history()
    with mock.patch("sweeper.trainer.create_training_variables", lambda model: None):
        in_the_trace = history()
    assert up_front == in_the_trace


def test_continuing_from_initial_epoch_trains_only_the_remaining_epochs(small_splits):
    first = train(trial_config(epochs=1), small_splits)
    seen: list[int] = []
    continued = train(trial_config(epochs=3), small_splits, model=first, initial_epoch=1,
                      on_epoch_end=lambda metrics, model: seen.append(metrics.epoch))
    assert continued is first
    assert seen == [2, 3]
    assert first.optimizer.iterations.numpy() == 3 * math.ceil(900 / 64)

    seen.clear()
    train(trial_config(epochs=3), small_splits, model=first, initial_epoch=3,
          on_epoch_end=lambda metrics, model: seen.append(metrics.epoch))
    assert seen == []


def test_a_huge_learning_rate_raises_trial_diverged(small_splits):
    seen: list[int] = []
    with pytest.raises(TrialDiverged, match="training loss became nan in epoch 1"):
        train(trial_config(epochs=2, optimizer="sgd", lr=1e6), small_splits,
              on_epoch_end=lambda metrics, model: seen.append(metrics.epoch))
    assert seen == []


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_a_warm_model_trains_exactly_like_a_freshly_built_one(small_splits, optimizer):
    def history(cfg, model):
        seen: list[tuple[float, float]] = []
        train(cfg, small_splits, model=model,
              on_epoch_end=lambda m, _: seen.append((m.loss, m.val_accuracy)))
        return seen

    first = trial_config(epochs=2, optimizer=optimizer, lr=0.01)
    second = trial_config(epochs=2, optimizer=optimizer, lr=0.002)
    warm = WarmModel()
    history(first, warm.get(first, (28, 28), 10))  # trains the model the next trial gets back
    reused = warm.get(second, (28, 28), 10)
    assert reused is warm.get(second, (28, 28), 10)
    assert history(second, reused) == history(second, build_model(second, (28, 28), 10))


@pytest.mark.parametrize("flip", ["none", "horizontal"])
def test_a_model_with_dropout_is_reused_with_its_random_numbers_restarted(small_splits, flip):
    """The CNN's dropout (and random augmentation) draw from Keras seed generators, which a
    reused model gets back at their built state: it trains exactly as a fresh build."""
    def history(cfg, model):
        seen: list[tuple[float, float]] = []
        train(cfg, small_splits, model=model,
              on_epoch_end=lambda m, _: seen.append((m.loss, m.val_accuracy)))
        return seen

    cfg = trial_config(epochs=1, lr=0.01, flip=flip)
    cfg.model.dropout = 0.3
    warm = WarmModel()
    first = warm.get(cfg, (28, 28), 10)
    history(cfg, first)
    again = warm.get(cfg, (28, 28), 10)
    assert again is first
    assert history(cfg, again) == history(cfg, build_model(cfg, (28, 28), 10))


def test_a_rebuilt_model_leaves_no_traced_graph_behind(small_splits):
    """Trials that rebuild their model in one worker (dropout searched): each trained model's
    graphs are freed with it. TensorFlow's gradient registry kept every traced train step
    alive (tensorflow/tensorflow#97697): +4 MiB a trial, one more FuncGraph each."""
    import gc

    from tensorflow.python.framework.func_graph import FuncGraph

    from sweeper.compat import custom_gradient_names

    def live_graphs() -> int:
        gc.collect()
        return sum(isinstance(item, FuncGraph) for item in gc.get_objects())

    warm, counts = WarmModel(), []
    for trial in range(4):
        cfg = trial_config(epochs=1, lr=0.01)
        cfg.model.dropout = 0.1 + 0.1 * trial
        train(cfg, small_splits, model=warm.get(cfg, small_splits.input_shape,
                                                small_splits.num_classes))
        counts.append((live_graphs(), len(custom_gradient_names())))
    assert counts[1] == counts[2] == counts[3], counts
    assert counts[3][1] >= 1  # the train step did register its custom gradient


def test_the_input_pipeline_gives_every_image_once_per_epoch_reshuffled(small_splits):
    """Batches of uint8 images, each image once an epoch, a new order every epoch, and no
    tf.data autotuner (its thread stalled trials for about a second now and then)."""
    images, labels = small_splits.x_train[:200], small_splits.y_train[:200]
    dataset = make_dataset(images, labels, batch_size=32, shuffle_seed=0)
    epochs = [np.concatenate([batch.numpy() for batch, _ in dataset]) for _ in range(2)]
    for seen in epochs:
        assert seen.dtype == np.uint8 and len(seen) == len(images)
        assert sorted(map(bytes, seen)) == sorted(map(bytes, images))
    assert not np.array_equal(epochs[0], epochs[1])
    assert dataset.options().autotune.enabled is False


def test_mixed_precision_computes_in_bfloat16_keeps_float32_weights_and_learns(small_splits):
    seen: list[EpochMetrics] = []
    cfg = trial_config(epochs=2, lr=0.003, precision="mixed_bfloat16")
    try:
        model = train(cfg, small_splits, on_epoch_end=lambda m, _: seen.append(m))
        conv = model.layers[2]
        assert conv.compute_dtype == "bfloat16" and conv.variable_dtype == "float32"
        probabilities = model.predict(small_splits.x_val[:4], verbose=0)
        assert probabilities.dtype == np.float32  # the softmax stays in float32
        assert seen[-1].val_accuracy > 0.5  # chance is 0.1
    finally:
        import keras

        keras.mixed_precision.set_dtype_policy("float32")
    # The next model built in this process is back to float32 without being told twice.
    assert build_model(trial_config(epochs=1), (28, 28), 10).layers[2].compute_dtype == "float32"


def test_xla_compiled_training_learns_like_the_plain_step(small_splits):
    def final_val_accuracy(jit_compile: str) -> tuple[float, object]:
        seen: list[EpochMetrics] = []
        model = train(trial_config(epochs=2, lr=0.003, jit_compile=jit_compile), small_splits,
                      on_epoch_end=lambda m, _: seen.append(m))
        return seen[-1].val_accuracy, model

    xla, xla_model = final_val_accuracy("true")
    plain, plain_model = final_val_accuracy("auto")  # no XLA on a CPU-only machine
    assert xla_model.jit_compile is True and plain_model.jit_compile is False
    assert xla > 0.5 and abs(xla - plain) < 0.1
