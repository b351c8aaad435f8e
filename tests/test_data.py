"""Datasets load as MNIST-shaped uint8 arrays from IDX files, npz files or Keras' cache."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sweeper.config import ConfigError, DataConfig
from sweeper.data import load_arrays, load_idx_folder, load_splits, make_splits, read_idx

IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8) as an IDX file, gzipped when the name ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())
    return path


def numbered(n: int) -> dict[str, np.ndarray]:
    """Images whose first two pixels spell their index, so splits can be traced back."""
    x = np.zeros((n, 28, 28), dtype=np.uint8)
    x[:, 0, 0], x[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    y = (np.arange(n) % 10).astype(np.uint8)
    return {"x_train": x, "y_train": y, "x_test": x[: n // 4].copy(), "y_test": y[: n // 4].copy()}


def indices(images: np.ndarray) -> set[int]:
    return set((images[:, 0, 0].astype(int) * 256 + images[:, 0, 1]).tolist())


def write_folder(folder: Path, arrays: dict[str, np.ndarray], suffix: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in IDX_NAMES.items():
        write_idx(folder / f"{name}{suffix}", arrays[key])
    return folder


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_plain_and_gzipped(tmp_path, suffix):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / f"images{suffix}", images)), images)


def test_read_idx_refuses_what_is_not_idx(tmp_path):
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(tmp_path / "junk")
    raw = write_idx(tmp_path / "short", np.zeros((3, 28, 28), np.uint8)).read_bytes()
    (tmp_path / "short").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_folder_of_gzipped_idx_files(fashion_mnist_dir):
    arrays = load_arrays(DataConfig(name="fashion_mnist", path=str(fashion_mnist_dir)))
    assert arrays["x_train"].shape == (60000, 28, 28) and arrays["x_train"].dtype == np.uint8
    assert arrays["x_test"].shape == (10000, 28, 28)
    assert set(np.unique(arrays["y_train"]).tolist()) == set(range(10))


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_folder_of_idx_files_plain_or_gzipped(tmp_path, suffix):
    arrays = numbered(200)
    loaded = load_arrays(DataConfig(path=str(write_folder(tmp_path / "idx", arrays, suffix))))
    for key, array in arrays.items():
        assert np.array_equal(loaded[key], array), key


def test_idx_folder_with_dotted_names(tmp_path):
    """The names the original MNIST archive unpacks to on some systems: train-images.idx3-ubyte."""
    arrays = numbered(40)
    for key, name in IDX_NAMES.items():
        write_idx(tmp_path / name.replace("-idx", ".idx"), arrays[key])
    assert np.array_equal(load_idx_folder(tmp_path)["y_train"], arrays["y_train"])


def test_npz_in_keras_mnist_layout(fashion_npz):
    arrays = load_arrays(DataConfig(path=str(fashion_npz)))
    assert arrays["x_train"].shape == (2000, 28, 28)
    assert arrays["y_test"].shape == (500,) and arrays["y_test"].dtype == np.uint8


def test_npz_of_float_pixels_is_taken_as_uint8(tmp_path):
    arrays = numbered(40)
    floats = {k: v.astype(np.float32) for k, v in arrays.items()}
    loaded = load_arrays(DataConfig(path=str(save_npz(tmp_path / "f.npz", **floats))))
    assert loaded["x_train"].dtype == np.uint8
    assert np.array_equal(loaded["x_train"], arrays["x_train"])


def test_npz_of_images_scaled_to_0_1_gets_its_pixels_back(tmp_path):
    """Issue 20: images already scaled to [0, 1] were cast to uint8 (nearly all 0): trained to
    chance with exit 0. They are scaled back, to the very pixels they came from."""
    arrays = numbered(40)
    scaled = {**arrays, "x_train": arrays["x_train"] / 255.0,
              "x_test": (arrays["x_test"] / 255.0).astype(np.float32)}
    loaded = load_arrays(DataConfig(path=str(save_npz(tmp_path / "s.npz", **scaled))))
    assert loaded["x_train"].dtype == np.uint8
    assert np.array_equal(loaded["x_train"], arrays["x_train"])
    assert np.array_equal(loaded["x_test"], arrays["x_test"])


def fashion_pixels() -> dict[str, np.ndarray]:
    """40 training and 10 test images of real Fashion-MNIST (classes 0, 1 and 7)."""
    from data_helpers import class_images

    x = np.concatenate([class_images(label, 17) for label in (0, 1, 7)])[:50]
    y = np.repeat(np.array([0, 1, 7], np.uint8), 17)[:50]
    return {"x_train": x[:40], "y_train": y[:40], "x_test": x[40:], "y_test": y[40:]}


# Issue 41: image arrays of other types than uint8, as pipelines save them; each must load as
# the very uint8 pixels it was made from (16-bit as 16-bit PNGs decode: x >> 8).
PIXEL_TYPES = {
    "uint16 made as x * 257": lambda x: x.astype(np.uint16) * 257,
    "uint16 of any low byte": lambda x: x.astype(np.uint16) * 256 + (255 - x),
    "uint16 holding 0-255": lambda x: x.astype(np.uint16),
    "int64 holding 0-255": lambda x: x.astype(np.int64),
    "float16 in [0, 1]": lambda x: (x / 255).astype(np.float16),
    "float32 in [0, 1]": lambda x: (x / 255).astype(np.float32),
    "float64 in [0, 255]": lambda x: x.astype(np.float64),
}


@pytest.mark.parametrize("kind", PIXEL_TYPES)
def test_npz_pixels_of_any_type_load_as_the_uint8_pixels_they_were_made_from(tmp_path, kind):
    arrays = fashion_pixels()
    made = {**arrays, **{key: PIXEL_TYPES[kind](arrays[key]) for key in ("x_train", "x_test")}}
    loaded = load_arrays(DataConfig(path=str(save_npz(tmp_path / "p.npz", **made))))
    for key in ("x_train", "x_test"):
        assert loaded[key].dtype == np.uint8 and np.array_equal(loaded[key], arrays[key]), key


def test_npz_labels_that_are_class_names_name_the_classes(tmp_path):
    arrays = fashion_pixels()
    names = {0: "T-shirt", 1: "Trouser", 7: "Sneaker"}
    as_names = {key: np.array([names[int(label)] for label in arrays[key]])
                for key in ("y_train", "y_test")}
    loaded = load_arrays(DataConfig(path=str(save_npz(tmp_path / "n.npz",
                                                      **{**arrays, **as_names}))))
    assert loaded["class_names"].tolist() == ["Sneaker", "T-shirt", "Trouser"]
    for key in ("y_train", "y_test"):
        assert [loaded["class_names"][label] for label in loaded[key]] == as_names[key].tolist()
    mixed = {**arrays, "y_train": as_names["y_train"]}
    with pytest.raises(ConfigError, match="labels of different kinds"):
        load_arrays(DataConfig(path=str(save_npz(tmp_path / "m.npz", **mixed))))


SPLIT_MISTAKES = [
    # (validation_fraction, max_train_samples, labels, key, words): issue 20's 0.99 of 20.
    (0.99, 20, None, "train.validation_fraction", "the training split is empty"),
    (0.001, 20, None, "train.validation_fraction", None),
    (0.2, None, "one class", "data.path", "a classifier needs two or more"),
]


@pytest.mark.parametrize(("fraction", "limit", "labels", "key", "words"), SPLIT_MISTAKES)
def test_splits_that_cannot_train_are_refused(fraction, limit, labels, key, words):
    arrays = numbered(40)
    if labels == "one class":
        arrays["y_train"] = np.full_like(arrays["y_train"], 3)
    if words is None:  # a tiny fraction still leaves one validation image: no error
        splits = make_splits(arrays, fraction, seed=0, max_train_samples=limit)
        assert splits.sizes()["val"] == 1
        return
    with pytest.raises(ConfigError) as caught:
        make_splits(arrays, fraction, seed=0, max_train_samples=limit)
    assert caught.value.key == key and words in caught.value.allowed


def test_an_empty_test_split_is_refused():
    arrays = numbered(40)
    arrays["x_test"], arrays["y_test"] = arrays["x_test"][:0], arrays["y_test"][:0]
    with pytest.raises(ConfigError, match="test split is empty"):
        make_splits(arrays, 0.2, seed=0)


def bad(arrays: dict[str, np.ndarray], **changes: np.ndarray) -> dict[str, np.ndarray]:
    return {**arrays, **changes}


BAD_NPZ = [
    ("flat images", lambda a: bad(a, x_train=a["x_train"].reshape(-1, 784)),
     "expected (N, height, width) or (N, height, width, channels)"),
    # Issue 22: any image shape is data, but train and test must agree, and channels are images'.
    ("train and test differ", lambda a: bad(a, x_test=np.zeros((10, 32, 32), np.uint8)),
     "both splits need the same shape"),
    ("five channels", lambda a: bad(a, x_train=np.zeros((40, 8, 8, 5), np.uint8)),
     "with 1, 3 or 4 channels"),
    ("class names do not fit", lambda a: bad(a, class_names=np.array(["a", "b", "c"])),
     "3 class names for 10 distinct labels"),
    ("lengths differ", lambda a: bad(a, y_test=a["y_test"][:-1]), "y_test has shape"),
    ("pixels out of range", lambda a: bad(a, x_train=a["x_train"] * 300.0),
     "expected pixels: uint8 0-255"),
    # Issue 41: integers beyond 255 but not 16-bit pixels (uint16) have no agreed range.
    ("int64 beyond 255", lambda a: bad(a, x_train=a["x_train"].astype(np.int64) * 16),
     "(int64); expected pixels: uint8 0-255, uint16 16-bit pixels"),
    # Issue 20: standardized images (mean 0, std 1) were cast to uint8 and trained to chance.
    ("standardized", lambda a: bad(a, x_train=(a["x_train"] - 127.5) / 73.0), "not standardized"),
    ("NaN pixels", lambda a: bad(a, x_train=np.full((40, 28, 28), np.nan, np.float32)), "NaN"),
    ("boolean images", lambda a: bad(a, x_train=a["x_train"] > 100), "holds bool"),
    ("fractional labels", lambda a: bad(a, y_train=a["y_train"] + 0.5), "integer class labels"),
    ("missing keys", lambda a: {"x_train": a["x_train"], "y_train": a["y_train"]},
     "lacks x_test, y_test"),
]


@pytest.mark.parametrize(("name", "spoil", "why"), BAD_NPZ, ids=[n for n, _, _ in BAD_NPZ])
def test_bad_npz_gives_a_config_error(tmp_path, name, spoil, why):
    path = save_npz(tmp_path / "bad.npz", **spoil(numbered(40)))
    with pytest.raises(ConfigError) as caught:
        load_arrays(DataConfig(path=str(path)))
    assert caught.value.key == "data.path"
    assert why in caught.value.allowed


def test_missing_files_give_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder"):
        load_arrays(DataConfig(path=str(tmp_path / "nothing.npz")))
    folder = write_folder(tmp_path / "idx", numbered(40))
    (folder / IDX_NAMES["y_test"]).unlink()
    with pytest.raises(ConfigError, match="folder has no t10k-labels-idx1-ubyte"):
        load_arrays(DataConfig(path=str(folder)))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match="cannot read it as an .npz file"):
        load_arrays(DataConfig(path=str(tmp_path / "text.npz")))
    with pytest.raises(ConfigError, match="needs a local folder"):
        load_arrays(DataConfig(name="fashion_mnist", path=None))


def test_seeded_split_is_disjoint_sized_and_deterministic():
    arrays = numbered(1000)
    splits = make_splits(arrays, validation_fraction=0.2, seed=7)
    assert splits.sizes() == {"train": 800, "val": 200, "test": 250}
    train, val = indices(splits.x_train), indices(splits.x_val)
    assert not train & val
    assert train | val == set(range(1000))
    # Labels travel with their images.
    assert np.array_equal(splits.y_val, (np.array(sorted(val)) % 10).astype(np.uint8))

    again = make_splits(arrays, validation_fraction=0.2, seed=7)
    assert np.array_equal(again.x_val, splits.x_val)
    other = make_splits(arrays, validation_fraction=0.2, seed=8)
    assert indices(other.x_val) != val


def test_subsets_are_seeded_and_respect_the_limits():
    arrays = numbered(1000)
    splits = make_splits(arrays, 0.25, seed=0, max_train_samples=400, max_test_samples=100)
    assert splits.sizes() == {"train": 300, "val": 100, "test": 100}
    chosen = indices(splits.x_train) | indices(splits.x_val)
    assert len(chosen) == 400 and chosen != set(range(400))  # a random subset, not the head
    same = make_splits(arrays, 0.25, seed=0, max_train_samples=400, max_test_samples=100)
    assert np.array_equal(same.x_train, splits.x_train)


def test_load_splits_on_fashion_mnist(fashion_mnist_dir):
    cfg = DataConfig(name="fashion_mnist", path=str(fashion_mnist_dir),
                     max_train_samples=1000, max_test_samples=200)
    splits = load_splits(cfg, validation_fraction=0.1, seed=0)
    assert splits.sizes() == {"train": 900, "val": 100, "test": 200}
    assert splits.x_train.flags["C_CONTIGUOUS"] and splits.x_train.dtype == np.uint8


KERAS_CACHE_SCRIPT = """
import json, sys
from pathlib import Path
from sweeper.config import ConfigError, DataConfig
from sweeper.data import download_mnist, load_arrays

url, sha256, source = sys.argv[1], sys.argv[2], Path(sys.argv[3])
out = {}
first = load_arrays(DataConfig(name="mnist", path=None, url=url, sha256=sha256))
out["cached"] = str(download_mnist(url, sha256))
out["first_labels"] = first["y_train"].tolist()
source.rename(source.with_suffix(".gone"))  # a second load must come from the cache
second = load_arrays(DataConfig(name="mnist", path=None, url=url, sha256=sha256))
out["second_labels"] = second["y_train"].tolist()
source.with_suffix(".gone").rename(source)
try:
    download_mnist(url, "0" * 64)
except ConfigError as error:
    out["wrong_sha256"] = [error.key, str(error)]
print(json.dumps(out))
"""


def test_mnist_through_keras_downloader_and_cache(tmp_path):
    arrays = numbered(60)
    source = save_npz(tmp_path / "mnist.npz", **arrays)
    sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
    keras_home = tmp_path / "keras_home"
    env = {**os.environ, "KERAS_HOME": str(keras_home)}
    result = subprocess.run(
        [sys.executable, "-c", KERAS_CACHE_SCRIPT, source.as_uri(), sha256, str(source)],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])

    cached = keras_home / "datasets" / "mnist.npz"
    assert out["cached"] == str(cached)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == sha256
    assert out["first_labels"] == out["second_labels"] == arrays["y_train"].tolist()
    key, message = out["wrong_sha256"]
    assert key == "data.url"
    assert "hash" in message and "data.path" in message


def _resume_check(cfg, root, splits):
    from sweeper.sweep import check_data_unchanged, record_data

    record_data(root, splits)
    return lambda changed: check_data_unchanged(cfg, root, changed)


def test_a_resume_on_changed_data_is_refused_naming_what_changed(tmp_path, fashion_npz):
    """Issue 41: a sweep resumed on an npz overwritten since it began. Every way the loader's
    input can change reaches the fingerprint: the content alone (same shapes and classes),
    the classes, an image folder with a file added or removed. A subset or seed is part of
    the config check, not of the data's (the fingerprint is of the whole loaded arrays)."""
    from types import SimpleNamespace

    from sweeper.config import DataConfig
    from sweeper.data import load_splits

    arrays = dict(np.load(fashion_npz))
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    data = DataConfig(name="npz", path=str(path), max_train_samples=300)
    cfg = SimpleNamespace(data=data)
    check = _resume_check(cfg, tmp_path, load_splits(data, 0.1, 0))
    check(load_splits(data, 0.1, 0))  # the same file: no change
    check(load_splits(DataConfig(name="npz", path=str(path), max_train_samples=500), 0.1, 1))
    arrays["x_test"][0, 0, 0] ^= 1  # one pixel of the test split
    np.savez(path, **arrays)
    with pytest.raises(ConfigError) as raised:
        check(load_splits(data, 0.1, 0))
    assert str(raised.value) == (
        f"data.path='{path}' is invalid: the data changed since the sweep in {tmp_path} began "
        "(x_test content); put back the data it began with, or fresh=true for a new sweep on "
        "this data")


def test_an_image_folder_with_a_file_added_or_removed_is_other_data(tmp_path):
    from types import SimpleNamespace

    from data_helpers import write_image_folder

    from sweeper.config import DataConfig
    from sweeper.data import load_splits

    folder = write_image_folder(tmp_path / "images", per_class=12, broken=False)
    data = DataConfig(name="image_folder", path=str(folder), image_size=[28, 28])
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    check = _resume_check(SimpleNamespace(data=data), sweep, load_splits(data, 0.2, 0))
    image = folder / "tshirt" / "tshirt_0000.png"
    image.rename(folder / "tshirt" / "moved.png.bak")  # removed (not an image any more)
    with pytest.raises(ConfigError, match=r"\(x_train shape \[\d+, 28, 28, 3\] -> "):
        check(load_splits(data, 0.2, 0))
