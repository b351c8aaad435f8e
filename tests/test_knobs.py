"""The knobs that move accuracy (issue 24): each changes the trained model as it says, all are
off by default, and bad values are refused with one line. Real Keras on tiny inputs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from sweeper.config import (
    ConfigError,
    ModelConfig,
    SweepConfig,
    TrainConfig,
    check_input_fits,
    validate_trial_settings,
)


def trial_config(epochs: int = 4, model: dict | None = None, **train: object) -> SweepConfig:
    cfg = SweepConfig()
    cfg.model = dataclasses.replace(cfg.model, **(model or {}))
    cfg.train = dataclasses.replace(cfg.train, epochs=epochs, batch_size=64, **train)
    return cfg


def layer_names(model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


# ---- the model ------------------------------------------------------------------------------

def test_the_defaults_leave_the_classic_network_and_plain_adam():
    import keras

    from sweeper.trainer import build_model

    model = build_model(SweepConfig(), (28, 28), 10)
    assert model.count_params() == 93_322
    assert not any(name.startswith("Random") or name == "BatchNormalization"
                   for name in layer_names(model))
    assert type(model.optimizer) is keras.optimizers.Adam
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)
    assert model.optimizer.weight_decay is None and model.optimizer.global_clipnorm is None
    assert type(model.loss).__name__ == "SparseCategoricalCrossentropy"


def test_blocks_stack_convolutions_of_doubling_width_each_ending_in_pooling():
    from sweeper.model import build_cnn

    model = build_cnn(ModelConfig(blocks=3, convs_per_block=2, padding="same", filters=8),
                      (28, 28), 10)
    convs = [layer.filters for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert convs == [8, 8, 16, 16, 32, 32]
    assert layer_names(model).count("MaxPooling2D") == 3
    # 28 -> 14 -> 7 -> 4 (same padding rounds up), 32 channels, flattened.
    flatten = next(layer for layer in model.layers if type(layer).__name__ == "Flatten")
    assert flatten.output.shape[-1] == 4 * 4 * 32


def test_batch_norm_global_average_pooling_and_conv_dropout_where_they_belong():
    from sweeper.model import build_cnn

    model = build_cnn(ModelConfig(batch_norm=True, pooling="global_average", conv_dropout=0.2,
                                  dropout=0.3, padding="same"), (28, 28), 10)
    names = layer_names(model)
    # Every convolution: Conv2D (no bias: batch norm shifts) -> BatchNormalization -> ReLU.
    convs = [i for i, name in enumerate(names) if name == "Conv2D"]
    assert len(convs) == 3
    for i in convs:
        assert names[i + 1:i + 3] == ["BatchNormalization", "ReLU"]
        assert not model.layers[i].use_bias
    # Conv dropout after both poolings; the dense dropout stays before the output layer.
    pools = [i for i, name in enumerate(names) if name == "MaxPooling2D"]
    assert [names[i + 1] for i in pools] == ["Dropout", "Dropout"]
    assert [model.layers[i + 1].rate for i in pools] == [0.2, 0.2]
    assert "GlobalAveragePooling2D" in names and "Flatten" not in names
    assert names[-2:] == ["Dropout", "Dense"] and model.layers[-2].rate == 0.3


def test_a_depth_the_image_cannot_hold_is_refused_naming_blocks():
    check_input_fits(ModelConfig(blocks=3, padding="valid"), 28, 28)  # 26,13,11,5,3,1: fits
    with pytest.raises(ConfigError) as error:
        check_input_fits(ModelConfig(blocks=4, padding="valid"), 28, 28)
    assert str(error.value).startswith("model.blocks=4 is invalid: 28x28 images shrink to 0x0 "
                                       "pixels at the CNN's block 4 convolution")
    check_input_fits(ModelConfig(blocks=8, padding="same"), 28, 28)  # same padding never shrinks


def test_a_searched_depth_is_checked_at_its_largest(compose, fashion_mnist_dir):
    from sweeper.sweep import check_model_fits, validate

    cfg, space = validate(compose("model.padding=valid", "search.space.model.blocks=choice(1, 5)"))
    with pytest.raises(ConfigError, match="model.blocks=5"):
        check_model_fits(cfg, space, (28, 28))
    cfg, space = validate(compose("model.padding=valid", "search.space.model.blocks=range(1, 4)"))
    check_model_fits(cfg, space, (28, 28))  # 1 to 3 blocks all fit


# ---- augmentation ---------------------------------------------------------------------------

def test_augmentation_changes_images_in_training_and_never_when_scoring(small_splits):
    import keras

    from sweeper.trainer import build_model

    augmented = build_model(trial_config(flip="horizontal", translation=0.1, rotation=0.05,
                                         zoom=0.1, contrast=0.2, erasing=1.0), (28, 28), 10)
    names = layer_names(augmented)
    assert names[2:8] == ["RandomFlip", "RandomTranslation", "RandomRotation", "RandomZoom",
                          "RandomContrast", "RandomErasing"]
    images = small_splits.x_val[:16]
    # What the network after the augmentation layers sees: the images, rescaled.
    front = keras.Sequential(augmented.layers[:8])
    seen_training = np.asarray(front(images, training=True))
    seen_scoring = np.asarray(front(images, training=False))
    rescaled = images[..., None].astype("float32") / 255
    np.testing.assert_allclose(seen_scoring, rescaled, atol=1e-6)
    assert np.abs(seen_training - rescaled).mean() > 0.01
    # Scoring the augmented model is scoring the same network without augmentation.
    plain = build_model(trial_config(), (28, 28), 10)
    plain.set_weights(augmented.get_weights())
    np.testing.assert_allclose(augmented.predict(images, verbose=0),
                               plain.predict(images, verbose=0), atol=1e-6)


def test_erasing_is_the_chance_per_image():
    from sweeper.model import augmentation

    (never,) = augmentation(TrainConfig(erasing=1e-9))
    (always,) = augmentation(TrainConfig(erasing=1.0))
    images = np.full((64, 28, 28, 1), 0.5, "float32")
    assert np.allclose(never(images, training=True), images)
    changed = np.abs(np.asarray(always(images, training=True)) - images).max(axis=(1, 2, 3))
    assert (changed > 0).all()


# ---- the optimizer and the loss -------------------------------------------------------------

def one_step(optimizer, value: float, gradient: float, name: str = "kernel"):
    import keras

    variable = keras.Variable(np.full((3,), value, "float32"), name=name)
    optimizer.apply_gradients([(np.full((3,), gradient, "float32"), variable)])
    return np.asarray(variable)


def test_weight_decay_shrinks_weights_but_not_biases():
    from sweeper.model import make_optimizer

    train = TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.5)
    # A zero gradient moves nothing in Adam; only the decoupled decay: w * (1 - lr * decay).
    np.testing.assert_allclose(one_step(make_optimizer(train), 2.0, 0.0), 2.0 * (1 - 0.05))
    np.testing.assert_allclose(one_step(make_optimizer(train), 2.0, 0.0, name="bias"), 2.0)
    np.testing.assert_allclose(one_step(make_optimizer(TrainConfig(optimizer="adamw", lr=0.1)),
                                        2.0, 0.0), 2.0)


def test_sgd_momentum_nesterov_and_gradient_clipping():
    from sweeper.model import make_optimizer

    sgd = make_optimizer(TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True))
    assert (sgd.momentum, sgd.nesterov) == (0.9, True)
    # Clipping the global norm to 1: a gradient of norm 100*sqrt(3) moves the weights by lr * 1.
    clipped = make_optimizer(TrainConfig(optimizer="sgd", lr=0.1, clip_norm=1.0))
    moved = 1.0 - one_step(clipped, 1.0, 100.0)
    assert np.linalg.norm(moved) == pytest.approx(0.1, rel=1e-5)
    unclipped = 1.0 - one_step(make_optimizer(TrainConfig(optimizer="sgd", lr=0.1)), 1.0, 100.0)
    np.testing.assert_allclose(unclipped, 10.0)
    # Adam has its own betas: a momentum set for a search over sgd and adam is not passed on.
    assert type(make_optimizer(TrainConfig(optimizer="adam", momentum=0.9))).__name__ == "Adam"


def test_label_smoothing_targets_one_minus_s_plus_s_over_k():
    import keras

    from sweeper.model import SmoothedSparseCrossentropy

    labels = np.array([0, 2, 1])
    probabilities = keras.ops.softmax(np.random.default_rng(0).normal(size=(3, 4)))
    smoothed = SmoothedSparseCrossentropy(0.2)(labels, probabilities)
    one_hot = np.eye(4)[labels]
    expected = keras.losses.CategoricalCrossentropy(label_smoothing=0.2)(one_hot, probabilities)
    assert float(smoothed) == pytest.approx(float(expected), rel=1e-6)
    targets = one_hot * 0.8 + 0.2 / 4  # the true class 0.85, the others 0.05
    by_hand = -(targets * np.log(np.asarray(probabilities))).sum(axis=1).mean()
    assert float(smoothed) == pytest.approx(by_hand, rel=1e-5)
    plain = keras.losses.SparseCategoricalCrossentropy()(labels, probabilities)
    assert float(SmoothedSparseCrossentropy(0.0)(labels, probabilities)) == pytest.approx(
        float(plain), rel=1e-6)


# ---- the learning-rate schedule -------------------------------------------------------------

SCHEDULES = [
    # schedule, warmup, epochs done -> factor of lr; 10 epochs of 4 steps
    ("constant", 0, {0: 1.0, 5: 1.0, 10: 1.0}),
    ("constant", 2, {0: 0.125, 1: 0.625, 2: 1.0, 9: 1.0}),  # (step + 1) / 8 warmup steps
    ("cosine", 0, {0: 1.0, 5: 0.5, 10: 0.0}),
    ("cosine", 2, {2: 1.0, 6: 0.5, 10: 0.0}),  # the cosine starts after warmup
    ("exponential", 0, {0: 1.0, 5: 0.1 ** 0.5, 10: 0.1}),
    ("step", 0, {0: 1.0, 4: 1.0, 5: 0.1, 7: 0.1, 8: 0.01}),
]


@pytest.mark.parametrize(("schedule", "warmup", "factors"), SCHEDULES)
def test_the_schedule_over_the_full_budget(schedule, warmup, factors):
    from sweeper.model import EpochSchedule

    rate = EpochSchedule(0.1, 10, schedule, warmup_epochs=warmup, steps_per_epoch=4)
    for epochs_done, factor in factors.items():
        assert float(rate(epochs_done * 4)) == pytest.approx(0.1 * factor, abs=1e-7), epochs_done


def test_cosine_ends_at_min_lr_ratio():
    from sweeper.model import EpochSchedule

    assert float(EpochSchedule(0.1, 10, "cosine", min_lr_ratio=0.1)(10)) == pytest.approx(0.01)


def test_the_learning_rate_each_epoch_including_across_a_resume(small_splits, tmp_path):
    """As in a trial: a checkpoint every epoch, stopped after two (as ASHA or a dead worker
    stops it), continued by a fresh model restored from the checkpoint."""
    from sweeper import checkpoint
    from sweeper.trainer import build_model, train

    cfg = trial_config(epochs=4, lr=0.01, schedule="cosine", warmup_epochs=1)
    steps = math.ceil(len(small_splits.y_train) / 64)  # 900 images: 15 steps an epoch

    def rates(seen: list[float]):
        def on_epoch_end(metrics, model) -> None:
            seen.append(float(model.optimizer.learning_rate))  # the next step's rate
            checkpoint.save(model, tmp_path, metrics.epoch)
        return on_epoch_end

    whole: list[float] = []
    train(cfg, small_splits, on_epoch_end=rates(whole))
    # Warmup ends with epoch 1; the cosine then spans the 3 epochs left of the full budget.
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * done / 3)) for done in (0, 1, 2, 3)]
    assert whole == pytest.approx(expected, abs=1e-6)

    before: list[float] = []
    train(cfg, small_splits, on_epoch_end=rates(before), should_stop=lambda: len(before) >= 2)
    model, epoch = checkpoint.restore(
        tmp_path, lambda: build_model(cfg, small_splits.input_shape, small_splits.num_classes))
    assert (epoch, int(model.optimizer.iterations)) == (2, 2 * steps)
    after: list[float] = []
    train(cfg, small_splits, on_epoch_end=rates(after), model=model, initial_epoch=epoch)
    assert before + after == pytest.approx(whole, abs=1e-6)


RETRAINS = [
    # The schedule over the sweep's 4 epochs, stopped after the best trial's best epoch 2
    # (squeezed into 2 epochs, the cosine had reached 0 where the trial was at 0.0075).
    (dict(lr=0.01, schedule="cosine", warmup_epochs=1), 2),
    # Patience would watch validation images the retrain trains on: it stopped after 2 epochs
    # of a learning rate too small to change a prediction, where the best trial had 3 (its
    # own validation images, held out, went on improving; here its rates are recorded
    # without patience).
    (dict(lr=1e-12, patience=1), 3),
]


@pytest.mark.parametrize(("train", "best_epoch"), RETRAINS)
def test_the_final_retrain_has_the_best_trials_rates_up_to_its_best_epoch(small_splits, train,
                                                                         best_epoch):
    """final.retrain trains best_epoch epochs, each at the learning rate the best trial had in
    the same epoch (Keras' own read-back after each epoch)."""
    from sweeper.evaluate import retrain_model
    from sweeper.model import epoch_schedule
    from sweeper.results import COMPLETED, TrialRecord
    from sweeper.trainer import train as train_trial

    cfg = trial_config(epochs=4, model={"filters": 8, "dense_units": 16}, **train)
    trial_rates: list[float] = []
    trial = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, patience=0))
    train_trial(trial, small_splits, on_epoch_end=lambda metrics, model: trial_rates.append(
        float(model.optimizer.learning_rate)))
    best = TrialRecord(trial_id="best", config={}, status=COMPLETED, epochs_trained=4,
                       last_value=0.5, best_value=0.5, best_epoch=best_epoch)
    model = retrain_model(cfg, best, small_splits)
    steps = math.ceil((len(small_splits.y_train) + len(small_splits.y_val)) / 64)
    assert int(model.optimizer.iterations) == best_epoch * steps
    assert float(model.optimizer.learning_rate) == pytest.approx(trial_rates[best_epoch - 1],
                                                                 abs=1e-9)
    schedule = epoch_schedule(model.optimizer)
    if schedule is not None:  # the same schedule: the rate after each epoch is the trial's
        assert (schedule.epochs, float(schedule.steps_per_epoch)) == (4, steps)
        assert [float(schedule(epoch * steps)) for epoch in range(1, 5)] == pytest.approx(
            trial_rates, abs=1e-7)


def test_a_warm_worker_hands_out_the_next_trials_schedule(small_splits):
    from sweeper.trainer import WarmModel

    warm = WarmModel()
    first = warm.get(trial_config(lr=0.01, schedule="cosine"), (28, 28), 10)
    second = warm.get(trial_config(lr=0.002, schedule="cosine"), (28, 28), 10)
    assert float(second.optimizer.learning_rate) == pytest.approx(0.002)
    assert float(first.optimizer.learning_rate) == pytest.approx(0.01)  # rebuilt, not changed
    constant = warm.get(trial_config(lr=0.003), (28, 28), 10)
    again = warm.get(trial_config(lr=0.004), (28, 28), 10)
    assert again is constant and float(again.optimizer.learning_rate) == pytest.approx(0.004)


def test_the_exported_model_loads_without_sweeper(small_splits, tmp_path):
    """best_model.keras of a trial with a schedule and label smoothing loads with plain Keras
    (a fresh Python that never imported sweeper) and predicts as the trained model does."""
    import subprocess
    import sys

    from sweeper.model import save_portable
    from sweeper.trainer import train

    model = train(trial_config(epochs=1, schedule="cosine", warmup_epochs=0, label_smoothing=0.1,
                               optimizer="adamw", weight_decay=0.01, translation=0.1),
                  small_splits)
    path = tmp_path / "best_model.keras"
    save_portable(model, path)
    np.save(tmp_path / "images.npy", small_splits.x_val[:8])
    np.save(tmp_path / "expected.npy", model.predict(small_splits.x_val[:8], verbose=0))
    # Keras warns (UserWarning) when an archive's optimizer state does not fit the optimizer.
    script = ("import sys, warnings, keras, numpy as np; "
              "warnings.filterwarnings('error', category=UserWarning); "
              "m = keras.models.load_model(sys.argv[1]); "
              "assert 'sweeper' not in sys.modules; np.testing.assert_allclose("
              "m.predict(np.load(sys.argv[2]), verbose=0), np.load(sys.argv[3]), atol=1e-5)")
    loaded = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "images.npy"),
                             str(tmp_path / "expected.npy")], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-2000:]


# ---- early stopping within a trial ----------------------------------------------------------

def test_patience_ends_a_trial_that_stops_improving(small_splits):
    from sweeper.trainer import train

    seen = []
    # A learning rate too small to change a prediction: val_accuracy never improves on epoch 1.
    train(trial_config(epochs=6, lr=1e-12, patience=2), small_splits,
          on_epoch_end=lambda metrics, model: seen.append(metrics.val_accuracy))
    assert len(seen) == 3 and len(set(seen)) == 1
    seen.clear()
    train(trial_config(epochs=3, lr=1e-12), small_splits,
          on_epoch_end=lambda metrics, model: seen.append(metrics.val_accuracy))
    assert len(seen) == 3


# ---- a model of the user's own ----------------------------------------------------------------

def test_optimizer_schedule_augmentation_and_smoothing_apply_to_a_users_model():
    from sweeper.model import SmoothedSparseCrossentropy, epoch_schedule
    from sweeper.trainer import build_model

    cfg = trial_config(optimizer="adamw", weight_decay=0.01, schedule="cosine",
                       warmup_epochs=1, translation=0.1, label_smoothing=0.1)
    cfg.model = {"_target_": "tests.test_knobs.tiny_model", "width": 4}
    model = build_model(cfg, (28, 28), 10)
    assert "RandomTranslation" in layer_names(model)
    assert type(model.optimizer).__name__ == "AdamW"
    assert epoch_schedule(model.optimizer).epochs == 4
    assert isinstance(model.loss, SmoothedSparseCrossentropy)


def tiny_model(input_shape, num_classes, width=4):
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape)
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(width, 3)(inputs))
    return keras.Model(inputs, layers.Dense(num_classes, activation="softmax")(x))


# ---- the experiment -------------------------------------------------------------------------

def test_cnn_tuned_starts_from_its_recipe_which_its_space_must_hold(compose):
    from sweeper.space import configured_point
    from sweeper.sweep import validate

    cfg, space = validate(compose("+experiment=cnn_tuned", "data=fashion_mnist"))
    point = configured_point(cfg, space)
    assert point["model.batch_norm"] is True and point["train.optimizer"] == "adamw"
    assert point["train.lr"] == 0.002 and point["train.erasing"] == 0.0
    with pytest.raises(ConfigError) as error:
        validate(compose("+experiment=cnn_tuned", "data=fashion_mnist", "model.filters=16"))
    assert error.value.key == "model.filters"  # the key the user set, as in every one-liner
    assert str(error.value).startswith("model.filters=16 is invalid: model.filters is searched "
                                       "over choice(32, 48, 64) and search.start_with_defaults")


# ---- mistakes -------------------------------------------------------------------------------

BAD_TRAIN = [
    ({"optimizer": "lamb"}, "train.optimizer"),
    ({"momentum": 1.0}, "train.momentum"),
    ({"weight_decay": -0.1}, "train.weight_decay"),
    ({"clip_norm": float("nan")}, "train.clip_norm"),
    ({"label_smoothing": 1.0}, "train.label_smoothing"),
    ({"schedule": "linear"}, "train.schedule"),
    ({"warmup_epochs": 10}, "train.warmup_epochs"),
    ({"min_lr_ratio": 2.0}, "train.min_lr_ratio"),
    ({"decay_rate": 0.0}, "train.decay_rate"),
    ({"flip": "diagonal"}, "train.flip"),
    ({"translation": 1.0}, "train.translation"),
    ({"rotation": -0.1}, "train.rotation"),
    ({"zoom": 1.5}, "train.zoom"),
    ({"contrast": -1.0}, "train.contrast"),
    ({"erasing": 1.5}, "train.erasing"),
    ({"patience": -1}, "train.patience"),
]
BAD_MODEL = [
    ({"blocks": -1}, "model.blocks"),
    ({"blocks": 9}, "model.blocks"),
    ({"convs_per_block": 0}, "model.convs_per_block"),
    ({"pooling": "max"}, "model.pooling"),
    ({"conv_dropout": 1.0}, "model.conv_dropout"),
]


@pytest.mark.parametrize(("settings", "key"), BAD_TRAIN + BAD_MODEL,
                         ids=[f"{key}={s}" for s, key in BAD_TRAIN + BAD_MODEL])
def test_bad_values_are_refused_naming_the_setting(settings, key):
    cfg = SweepConfig()
    group = key.split(".")[0]
    setattr(cfg, group, dataclasses.replace(getattr(cfg, group), **settings))
    with pytest.raises(ConfigError) as error:
        validate_trial_settings(cfg.data, cfg.model, cfg.train)
    assert str(error.value).startswith(f"{key}=")
    assert "\n" not in str(error.value)
