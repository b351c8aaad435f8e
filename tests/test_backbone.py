"""model=backbone (issue 42): a pretrained keras.applications backbone with a head, its weights
from Keras' own cache, a path, or nowhere (offline: one line), batch norm kept in inference
mode while fine-tuning, and an exported model that takes raw uint8 images.

No network: the tests make MobileNetV3Small's weights file themselves and put it where Keras'
downloader caches it, under a KERAS_HOME of their own (the user's ~/.keras is never touched);
processes that must see that KERAS_HOME (Keras reads it when it is imported) run apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sweeper.config import BACKBONE_TARGET, DataConfig, TrainConfig, TrialSettings

# The file keras.applications.MobileNetV3Small(include_top=False, weights="imagenet") caches
# (keras/src/applications/mobilenet_v3.py, Keras 3.15), below KERAS_HOME.
CACHED_FILE = Path("models") / "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
# Any download fails at once: a proxy on a port nothing listens on.
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}

# Written to KERAS_HOME/<CACHED_FILE> and to a .weights.h5 path: seeded random weights of the
# backbone without its top (32x32 inputs), then read back through sweeper's builder.
MAKE_AND_LOAD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import keras, numpy as np
    from sweeper.config import TrialSettings
    from sweeper.trainer import build_model

    home, weights, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    keras.utils.set_random_seed(7)
    made = keras.applications.MobileNetV3Small(include_top=False, weights=None,
                                               input_shape=(32, 32, 3))
    cached = home / "models" / "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    cached.parent.mkdir(parents=True, exist_ok=True)
    made.save(cached)  # the legacy .h5 layout Keras' downloads have
    made.save_weights(str(home / "mine.weights.h5"))
    model = build_model(TrialSettings(model={"_target_": "sweeper.backbone.backbone",
                                             "weights": weights}), (28, 28), 3)
    inner = model.get_layer("backbone_MobileNetV3Small").get_layer("MobileNetV3Small")
    same = all(np.array_equal(a, b) for a, b in zip(made.get_weights(), inner.get_weights()))
    Path(out).write_text(json.dumps({"same": same, "n": len(made.get_weights())}))
""")


def keras_env(home: Path) -> dict[str, str]:
    return {**os.environ, **OFFLINE, "KERAS_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.mark.parametrize("weights", ["imagenet", "{home}/mine.weights.h5"])
def test_weights_from_keras_cache_without_network_or_from_a_path(tmp_path, weights):
    home = tmp_path / "keras"
    out = tmp_path / "out.json"
    result = subprocess.run([sys.executable, "-c", MAKE_AND_LOAD, str(home),
                             weights.format(home=home), str(out)],
                            env=keras_env(home), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(out.read_text())
    assert loaded["same"] and loaded["n"] > 100


def run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("weights", "message"), [
    ("imagenet", "model.weights='imagenet' is invalid: cannot download MobileNetV3Small's "
                 "ImageNet weights"),
    ("{other}", "does not hold MobileNetV3Small's weights without its top"),
])
def test_weights_that_cannot_be_had_or_do_not_fit_are_one_line_before_ray(
        tmp_path, fashion_mnist_dir, weights, message):
    """Offline with an empty cache, or a weights file of another network: exit 2, one line
    naming model.weights=PATH (offline) or the file, before Ray starts or a folder is made."""
    import keras

    other = tmp_path / "other.weights.h5"
    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    tiny.save_weights(str(other))
    home, run_dir, ray_tmp = tmp_path / "keras", tmp_path / "run", tmp_path / "ray"
    run_dir.mkdir()
    env = {**keras_env(home), "RAY_TMPDIR": str(ray_tmp)}
    result = run_cli(["model=backbone", f"model.weights={weights.format(other=other)}",
                      "data=fashion_mnist", f"data.path={fashion_mnist_dir}",
                      "data.max_train_samples=200", "data.max_test_samples=50",
                      "search.num_trials=1", "train.epochs=1"], run_dir, env)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    if weights == "imagenet":
        assert "model.weights=PATH" in lines[0] and CACHED_FILE.name in lines[0]
    assert not ray_tmp.exists() and list(run_dir.iterdir()) == []


@pytest.fixture(scope="module")
def few_splits(fashion_mnist_dir):
    """300 Fashion-MNIST images (240 train, 60 validation) and 60 test images."""
    from sweeper.data import load_splits
    from sweeper.trainer import configure_tensorflow

    configure_tensorflow(num_cpus=1, use_gpu=False)
    data = DataConfig(name="fashion_mnist", path=str(fashion_mnist_dir), max_train_samples=300,
                      max_test_samples=60)
    return load_splits(data, validation_fraction=0.2, seed=0)


def backbone_settings(**model) -> TrialSettings:
    return TrialSettings(model={"_target_": BACKBONE_TARGET, "name": "MobileNetV3Small",
                                "weights": None, "dropout": 0.2, "dense_units": 0, **model},
                         train=TrainConfig(epochs=1, batch_size=32, lr=1e-3))


def backbone_of(model):
    return model.get_layer("backbone_MobileNetV3Small").get_layer("MobileNetV3Small")


def batch_norm_statistics(network) -> list[np.ndarray]:
    import keras

    return [keras.ops.convert_to_numpy(variable) for layer in network.layers
            if isinstance(layer, keras.layers.BatchNormalization)
            for variable in (layer.moving_mean, layer.moving_variance)]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """Weights of MobileNetV3Small without its top, saved with Keras' save_weights: the
    backbone a user would have pretrained."""
    import keras

    keras.utils.set_random_seed(3)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small.weights.h5"
    keras.applications.MobileNetV3Small(include_top=False, weights=None,
                                        input_shape=(32, 32, 3)).save_weights(str(path))
    return path


@pytest.mark.parametrize(("fraction", "pretrained"), [(0.0, True), (0.5, True), (1.0, False)])
def test_batch_norm_of_pretrained_weights_stays_in_inference_mode(few_splits, tmp_path,
                                                                  weights_file, fraction,
                                                                  pretrained):
    """Pretrained weights: moving statistics unchanged after an epoch of training, the
    backbone frozen or its top half trained (Keras 3 trains them when the backbone is only
    called with training=False, keras-team/keras#20285); the frozen backbone's weights
    unchanged, the fine-tuned one's changed. Random initialization: batch norm learns its
    statistics. The saved model predicts raw uint8 images as the trained one does."""
    import keras

    from sweeper.model import save_portable
    from sweeper.trainer import build_model, train

    settings = backbone_settings(trainable_fraction=fraction,
                                 weights=str(weights_file) if pretrained else None)
    model = build_model(settings, few_splits.input_shape, few_splits.num_classes)
    network = backbone_of(model)
    statistics, weights = batch_norm_statistics(network), network.get_weights()
    head = model.get_layer("backbone_MobileNetV3Small").get_layer("classes").get_weights()[0]
    train(settings, few_splits, model=model)
    assert pretrained == all(np.array_equal(before, after) for before, after in
                             zip(statistics, batch_norm_statistics(network), strict=True))
    changed = [not np.array_equal(before, after)
               for before, after in zip(weights, network.get_weights(), strict=True)]
    assert any(changed) == (fraction > 0)
    assert not np.array_equal(head, model.get_layer("backbone_MobileNetV3Small")
                              .get_layer("classes").get_weights()[0])
    save_portable(model, tmp_path / "best_model.keras")
    loaded = keras.models.load_model(tmp_path / "best_model.keras")
    raw = few_splits.x_test[:8]
    assert raw.dtype == np.uint8 and loaded.input_shape == (None, 28, 28)
    np.testing.assert_allclose(loaded.predict(raw, verbose=0), model.predict(raw, verbose=0),
                               rtol=1e-4, atol=1e-5)


def test_each_backbone_scales_pixels_as_its_preprocess_input_does():
    """What reaches each backbone from an image in [0, 1]: [0, 255] for those that rescale
    themselves, [-1, 1] (resnet_v2.preprocess_input) for ResNet50V2; 20x20 grayscale images
    resized up to 32x32 RGB."""
    import keras

    from sweeper.backbone import backbone

    image = np.random.default_rng(0).random((1, 20, 20, 1)).astype("float32")
    for name in ("MobileNetV3Small", "EfficientNetV2B0", "ResNet50V2"):
        model = backbone((20, 20, 1), 3, name=name, weights=None)
        network = next(layer for layer in model.layers if isinstance(layer, keras.Model))
        before = keras.Model(model.input, model.layers[model.layers.index(network) - 1].output)
        seen = np.asarray(before(image))
        assert seen.shape == (1, 32, 32, 3)
        expected = keras.applications.resnet_v2.preprocess_input(
            np.asarray(keras.layers.Resizing(32, 32)(image * 255.0)).repeat(3, axis=-1))
        if name == "ResNet50V2":
            np.testing.assert_allclose(seen, expected, atol=1e-4)
        else:
            np.testing.assert_allclose(seen / 127.5 - 1.0, expected, atol=1e-4)


# Loads the sweep's best_model.keras with plain Keras (no sweeper import) and predicts raw
# uint8 images of the data's shape.
PLAIN_KERAS_PREDICT = textwrap.dedent("""
    import sys
    import keras, numpy as np
    model = keras.models.load_model(sys.argv[1])
    images = np.load(sys.argv[2])
    probabilities = model.predict(images, verbose=0)
    assert model.input_shape == (None, 28, 28), model.input_shape
    assert probabilities.shape == (len(images), 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    print("predicted", len(images))
""")


@pytest.mark.slow
def test_a_backbone_sweep_from_the_cached_imagenet_file_exports_a_model_for_raw_images(
        tmp_path, fashion_mnist_dir):
    """The real CLI, offline: 2 trials of 1 epoch of MobileNetV3Small on 300 Fashion-MNIST
    images, model.weights=imagenet read from the cache (made here), dropout searched; the
    exported model loads with plain Keras and classifies raw uint8 28x28 images."""
    import tempfile

    from cli_helpers import cli_env

    home = tmp_path / "keras"
    made = subprocess.run([sys.executable, "-c", MAKE_AND_LOAD, str(home), "imagenet",
                           str(tmp_path / "made.json")], env=keras_env(home),
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env = {**cli_env(ray_tmp), **OFFLINE, "KERAS_HOME": str(home)}
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["+experiment=smoke", "model=backbone", "model.weights=imagenet",
                      "data=fashion_mnist", f"data.path={fashion_mnist_dir}",
                      "data.max_train_samples=300", "data.max_test_samples=100",
                      "search.num_trials=2", "train.epochs=1", "train.batch_size=32",
                      "search.space.model.dropout=interval(0.1, 0.5)",
                      f"sweep_dir={sweep_dir}"], tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["best"] is not None and len(summary["trials"]) == 2
    dropouts = {trial["config"]["model.dropout"] for trial in summary["trials"]}
    assert len(dropouts) == 2
    raw = tmp_path / "raw.npy"
    from sweeper.data import load_idx_folder

    np.save(raw, load_idx_folder(fashion_mnist_dir)["x_test"][:16])
    predicted = subprocess.run([sys.executable, "-c", PLAIN_KERAS_PREDICT,
                                str(sweep_dir / "best_model.keras"), str(raw)],
                               env=keras_env(home), capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0 and "predicted 16" in predicted.stdout, predicted.stderr


def test_a_relative_weights_path_is_made_absolute_for_the_trials(tmp_path, monkeypatch, compose,
                                                                weights_file):
    """Trials build the model in their own working folder: model.weights=FILE given relative
    to where the sweep starts reaches them as an absolute path."""
    from sweeper.sweep import validate

    monkeypatch.chdir(weights_file.parent)
    cfg, _ = validate(compose("model=backbone", f"model.weights={weights_file.name}",
                              "data=fashion_mnist"))
    assert cfg.model["weights"] == str(weights_file)
    cfg, _ = validate(compose("model=backbone", "data=fashion_mnist"))
    assert cfg.model["weights"] == "imagenet"
