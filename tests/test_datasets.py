"""Any image-classification dataset (issue 22): image folders, arrays of any shape and CIFAR,
with the input shape and the classes taken from the data.

Every dataset here is written by the test from real Fashion-MNIST images
(``data_helpers``): nothing is downloaded, nothing of Keras or Pillow is mocked.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_helpers import (
    FOLDER_CLASSES,
    cifar_archive,
    class_images,
    colour_npz,
    save_npz,
    write_image_folder,
)

from sweeper.config import ConfigError, DataConfig, ModelConfig, check_input_fits
from sweeper.data import load_arrays, load_splits
from sweeper.image_folder import decode_image, load_image_folder

REPO = Path(__file__).resolve().parent.parent


def folder_config(path: Path, **settings) -> DataConfig:
    return DataConfig(name="image_folder", path=str(path), url=None, sha256=None, **settings)


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory) -> Path:
    """ROOT/<class>/: 20 real Fashion-MNIST images of each of three classes, PNG and JPEG,
    some stored as RGB, some enlarged to 36x36, and one PNG cut off after its header."""
    return write_image_folder(tmp_path_factory.mktemp("classes"), per_class=20)


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory) -> Path:
    """ROOT/train/<class>/ (20 images each) and ROOT/test/<class>/ (5 each), made like
    ``class_folder``; no broken file."""
    return write_image_folder(tmp_path_factory.mktemp("split"), per_class=20, layout="split",
                              test_per_class=5, broken=False)


def test_an_image_folder_of_class_folders_loads_with_names_sizes_and_a_per_class_test_split(
        class_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="sweeper.image_folder"):
        arrays = load_arrays(folder_config(class_folder, image_size=[28, 28]))
    assert arrays["class_names"].tolist() == sorted(FOLDER_CLASSES)
    # Some images are stored as RGB: the folder is read in colour.
    assert arrays["x_train"].shape[1:] == arrays["x_test"].shape[1:] == (28, 28, 3)
    assert arrays["x_train"].dtype == np.uint8
    # 20 images a class (the first class has 20 good ones and a broken one): 4 held out each.
    assert np.bincount(arrays["y_test"]).tolist() == [4, 4, 4]
    assert np.bincount(arrays["y_train"]).tolist() == [16, 16, 16]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Skipped 1 of 61" in warnings[0].getMessage()
    assert "broken.png" in warnings[0].getMessage()


def test_the_held_out_test_split_is_seeded(class_folder):
    first = load_arrays(folder_config(class_folder, image_size=[28, 28]))
    again = load_arrays(folder_config(class_folder, image_size=[28, 28]))
    other = load_arrays(folder_config(class_folder, image_size=[28, 28], seed=1))
    assert np.array_equal(first["x_test"], again["x_test"])
    assert not np.array_equal(first["x_test"], other["x_test"])


def test_decoding_on_one_thread_or_many_gives_the_same_arrays(class_folder):
    cfg = folder_config(class_folder, image_size=[24, 20], color_mode="grayscale")
    one, many = load_image_folder(cfg, workers=1), load_image_folder(cfg, workers=4)
    assert one["x_train"].shape[1:] == (24, 20, 1)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(one[key], many[key])


def test_the_train_test_layout_keeps_the_test_split_that_is_on_disk(split_folder):
    """Each test image is the decoding of a file under test/, with its folder's label."""
    splits = load_splits(folder_config(split_folder, image_size=[28, 28]), 0.2, seed=0)
    assert splits.sizes()["test"] == 15
    assert splits.class_names == tuple(sorted(FOLDER_CLASSES))
    on_disk = {decode_image(path, "rgb", (28, 28)).tobytes(): splits.class_names.index(
        path.parent.name) for path in sorted((split_folder / "test").rglob("*.*"))}
    loaded = {image.tobytes(): int(label)
              for image, label in zip(splits.x_test, splits.y_test, strict=True)}
    assert loaded == on_disk


def test_images_of_mixed_sizes_need_data_image_size(split_folder):
    with pytest.raises(ConfigError) as caught:
        load_arrays(folder_config(split_folder))
    assert caught.value.key == "data.image_size"
    assert "2 different sizes (28x28, 36x36)" in str(caught.value)


def test_images_of_one_size_keep_it_and_grayscale_folders_stay_grayscale(tmp_path):
    """Only PNGs of the images' own 28x28 grayscale: no image_size, no color_mode needed."""
    from PIL import Image

    for name, label in FOLDER_CLASSES.items():
        (tmp_path / name).mkdir()
        for index, pixels in enumerate(class_images(label, 5)):
            Image.fromarray(pixels).save(tmp_path / name / f"{index}.png")
    arrays = load_arrays(folder_config(tmp_path))
    assert arrays["x_train"].shape[1:] == (28, 28, 1)
    assert np.array_equal(arrays["x_train"][0, :, :, 0], class_images(FOLDER_CLASSES["sneaker"],
                                                                      5)[arrays_index(arrays)])


def arrays_index(arrays: dict[str, np.ndarray]) -> int:
    """Which of the first class's five files the first training image is (by pixel match)."""
    first = arrays["x_train"][0, :, :, 0]
    images = class_images(FOLDER_CLASSES["sneaker"], 5)
    return next(i for i, image in enumerate(images) if np.array_equal(image, first))


def test_a_colour_npz_of_other_labels_gives_its_shape_and_classes_to_the_model(tmp_path):
    from sweeper.model import build_cnn

    path = colour_npz(tmp_path / "colour.npz")
    splits = load_splits(DataConfig(name="npz", path=str(path)), 0.2, seed=0)
    assert splits.input_shape == (32, 32, 3)
    # Fashion-MNIST's labels 0, 1, 7 become 0, 1, 2, named by their values.
    assert splits.class_names == ("0", "1", "7")
    assert set(np.unique(splits.y_train).tolist()) == {0, 1, 2}
    model = build_cnn(ModelConfig(), splits.input_shape, splits.num_classes)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 3)


def test_labels_3_and_7_become_two_classes_named_3_and_7(tmp_path):
    x = np.concatenate([class_images(3, 40), class_images(7, 40)])
    y = np.array([3] * 40 + [7] * 40)
    path = save_npz(tmp_path / "two.npz", x_train=x, y_train=y, x_test=x[::4], y_test=y[::4])
    splits = load_splits(DataConfig(name="npz", path=str(path)), 0.2, seed=0)
    assert splits.class_names == ("3", "7")
    assert splits.input_shape == (28, 28)
    assert np.array_equal(splits.y_test, (y[::4] == 7).astype(np.uint8))


def test_class_names_in_an_npz_name_the_sorted_labels(tmp_path):
    x = np.concatenate([class_images(3, 30), class_images(7, 30)])[..., None]
    y = np.array([30] * 30 + [70] * 30)
    path = save_npz(tmp_path / "named.npz", x_train=x, y_train=y, x_test=x[::3], y_test=y[::3],
                    class_names=np.array(["dress", "sneaker"]))
    splits = load_splits(DataConfig(name="npz", path=str(path)), 0.2, seed=0)
    assert splits.class_names == ("dress", "sneaker")
    assert splits.input_shape == (28, 28, 1)


@pytest.mark.parametrize(("padding", "side", "fits"), [
    ("valid", 28, True), ("valid", 8, False), ("same", 8, True), ("valid", 18, True),
    ("valid", 17, False), ("same", 1, True)])
def test_the_input_must_survive_the_network(padding, side, fits):
    """28x28 -> 26 -> 13 -> 11 -> 5 -> 3 with valid padding; 17x17 reaches 1x1 before the
    third 3x3 convolution, which leaves nothing."""
    model = ModelConfig(padding=padding)
    if fits:
        check_input_fits(model, side, side)
        return
    with pytest.raises(ConfigError) as caught:
        check_input_fits(model, side, side)
    assert caught.value.key == "model.padding"
    assert f"{side}x{side} images shrink to" in str(caught.value)
    assert "model.padding=same" in str(caught.value)


def test_small_images_are_refused_before_ray_and_train_with_same_padding(tmp_path, compose):
    from sweeper.sweep import validate
    from sweeper.trainer import configure_tensorflow, train

    path = colour_npz(tmp_path / "small.npz", train=300, test=60, side=8)
    with pytest.raises(ConfigError) as caught:
        validate(compose("data=npz", f"data.path={path}"))
    assert caught.value.key == "model.padding"
    assert "8x8 images shrink to 0x0 pixels" in str(caught.value)
    cfg, _ = validate(compose("data=npz", f"data.path={path}", "model.padding=same",
                              "train.epochs=2"))
    configure_tensorflow(num_cpus=1, use_gpu=False)
    splits = load_splits(cfg.data, 0.2, seed=0)
    seen = []
    model = train(cfg, splits, on_epoch_end=lambda metrics, _: seen.append(metrics))
    assert model.input_shape == (None, 8, 8, 3)
    assert len(seen) == 2 and seen[-1].loss < seen[0].loss


def test_a_search_over_padding_checks_each_padding(tmp_path, compose):
    from sweeper.sweep import validate

    path = colour_npz(tmp_path / "small.npz", train=100, test=40, side=8)
    with pytest.raises(ConfigError, match="model.padding='valid'"):
        validate(compose("data=npz", f"data.path={path}", "model.padding=same",
                         "search.space.model.padding=choice(same, valid)"))


def test_the_8x8_message_suggests_data_image_size_and_it_resizes_an_npz(tmp_path, compose):
    """Issue 42: the 8x8 error names data.image_size, which data=npz refused; now the npz
    loads as 32x32 colour images, each pixel as an image folder would decode the same image
    saved as a PNG (Pillow, bilinear), and the model is built for 32x32."""
    from PIL import Image

    from sweeper.sweep import validate
    from sweeper.trainer import build_model

    path = colour_npz(tmp_path / "small.npz", train=100, test=40, side=8)
    with pytest.raises(ConfigError) as caught:
        validate(compose("data=npz", f"data.path={path}"))
    assert "data.image_size=[height,width]" in str(caught.value)
    cfg, _ = validate(compose("data=npz", f"data.path={path}", "data.image_size=[32,32]"))
    splits = load_splits(cfg.data, 0.2, seed=0)
    assert splits.input_shape == (32, 32, 3)
    assert splits.x_train.dtype == splits.x_val.dtype == splits.x_test.dtype == np.uint8
    assert splits.x_val.shape[1:] == splits.x_test.shape[1:] == (32, 32, 3)
    original = np.load(path)["x_test"][0]
    Image.fromarray(original).save(tmp_path / "first.png")
    assert np.array_equal(splits.x_test[0], decode_image(tmp_path / "first.png", "rgb", (32, 32)))
    assert build_model(cfg, splits.input_shape, splits.num_classes).input_shape == (
        None, 32, 32, 3)


def test_fashion_mnist_idx_resized_keeps_grayscale_without_a_channel_axis(fashion_mnist_dir):
    """IDX images (N, 28, 28) resized to 36x32 stay (N, 36, 32) uint8, each split; the same
    images as resizing the 28x28 ones one by one with Pillow."""
    from PIL import Image

    from sweeper.config import TrialSettings
    from sweeper.trainer import build_model

    data = DataConfig(name="fashion_mnist", path=str(fashion_mnist_dir), max_train_samples=100,
                      max_test_samples=20)
    plain = load_splits(data, 0.2, seed=0)
    splits = load_splits(DataConfig(**{**data.__dict__, "image_size": [36, 32]}), 0.2, seed=0)
    assert splits.input_shape == (36, 32)
    assert splits.x_val.shape == (20, 36, 32) and splits.x_test.shape == (20, 36, 32)
    assert splits.x_train.dtype == np.uint8
    expected = np.asarray(Image.fromarray(plain.x_val[3]).resize((32, 36),
                                                                 Image.Resampling.BILINEAR))
    assert np.array_equal(splits.x_val[3], expected)
    assert np.array_equal(splits.y_train, plain.y_train)
    model = build_model(TrialSettings(), splits.input_shape, splits.num_classes)
    assert model.input_shape == (None, 36, 32)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_a_local_archive_or_its_extracted_folder_as_keras_reads_it(tmp_path, name):
    """The archive is built here in the exact format Keras reads (``cifar_archive``); Keras'
    own batch reader (``keras.src.datasets.cifar.load_batch``, what
    keras.datasets.cifar10/cifar100.load_data use) is the oracle for the pixels and labels."""
    from keras.src.datasets.cifar import load_batch

    archive = cifar_archive(tmp_path / f"{name}.tar.gz", name)
    from_archive = load_arrays(DataConfig(name=name, path=str(archive)))
    with tarfile.open(archive) as opened:
        opened.extractall(tmp_path / "extracted", filter="data")
    inner = next((tmp_path / "extracted").iterdir())
    from_folder = load_arrays(DataConfig(name=name, path=str(inner)))
    from_parent = load_arrays(DataConfig(name=name, path=str(tmp_path / "extracted")))
    label_key = "labels" if name == "cifar10" else "fine_labels"
    test_file = "test_batch" if name == "cifar10" else "test"
    keras_x, keras_y = load_batch(str(inner / test_file), label_key=label_key)
    for arrays in (from_archive, from_folder, from_parent):
        assert arrays["x_train"].shape == (200, 32, 32, 3)
        assert np.array_equal(arrays["x_test"], keras_x.transpose(0, 2, 3, 1))
        assert np.array_equal(arrays["y_test"], np.asarray(keras_y))
        assert arrays["class_names"].tolist() == [f"class_{i}" for i in range(10)]
    small = load_splits(DataConfig(name=name, path=str(archive), image_size=[16, 16]), 0.2, 0)
    assert small.input_shape == (16, 16, 3) and small.x_test.dtype == np.uint8


CIFAR_THROUGH_KERAS = """
import sys
from sweeper.config import DataConfig
from sweeper.data import load_splits
splits = load_splits(DataConfig(name="cifar10", path=sys.argv[1] or None,
                                url="http://127.0.0.1:9/cifar-10-python.tar.gz",
                                sha256=sys.argv[2]), 0.2, 0)
print(splits.input_shape, splits.num_classes, splits.sizes()["test"],
      "tensorflow" in sys.modules)
"""


def test_cifar_through_keras_downloader_and_cache(tmp_path):
    """Keras' cache holds the archive (as keras.datasets.cifar10.load_data leaves it, under
    KERAS_HOME): get_file checks its hash and extracts it, nothing is downloaded (the URL
    goes nowhere). A local data.path loads without importing TensorFlow at all."""
    import hashlib

    archive = cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    cache = tmp_path / "keras_home" / "datasets"
    cache.mkdir(parents=True)
    (cache / "cifar-10-batches-py-target_archive").write_bytes(archive.read_bytes())
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home"),
           "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}

    def run(path: str) -> list[str]:
        result = subprocess.run([sys.executable, "-c", CIFAR_THROUGH_KERAS, path, sha256],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.split("\n")[-2].split()

    assert run("") == ["(32,", "32,", "3)", "10", "40", "True"]
    assert (cache / "cifar-10-batches-py-target" / "cifar-10-batches-py").is_dir()
    assert run(str(archive)) == ["(32,", "32,", "3)", "10", "40", "False"]


def test_an_unreadable_cifar_archive_is_one_config_error(tmp_path):
    broken = tmp_path / "cifar-10-python.tar.gz"
    broken.write_bytes(cifar_archive(tmp_path / "good.tar.gz").read_bytes()[:5000])
    with pytest.raises(ConfigError) as caught:
        load_arrays(DataConfig(name="cifar10", path=str(broken)))
    assert caught.value.key == "data.path"
    assert "cannot read it as Keras' cifar10 archive" in str(caught.value)


def test_class_names_label_the_confusion_matrix_and_the_report():
    """Labels {3, 7} of a test split, scored and reported: the names, not 0 and 1, appear."""
    from sweeper.evaluate import classification_metrics
    from sweeper.report import plot_confusion_matrix, report_markdown
    from sweeper.summary import Summary

    y_true, y_pred = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 1])
    test = classification_metrics(y_true, y_pred, 2, ("3", "7"))
    test.update(source="checkpoint")
    assert test["per_class"]["class_names"] == ["3", "7"]
    summary = Summary.from_dict({
        "experiment": "labels", "metric": "val_accuracy", "mode": "max", "max_epochs": 1,
        "best": None, "test": test, "trials": [],
        "data": {"name": "npz", "input_shape": [28, 28], "num_classes": 2,
                 "class_names": ["3", "7"], "sizes": {"train": 8, "val": 2, "test": 5}}})
    axes = plot_confusion_matrix(summary, []).axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["3", "7"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["3", "7"]
    report = report_markdown(summary, [])
    assert "| 7 | 0.75 | 1.0 | 0.8571 | 3 |" in report
    assert "- Data: npz, images of shape 28x28, 2 classes, 8 training / 2 validation / 5 test" \
        in report


def test_a_sweep_made_before_the_new_data_settings_still_resumes(tmp_path, compose):
    """Its saved config lacks data.image_size, data.seed, model.padding...: they count with
    their defaults; a real difference is still refused."""
    import yaml

    from sweeper.layout import SweepLayout
    from sweeper.sweep import check_sweep_dir, config_fingerprint, validate

    cfg, _ = validate(compose("+experiment=smoke", "data=fashion_mnist"))
    old = config_fingerprint(cfg)
    for key in ("image_size", "color_mode", "test_fraction", "seed"):
        del old["data"][key]
    del old["model"]["padding"]
    SweepLayout(tmp_path).sweep_config.write_text(yaml.safe_dump(old))
    check_sweep_dir(cfg, tmp_path)
    cfg.model.padding = "same"
    with pytest.raises(ConfigError, match=r"different config \(model.padding\)"):
        check_sweep_dir(cfg, tmp_path)
