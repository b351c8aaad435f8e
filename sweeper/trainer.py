"""The shared trainer: one plain function that trains the CNN epoch by epoch.

It knows nothing of Ray: the caller passes ``on_epoch_end`` to see each epoch's
metrics and the model (Ray Tune reports and checkpoints there; a script can
just log). One ``fit`` call covers all epochs, so the input pipeline and the
compiled training step are built once per trial.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from sweeper.compat import (
    custom_gradient_names,
    forget_custom_gradients,
    import_tensorflow,
    keras_global_seed_generator,
)
from sweeper.config import SweepConfig, TrainConfig, TrialSettings
from sweeper.data import Splits
from sweeper.metrics import METRIC_NAMES

logger = logging.getLogger(__name__)

PREFETCH_BATCHES = 2


class TrialDiverged(RuntimeError):
    """The training loss became NaN or infinite; the trial cannot recover.

    ``metrics`` holds the epoch's (non-finite) figures, so they can be recorded as they were.
    """

    def __init__(self, message: str, metrics: EpochMetrics) -> None:
        super().__init__(message)
        self.metrics = metrics


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based: the number of epochs trained so far
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    # Where the time went, for the utilization benchmark and for users comparing trials.
    train_time_s: float = math.nan  # training steps of this epoch
    val_time_s: float = math.nan  # validation pass of this epoch
    fit_started_at: float = math.nan  # wall clock (time.time()) when fit began its first step
    # The first epoch of a fit: its first training step, which also traces the step function
    # on a fresh worker (part of train_time_s); 0 for the other epochs.
    first_step_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


EpochCallback = Callable[[EpochMetrics, "object"], None]


def configure_tensorflow(num_cpus: float, use_gpu: bool, deterministic: bool = False) -> int:
    """Make TensorFlow use the trial's CPUs and share GPUs politely; returns how many GPUs
    TensorFlow can use (0 without ``use_gpu``).

    ``deterministic`` turns on TensorFlow's op determinism (``search.reproducible``): ops that
    could sum in a different order from run to run (multi-threaded or GPU reductions) use
    deterministic kernels, at some cost in speed; it stays on for the rest of the process.

    Must run before TensorFlow builds its first op in this process; a reused
    worker that already did keeps its earlier (identical) settings.
    """
    threads = max(1, int(num_cpus))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = import_tensorflow()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:
        logger.debug("TensorFlow already initialized; keeping its thread settings")
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    gpus = tf.config.list_physical_devices("GPU") if use_gpu else []
    for gpu in gpus:
        try:
            # Grow memory on demand so several trials can share one GPU.
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            logger.debug("GPU already initialized; keeping its memory settings")
    return len(gpus)


def gpu_peak_mb() -> float:
    """Peak GPU memory this process's TensorFlow has allocated on its first visible GPU, in MiB.

    With memory growth on (configure_tensorflow) this is what the trial really uses, so it shows
    how many trials fit on one GPU; TensorFlow's default would reserve nearly all of it.
    """
    import tensorflow as tf

    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def make_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int,
                 shuffle_seed: int | None = None):
    """A batched, prefetched tf.data pipeline over uint8 arrays (the model rescales).

    Two batches prefetched, autotuning off: slicing in-memory arrays never starves the model,
    and tf.data's autotuner thread cost a trial about a second now and then (an epoch that
    took twice as long, or a worker waiting that long to release a finished trial's iterator).
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(labels), seed=shuffle_seed, reshuffle_each_iteration=True)
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.batch(batch_size).prefetch(PREFETCH_BATCHES).with_options(options)


class _StopRequested(Exception):
    """Raised inside fit to leave it at once when the caller no longer wants the trial."""


def _stop_callback(should_stop: Callable[[], bool]):
    import keras

    class StopWhenAsked(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if should_stop():
                raise _StopRequested

        on_test_batch_end = on_train_batch_end  # the validation pass can be long too

    return StopWhenAsked()


def _epoch_callback(on_epoch_end: EpochCallback | None):
    import keras

    class ReportEpoch(keras.callbacks.Callback):
        # Epoch and validation boundaries, and the fit's first batch: nothing else per step.
        fit_started_at = epoch_started = val_started = math.nan
        val_time = first_step = 0.0
        first_epoch = True

        def on_train_begin(self, logs: dict | None = None) -> None:
            self.fit_started_at = time.time()

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.epoch_started, self.val_time = time.perf_counter(), 0.0

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            # Keras calls every batch hook of every callback anyway; this costs one compare.
            if self.first_epoch and batch == 0:
                self.first_step = time.perf_counter() - self.epoch_started

        def on_test_begin(self, logs: dict | None = None) -> None:
            self.val_started = time.perf_counter()

        def on_test_end(self, logs: dict | None = None) -> None:
            self.val_time += time.perf_counter() - self.val_started

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            values = {name: float(logs.get(name, math.nan)) for name in METRIC_NAMES}
            epoch_time = time.perf_counter() - self.epoch_started
            metrics = EpochMetrics(epoch=epoch + 1, **values,
                                   train_time_s=epoch_time - self.val_time,
                                   val_time_s=self.val_time, fit_started_at=self.fit_started_at,
                                   first_step_s=self.first_step if self.first_epoch else 0.0)
            self.first_epoch = False
            if not math.isfinite(values["loss"]):
                raise TrialDiverged(f"training loss became {values['loss']} in epoch {epoch + 1}",
                                    metrics)
            if on_epoch_end is not None:
                on_epoch_end(metrics, self.model)

    return ReportEpoch()


def build_model(cfg: TrialSettings, input_shape: tuple[int, ...], num_classes: int):
    """A freshly initialized, compiled model for ``cfg`` (seeded by train.seed), taking images
    of ``input_shape`` (the data's, e.g. ``splits.input_shape``) into ``num_classes`` classes."""
    import keras

    from sweeper.builder import from_logits
    from sweeper.model import augmentation, build_cnn, compile_model

    keras.utils.set_random_seed(cfg.train.seed)
    # The policy is global to the process: set it for every build, a reused worker included.
    keras.mixed_precision.set_dtype_policy(cfg.train.precision)
    network = build_cnn(cfg.model, input_shape, num_classes, augment=augmentation(cfg.train))
    model = compile_model(network, cfg.train, logits=from_logits(cfg.model))
    create_training_variables(model)
    # Keras makes its global seed generator (keras.random calls with seed=None draw from it)
    # at the first such draw, seeded from Python's random numbers then: here, at the same
    # point of every build, where nothing draws from Python's generator before the training
    # step is traced, so the numbers are those it would have had, and WarmModel can restart it.
    keras_global_seed_generator()
    return model


def create_training_variables(model) -> None:
    """Create the optimizer's slots and the metrics' totals of a compiled model now, eagerly.

    Keras' TensorFlow backend leaves them to the first trace of the training step, and a
    tf.function that creates variables is traced twice (once to create them, once without):
    that second trace delays the first step of every new model, a fresh worker's and each
    trial's of a search over dropout (benchmarks/fixed_costs.py). Nothing here draws a random
    number, so the model trains exactly as it would have.
    """
    model.optimizer.build(model.trainable_variables)
    images = np.zeros((1, *model.input_shape[1:]), np.uint8)
    labels = np.zeros((1,), np.uint8)
    predictions = model(images)  # inference mode: dropout draws nothing
    model.compute_loss(images, labels, predictions)
    model.compute_metrics(images, labels, predictions)
    model.reset_metrics()


def compiled_settings(train_cfg: TrainConfig) -> tuple[tuple[str, object], ...]:
    """The training settings a built and compiled model holds, as a hashable key: all of
    ``train_cfg`` but those a fit sets anew (batch size, early stopping, the validation split)
    and, without a schedule, the learning rate (a variable :class:`WarmModel` reassigns) and
    the epochs (which only a schedule reads)."""
    from sweeper.model import uses_schedule

    settings = dataclasses.asdict(train_cfg)
    fit_time = ["batch_size", "patience", "validation_fraction"]
    if not uses_schedule(train_cfg):
        fit_time += ["lr", "epochs"]
    return tuple(sorted((name, value) for name, value in settings.items()
                        if name not in fit_time))


def repeats_after_reset(model, state: list[np.ndarray], generator_state: np.ndarray) -> bool:
    """Whether putting ``model``'s variables back to ``state`` (its weights and every Keras
    seed generator's state, however deeply nested) and Keras' global seed generator back to
    ``generator_state`` makes its training-mode forward pass repeat exactly.

    True for models whose random numbers all come from Keras seed generators (Dropout,
    GaussianNoise, random augmentation, ``keras.random.*`` with a layer's SeedGenerator or with
    ``seed=None``), and for models that draw none. False where a layer draws random numbers
    any other way (``tf.random.*`` stateful ops, a ``tf.random.Generator``, NumPy): a model
    reused with those would not train as a fresh build does. The model's variables and the
    global generator are left as ``state`` and ``generator_state`` say.
    """
    generator = keras_global_seed_generator()
    # Not NumPy's global generator: drawing from it would change what the caller gets next.
    images = np.random.default_rng(0).integers(0, 256, (4, *model.input_shape[1:]),
                                               dtype=np.uint8)

    def put_back() -> bool:
        if len(model.variables) != len(state):
            return False  # a layer made variables while training: nothing to put them back to
        _restore(model.variables, state)
        generator.state.assign(generator_state)
        return True

    outputs = []
    for _ in range(2):
        put_back()
        outputs.append(np.asarray(model(images, training=True)))
    return put_back() and bool(np.array_equal(outputs[0], outputs[1], equal_nan=True))


def _snapshot(variables) -> list[np.ndarray]:
    return [variable.numpy() for variable in variables]


def _restore(variables, values: list[np.ndarray]) -> None:
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


class WarmModel:
    """One compiled model kept in a worker between trials, handed out as if freshly built.

    Building the CNN and tracing its training step cost about as much as an epoch of a short
    trial. A trial with the same architecture, optimizer and seed as the previous one in this
    worker (a learning-rate search, for one) gets the same model back with the state a fresh
    build would have: the seeded initial weights, every Keras seed generator of the model
    (dropout, noise, random augmentation, a user's layer with a SeedGenerator however deeply
    nested) and Keras' global one (``keras.random`` calls with ``seed=None``) at the state a
    build gives them, the optimizer's slots and step counter as built, and the trial's learning
    rate (a variable, so nothing is traced again). It trains exactly as a fresh build would.

    Whether that holds is tried once per architecture and worker (:func:`repeats_after_reset`):
    a model whose layers draw random numbers some other way (``tf.random``, NumPy) is built
    afresh for every trial, since a trial's result must not depend on which worker ran it.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._model = None
        self._initial_state: list[np.ndarray] = []
        self._initial_optimizer: list[np.ndarray] = []
        self._generator = None
        self._generator_state: np.ndarray | None = None
        self._reusable: dict[tuple, bool] = {}  # by key: what repeats_after_reset found
        self._gradients_before: frozenset[str] | None = None

    def get(self, cfg: TrialSettings, input_shape: tuple[int, ...], num_classes: int):
        """A model as :func:`build_model` would build it for these arguments."""
        from sweeper.model import jit_compile_setting, uses_schedule

        key = (repr(cfg.model), tuple(input_shape), num_classes,
               compiled_settings(cfg.train), jit_compile_setting(cfg.train))
        if (key != self._key or not self._reusable.get(key, False)
                # Someone called keras.utils.set_random_seed: the traced step holds the old one.
                or keras_global_seed_generator() is not self._generator):
            self._build(cfg, input_shape, num_classes)
            if key not in self._reusable:
                self._reusable[key] = repeats_after_reset(self._model, self._initial_state,
                                                          self._generator_state)
                if not self._reusable[key]:
                    # The trial above drew random numbers that no reset restarts.
                    self._build(cfg, input_shape, num_classes)
            self._key = key
            return self._model
        # TensorFlow's global seed is still cfg.train.seed (part of the key; build_model set
        # it): setting it again slows the next fit's first step, every trial
        # (benchmarks/fixed_costs.py).
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        _restore(self._model.variables, self._initial_state)
        self._generator.state.assign(self._generator_state)
        optimizer = self._model.optimizer
        _restore(optimizer.variables, self._initial_optimizer)
        if not uses_schedule(cfg.train):  # a schedule's learning rate is part of the key
            optimizer.learning_rate = cfg.train.lr
        return self._model

    def _build(self, cfg: TrialSettings, input_shape: tuple[int, ...], num_classes: int) -> None:
        import keras

        self._model = None
        keras.backend.clear_session()
        # The previous model's graphs are gone now; TensorFlow's gradient registry would
        # keep them in memory for good (tensorflow/tensorflow#97697).
        if self._gradients_before is not None:
            forget_custom_gradients(self._gradients_before)
        self._gradients_before = custom_gradient_names()
        self._model = build_model(cfg, input_shape, num_classes)
        self._initial_state = _snapshot(self._model.variables)
        self._initial_optimizer = _snapshot(self._model.optimizer.variables)
        self._generator = keras_global_seed_generator()
        self._generator_state = self._generator.state.numpy()


def train(cfg: TrialSettings | SweepConfig, splits: Splits,
          on_epoch_end: EpochCallback | None = None, model=None, initial_epoch: int = 0,
          should_stop: Callable[[], bool] | None = None, last_epoch: int | None = None):
    """Train the CNN of ``cfg`` on ``splits`` for ``cfg.train.epochs`` epochs.

    Args:
        cfg: The trial's model and training settings (sampled values filled in); a
            SweepConfig has both. Nothing else of a sweep's config is read (the search
            metric and mode only by ``train.patience``).
        splits: uint8 arrays; only train and validation are used.
        on_epoch_end: Called after every epoch with its metrics and the model.
        model: A model to continue (e.g. restored from a checkpoint); None builds one.
        initial_epoch: Epochs already trained by ``model``.
        should_stop: Asked after every batch; True ends training at once (the trial was
            stopped and its worker is wanted for the next one).
        last_epoch: End after this epoch (1-based) of the ``cfg.train.epochs`` budget, over
            which the learning-rate schedule stays defined (``final.retrain`` stops at the
            best trial's best epoch with the rates that trial had); None: the whole budget.

    With ``train.patience`` > 0 training also ends after that many epochs without a better
    ``search.metric`` (Keras' EarlyStopping; a trial continued from a checkpoint counts its
    patience afresh from there).

    Returns:
        The trained keras.Model.

    Raises:
        TrialDiverged: The training loss became NaN or infinite.
        RuntimeError: ``cfg.train`` asks for a learning-rate schedule that the model's
            optimizer does not follow (or the other way round).
    """
    import keras

    from sweeper.model import set_steps_per_epoch, uses_schedule

    if model is None:
        model = build_model(cfg, splits.input_shape, splits.num_classes)
    steps = math.ceil(len(splits.y_train) / cfg.train.batch_size)
    if set_steps_per_epoch(model, steps) != uses_schedule(cfg.train):
        # A schedule never told the batches per epoch would spend its whole budget in the
        # first epochs and train at rate 0 from then on, without a word.
        raise RuntimeError(f"train.schedule={cfg.train.schedule} with train.warmup_epochs="
                           f"{cfg.train.warmup_epochs}, but the model's optimizer "
                           f"({type(model.optimizer).__name__}) does not follow sweeper's "
                           "EpochSchedule accordingly")
    end = cfg.train.epochs if last_epoch is None else min(last_epoch, cfg.train.epochs)
    train_data = make_dataset(splits.x_train, splits.y_train, cfg.train.batch_size,
                              shuffle_seed=cfg.train.seed + initial_epoch)
    val_data = make_dataset(splits.x_val, splits.y_val, max(cfg.train.batch_size, 256))
    callbacks = [_epoch_callback(on_epoch_end)]
    if should_stop is not None:
        callbacks.append(_stop_callback(should_stop))
    if cfg.train.patience > 0:
        settings = TrialSettings.of(cfg)  # the metric patience watches
        # After the epoch's report, so the last epoch is reported and checkpointed.
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=settings.metric, mode=settings.mode, patience=cfg.train.patience))
    if initial_epoch < end:
        try:
            model.fit(
                train_data,
                validation_data=val_data,
                epochs=end,
                initial_epoch=initial_epoch,
                callbacks=callbacks,
                shuffle=False,  # the dataset shuffles itself, seeded
                verbose=0,
            )
        except _StopRequested:
            logger.debug("Training stopped on request")
    return model
