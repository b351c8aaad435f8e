"""Bring your own Keras model: a builder function named by ``model._target_``, checked before
Ray starts, searched like the CNN, exported and loaded with the user's module importable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from sweeper.config import CNN_TARGET, ConfigError, ModelConfig

# The user's own code, as a user would write it in the folder they run from.
MY_MODELS = textwrap.dedent('''
    import json
    import os

    import keras
    from keras import layers

    CALLS = os.environ.get("MY_MODELS_CALLS")


    def _record(name, **settings):
        # Where each build ran and with what: the test reads it back.
        if CALLS:
            with open(CALLS, "a") as log:
                log.write(json.dumps({"builder": name, "file": __file__, **settings}) + "\\n")


    @keras.saving.register_keras_serializable(package="my_models")
    class Scale(layers.Layer):
        """A custom layer: loading the exported model needs this module."""

        def __init__(self, factor=1.0, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, inputs):
            return inputs * self.factor

        def get_config(self):
            return {**super().get_config(), "factor": self.factor}


    def small_resnet(input_shape, num_classes, width=16, depth=1, dropout=0.0):
        _record("small_resnet", width=width, depth=depth)
        inputs = keras.Input(shape=input_shape)
        x = layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
        for _ in range(depth):
            y = layers.Conv2D(width, 3, padding="same", activation="relu")(x)
            x = layers.Add()([x, Scale(0.5)(y)])  # the residual connection
        x = layers.MaxPooling2D(4)(x)
        x = layers.Flatten()(x)
        x = layers.Dropout(dropout)(x)
        return keras.Model(inputs, layers.Dense(num_classes, activation="softmax")(x),
                           name="small_resnet")


    def mlp(input_shape, num_classes, width=32):
        _record("mlp", width=width)
        return keras.Sequential([keras.Input(shape=input_shape), layers.Flatten(),
                                 layers.Dense(width, activation="relu"),
                                 layers.Dense(num_classes)], name="mlp")


    def three_outputs(input_shape, num_classes):
        return keras.Sequential([keras.Input(shape=input_shape), layers.Flatten(),
                                 layers.Dense(3, activation="softmax")])


    def not_a_model(input_shape, num_classes):
        return layers.Dense(num_classes)


    def needs_depth(input_shape, num_classes, depth):
        return mlp(input_shape, num_classes)
''')
BROKEN_MODELS = "import torchvision_is_not_here\n"
CONFIGS = {
    "resnet.yaml": "_target_: my_models.small_resnet\nwidth: 16\ndepth: 1\n",
    "mlp.yaml": "_target_: my_models.mlp\nwidth: 32\nfrom_logits: true\n",
}
EXPERIMENT = textwrap.dedent("""\
    # @package _global_
    defaults:
      - override /model: resnet
    name: mine
    """)


def write_user_folder(folder: Path) -> Path:
    """``my_models.py`` and ``conf_mine/`` (two model configs, one experiment) in ``folder``."""
    (folder / "conf_mine" / "model").mkdir(parents=True)
    (folder / "conf_mine" / "experiment").mkdir()
    (folder / "my_models.py").write_text(MY_MODELS)
    (folder / "broken_models.py").write_text(BROKEN_MODELS)
    for name, text in CONFIGS.items():
        (folder / "conf_mine" / "model" / name).write_text(text)
    (folder / "conf_mine" / "experiment" / "mine.yaml").write_text(EXPERIMENT)
    return folder


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """The user's folder, importable as the current folder is for ``python -m sweeper``."""
    folder = write_user_folder(tmp_path / "user")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.chdir(folder)
    yield folder
    for name in ("my_models", "broken_models"):
        sys.modules.pop(name, None)


def compose_mine(*overrides: str):
    from sweeper.overrides import compose_config, quote_space_overrides

    return compose_config(quote_space_overrides(list(overrides)), ["conf_mine"])


def test_the_default_model_is_the_cnn_builder_with_its_typed_settings(compose):
    from sweeper.sweep import validate

    cfg, _ = validate(compose())
    assert isinstance(cfg.model, ModelConfig) and cfg.model._target_ == CNN_TARGET
    # Preflight of the CNN stays free of TensorFlow (a fresh process tells).
    code = ("import sys; from sweeper.overrides import compose_config; "
            "from sweeper.sweep import validate; validate(compose_config([])); "
            "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).parent.parent)
    assert result.stdout.strip() == "False", result.stderr


def test_the_cnn_builder_gives_the_classic_network_through_the_one_path():
    from sweeper.model import build_cnn

    model = build_cnn({"_target_": CNN_TARGET}, (28, 28), 10)
    assert model.count_params() == 93_322
    assert [type(layer).__name__ for layer in model.layers] == [
        "Rescaling", "Reshape", "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Conv2D",
        "Flatten", "Dense", "Dropout", "Dense"]
    assert (model.input_shape, model.inputs[0].dtype) == ((None, 28, 28), "uint8")


def test_a_model_config_of_the_users_own_composes_with_its_keys_and_searched_types(
        user_folder):
    from sweeper.sweep import validate

    cfg, space = validate(compose_mine(
        "model=resnet", "model.width=24", "+model.dropout=0.1",
        "search.space.model.width=choice(16, 32, 64)", "search.space.model.depth=range(1, 4)",
        "search.space.model.dropout=interval(0, 0.5)"))
    assert cfg.model == {"_target_": "my_models.small_resnet", "width": 24, "depth": 1,
                         "dropout": 0.1}
    # Types from the YAML values (width, depth: integers) and the signature (dropout=0.0).
    assert space["model.depth"].low == 1 and space["model.depth"].high == 3
    assert type(space["model.depth"]).__name__ == "IntDistribution"
    assert type(space["model.dropout"]).__name__ == "FloatDistribution"
    assert space["model.width"].choices == (16, 32, 64)
    experiment, _ = validate(compose_mine("+experiment=mine"))
    assert experiment.model["_target_"] == "my_models.small_resnet"
    switched, _ = validate(compose_mine("model=mlp", "model._target_=my_models.small_resnet",
                                        "~model.from_logits"))
    assert switched.model == {"_target_": "my_models.small_resnet", "width": 32}


def test_the_builder_gets_the_searched_values_and_the_trainer_trains_it(user_folder,
                                                                       small_splits):
    from sweeper.config import apply_params
    from sweeper.sweep import validate
    from sweeper.trainer import build_model, train

    cfg, _ = validate(compose_mine("model=mlp", "search.space.model.width=choice(8, 48)",
                                   "train.epochs=1"))
    trial = apply_params(cfg, {"model.width": 48})
    model = build_model(trial, small_splits.input_shape, small_splits.num_classes)
    assert [layer.units for layer in model.layers if hasattr(layer, "units")] == [48, 10]
    assert model.loss.get_config()["from_logits"] is True
    seen = []
    train(trial, small_splits, on_epoch_end=lambda metrics, _: seen.append(metrics),
          model=model)
    assert seen[0].val_accuracy > 0.3  # ten classes: chance is 0.1


# (overrides, what the one line must say); run from the user's folder.
OWN_MODEL_MISTAKES = [
    (["model._target_=broken_models.build"],
     "model._target_='broken_models.build' is invalid: cannot import broken_models "
     "(ModuleNotFoundError: No module named 'torchvision_is_not_here')"),
    (["model=mlp", "model._target_=my_models.missing"], "has no missing"),
    (["model=mlp", "model._target_=my_models.CALLS"], "not a function"),
    (["model=mlp", "+model.depth=3"],
     "model.depth=3 is invalid: not a parameter of my_models.mlp; it takes width"),
    (["model=mlp", "search.space.model.height=choice(1, 2)"],
     "search.space.model.height='choice(1, 2)' is invalid: not a parameter of my_models.mlp"),
    (["model=mlp", "model._target_=my_models.needs_depth", "~model.width", "~model.from_logits"],
     "model.depth=None is invalid: my_models.needs_depth needs it"),
    (["model=mlp", "model._target_=my_models.three_outputs", "~model.width",
      "~model.from_logits"], "its output shape is (None, 3); the data has 10 classes"),
    (["model=mlp", "model._target_=my_models.not_a_model", "~model.width",
      "~model.from_logits"], "returned a Dense, not a keras.Model"),
]


@pytest.mark.parametrize(("overrides", "message"), OWN_MODEL_MISTAKES,
                         ids=[" ".join(o) for o, _ in OWN_MODEL_MISTAKES])
def test_a_broken_own_model_exits_2_with_one_line_before_ray_starts(tmp_path, fashion_mnist_dir,
                                                                    overrides, message):
    folder = write_user_folder(tmp_path / "user")
    before = sorted(folder.rglob("*"))
    ray_tmp = tmp_path / "ray"
    result = subprocess.run(
        [sys.executable, "-m", "sweeper", "--config-dir", "conf_mine", *overrides,
         "data=fashion_mnist", f"data.path={fashion_mnist_dir}", "data.max_train_samples=200"],
        cwd=folder, env={**os.environ, "RAY_TMPDIR": str(ray_tmp)}, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    # Exactly one line: TensorFlow's start-up noise (its import by the user's module, its
    # devices found for the driver's build of the model) does not come before it.
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
        result.stderr
    assert not ray_tmp.exists()
    assert sorted(path for path in folder.rglob("*") if "__pycache__" not in path.parts) == before


def test_check_network_refuses_a_builder_that_raises(user_folder):
    from sweeper.model import check_network

    with pytest.raises(ConfigError, match=r"failed to build the model for \(28, 28\) images "
                                          r"and 10 classes \(ValueError: .*units=wide"):
        check_network({"_target_": "my_models.mlp", "width": "wide"}, (28, 28), 10)


def hparams_of(logdir: Path) -> dict[str, dict[str, object]]:
    from tensorboard.backend.event_processing.plugin_event_multiplexer import (
        EventMultiplexer,
    )
    from tensorboard.plugins.hparams import plugin_data_pb2

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    found = {}
    for run, tags in multiplexer.PluginRunToTagToContent("hparams").items():
        for tag, content in tags.items():
            if tag.endswith("session_start_info"):
                data = plugin_data_pb2.HParamsPluginData.FromString(content)
                found[run] = {name: getattr(value, value.WhichOneof("kind"))
                              for name, value in data.session_start_info.hparams.items()}
    return found


SWEEP_ARGS = ["data=fashion_mnist", "data.max_train_samples=2000", "data.max_test_samples=500",
              "train.epochs=2", "train.batch_size=64", "search.num_trials=3",
              "search.n_startup_trials=2", "resources.max_concurrent_trials=2",
              "scheduler.grace_period=1", "scheduler.reduction_factor=2"]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "space", "searched"), [
    ("resnet", ["search.space.model.width=choice(8, 16)", "search.space.model.depth=range(1, 3)"],
     ("width", "depth")),
    ("mlp", ["search.space.model.width=choice(16, 64, 128)"], ("width",)),
], ids=["functional_resnet", "sequential_mlp"])
def test_a_sweep_of_an_own_model_on_fashion_mnist(tmp_path, fashion_mnist_dir, model, space,
                                                  searched):
    """The ResNet through the CLI; the MLP through the Python API, as a script of three lines
    (sweeper.compose with the user's config folder, sweeper.run), whose stdout must show the
    CLI's trial lines and none of Optuna's own ("A new study created" was all a notebook
    showed before sweeper.run printed its lines)."""
    folder = write_user_folder(tmp_path / "user")
    calls = tmp_path / "calls.jsonl"
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "MY_MODELS_CALLS": str(calls)}
    overrides = [f"model={model}", f"data.path={fashion_mnist_dir}", f"name={model}",
                 *SWEEP_ARGS, *space]
    if model == "mlp":
        script = ("import sweeper\n"
                  f"config = sweeper.compose({overrides!r}, config_dir='conf_mine')\n"
                  "print('state:', sweeper.run(config).state)\n")
        command = [sys.executable, "-c", script]
    else:
        # --config-dir after an override, as a user may type it (issue 41).
        command = [sys.executable, "-m", "sweeper", *overrides[:1], "--config-dir", "conf_mine",
                   *overrides[1:]]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if model == "mlp":
        lines = result.stdout.splitlines()
        assert lines[-1] == "state: complete"
        assert any(line.startswith("Trial 1 started (id ") for line in lines)
        assert any(line.startswith("Trial 1 epoch 1: loss ") for line in lines)
        assert "A new study created" not in result.stdout + result.stderr
    sweep_dir = folder / "sweeps" / model
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["state"] == "complete" and summary["test"]["accuracy"] > 0.5
    assert (sweep_dir / "report" / "report.md").is_file()

    # Every trial's sampled values reached the builder (on the workers).
    sampled = [{key.split(".", 1)[1]: value for key, value in trial["config"].items()
                if key.startswith("model.")} for trial in summary["trials"]]
    built = [json.loads(line) for line in calls.read_text().splitlines()]
    for params in sampled:
        assert any(all(call[key] == value for key, value in params.items()) for call in built)
    # TensorBoard's HParams show the custom parameters of every trial.
    hparams = hparams_of(sweep_dir / summary["paths"]["tensorboard"])  # relative to the sweep
    assert len(hparams) == 3
    assert all({f"model.{key}" for key in searched} <= set(values) for values in hparams.values())

    info = json.loads((sweep_dir / "best_model.json").read_text())
    builder = {"resnet": "my_models.small_resnet", "mlp": "my_models.mlp"}[model]
    assert (info["builder"], info["import"]) == (builder, "my_models")
    assert info["outputs"] == ("logits" if model == "mlp" else "probabilities")
    # The exported model loads in a fresh process that can import the user's module, and
    # takes raw uint8 images of the data's shape.
    load = ("import keras, numpy as np, my_models; "
            f"m = keras.models.load_model({str(sweep_dir / 'best_model.keras')!r}); "
            "print(m.predict(np.zeros((2, 28, 28), np.uint8), verbose=0).shape)")
    loaded = subprocess.run([sys.executable, "-c", load], cwd=folder, capture_output=True,
                            text=True, timeout=300)
    assert loaded.stdout.strip().splitlines()[-1] == "(2, 10)", loaded.stderr[-2000:]
    # best_config.yaml composes into the same model with the best values pinned.
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sweeper.config import register_configs
    from sweeper.sweep import validate

    register_configs()
    GlobalHydra.instance().clear()
    sys.path.insert(0, str(folder))
    try:
        with initialize_config_dir(str(sweep_dir), version_base="1.3"):
            best, best_space = validate(compose(config_name="best_config"))
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("my_models", None)
        GlobalHydra.instance().clear()
    assert best.model["_target_"] == builder
    for key in searched:
        assert best_space[f"model.{key}"].choices == (summary["best"]["config"][f"model.{key}"],)


def test_a_sweep_of_an_own_model_resumes_only_with_the_same_model(user_folder, tmp_path):
    from sweeper.sweep import NEW, check_sweep_dir, claim_sweep_dir, validate

    cfg, _ = validate(compose_mine("model=resnet", "search.space.model.width=choice(8, 16)"))
    claim_sweep_dir(cfg, tmp_path / "sweep", NEW)
    check_sweep_dir(cfg, tmp_path / "sweep")  # the same config: resumes
    cfg.model["depth"] = 3
    with pytest.raises(ConfigError, match=r"different config \(model.depth\)"):
        check_sweep_dir(cfg, tmp_path / "sweep")


def test_a_worker_reuses_an_own_model_unless_its_layers_draw_random_numbers(user_folder):
    from sweeper.config import apply_params
    from sweeper.sweep import validate
    from sweeper.trainer import WarmModel

    warm = WarmModel()
    cfg, _ = validate(compose_mine("model=resnet", "search.space.train.lr=choice(0.1, 0.01)"))
    first = warm.get(cfg, (28, 28), 10)
    again = warm.get(apply_params(cfg, {"train.lr": 0.01}), (28, 28), 10)
    assert again is first and float(again.optimizer.learning_rate) == pytest.approx(0.01)
    noisy = apply_params(cfg, {"model.dropout": 0.2})
    assert warm.get(noisy, (28, 28), 10) is not warm.get(noisy, (28, 28), 10)
