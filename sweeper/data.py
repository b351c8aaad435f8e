"""Datasets -> uint8 image arrays and seeded train/validation/test splits.

Nothing here needs TensorFlow: the driver loads the data once per sweep and
puts the arrays in Ray's object store, and trials read them zero-copy.
MNIST goes through Keras' downloader and cache (``keras.utils.get_file``), the
path users get; that is the one place Keras is imported, lazily.
"""

from __future__ import annotations

import gzip
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sweeper.config import ConfigError, DataConfig

logger = logging.getLogger(__name__)

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Base names of the four IDX files; each may also end in .gz.
IDX_FILES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
IDX_DTYPES = {0x08: np.uint8}


@dataclass(frozen=True)
class Splits:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 for each split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        raw = stream.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in IDX_DTYPES:
        raise ValueError(f"{path} holds IDX type 0x{dtype_code:02x}; only unsigned bytes are MNIST")
    header_end = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=IDX_DTYPES[dtype_code], offset=header_end)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def _find_idx_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def idx_files(folder: Path) -> dict[str, Path]:
    """The four IDX files of an MNIST-style folder, by array name; ConfigError if one is missing."""
    files = {}
    for key, names in IDX_FILES.items():
        found = _find_idx_file(folder, names)
        if found is None:
            raise ConfigError("data.path", str(folder), f"folder has no {names[0]}[.gz]; "
                              "expected the four MNIST IDX files")
        files[key] = found
    return files


# What reading a file the user named can raise besides our own ConfigError: a missing or
# unreadable file, a file of another kind (numpy's and zipfile's own errors), a cut-off one.
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


def _unreadable(path: Path, what: str, error: BaseException) -> ConfigError:
    """One line for a file that cannot be read as ``what``, naming the file's own problem."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError("data.path", str(path), f"cannot read it as {what} ({detail})")


def load_idx_folder(folder: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for key, found in idx_files(folder).items():
        try:
            arrays[key] = read_idx(found)
        except READ_ERRORS as error:
            raise _unreadable(folder, f"MNIST IDX files: {found.name}", error) from None
    return arrays


def load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in NPZ_KEYS if key not in archive.files]
            if missing:
                raise ConfigError("data.path", str(path), f"npz lacks {', '.join(missing)}; "
                                  f"expected keys {', '.join(NPZ_KEYS)}")
            return {key: archive[key] for key in NPZ_KEYS}
    except ConfigError:
        raise
    except READ_ERRORS as error:
        raise _unreadable(path, "an .npz file of x_train, y_train, x_test, y_test", error) from None


def download_mnist(url: str, sha256: str | None) -> Path:
    """Fetch mnist.npz through Keras' downloader; a cached copy with the right hash is reused."""
    from keras.utils import get_file

    try:
        return Path(get_file(fname="mnist.npz", origin=url, file_hash=sha256))
    except Exception as error:  # Keras wraps network errors in plain Exception
        raise ConfigError("data.url", url,
                          f"download failed ({error}); set data.path to a local mnist.npz"
                          ) from None


def to_pixels(images: np.ndarray, name: str, source: str) -> np.ndarray:
    """Images as uint8 pixels 0-255, converted only where the meaning is clear.

    uint8 is kept; other integers in 0-255 are cast; floats in [0, 1] (images already scaled,
    as many pipelines keep them) are multiplied by 255 and rounded; floats in [0, 255] are
    rounded. Anything else is refused: a plain cast of [0, 1] floats made nearly every pixel 0
    and trained to chance with exit 0 (issue 20). Each float conversion is logged.

    Raises:
        ConfigError: booleans or other types, values outside 0-255, or NaN/infinite values.
    """
    if images.dtype == np.uint8:
        return images
    kind = images.dtype.kind
    if kind not in "iuf":
        raise ConfigError("data.path", source, f"{name} holds {images.dtype} values; expected "
                          "pixels: uint8 0-255, or floats in [0, 1] or [0, 255]")
    if kind == "f" and images.size and not np.isfinite(images).all():
        raise ConfigError("data.path", source, f"{name} holds NaN or infinite values")
    low, high = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
    if low < 0 or high > 255:
        raise ConfigError("data.path", source,
                          f"{name} values lie in [{low:g}, {high:g}]; expected pixels: uint8 "
                          "0-255, or floats in [0, 1] or [0, 255] (not standardized values)")
    if kind == "f" and high <= 1.0:
        logger.warning("%s holds floats in [0, 1]: scaled by 255 to uint8 pixels", name)
        return np.rint(images * 255.0).astype(np.uint8)
    if kind == "f":
        logger.info("%s holds floats in [0, 255]: rounded to uint8 pixels", name)
        return np.rint(images).astype(np.uint8)
    return images.astype(np.uint8)


def check_arrays(arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Refuse anything that is not MNIST-shaped: 28x28 images, labels 0-9, matching lengths;
    images become uint8 pixels (:func:`to_pixels`)."""
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
            raise ConfigError("data.path", source,
                              f"x_{split} has shape {images.shape}; expected (N, 28, 28)")
        if labels.shape != (images.shape[0],):
            raise ConfigError("data.path", source,
                              f"y_{split} has shape {labels.shape}; expected ({images.shape[0]},)")
        if labels.dtype.kind not in "iu" and not (
                labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0)):
            raise ConfigError("data.path", source, f"y_{split} holds {labels.dtype} values; "
                              "expected integer class labels")
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ConfigError("data.path", source, f"y_{split} has labels outside 0-9")
        arrays[f"x_{split}"] = to_pixels(images, f"x_{split}", source)
        arrays[f"y_{split}"] = labels.astype(np.uint8)
    return arrays


def load_arrays(cfg: DataConfig) -> dict[str, np.ndarray]:
    """The raw train and test arrays named by ``cfg`` (a file, a folder or a download)."""
    if cfg.path is None:
        if cfg.name != "mnist":
            raise ConfigError("data.path", None, f"{cfg.name} needs a local folder of IDX files")
        path = download_mnist(cfg.url or "", cfg.sha256)
    else:
        path = Path(cfg.path).expanduser()
    if path.is_dir():
        arrays = load_idx_folder(path)
    elif path.is_file():
        arrays = load_npz(path)
    else:
        raise ConfigError("data.path", str(path),
                          "no such file or folder; give an .npz or a folder of IDX files")
    return check_arrays(arrays, str(path))


def _idx_header(path: Path) -> tuple[int, ...]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        head = stream.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES:
            raise ValueError("not an IDX file of unsigned bytes")
        dims = stream.read(4 * head[3])
    return tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(head[3]))


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    import zipfile

    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for key in NPZ_KEYS:
            if f"{key}.npy" not in archive.namelist():
                raise ConfigError("data.path", str(path),
                                  f"npz lacks {key}; expected keys {', '.join(NPZ_KEYS)}")
            with archive.open(f"{key}.npy") as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, _ = read_header(member)
            shapes[key] = shape
    return shapes


def check_source(cfg: DataConfig, validation_fraction: float | None = None,
                 batch_size: int | None = None) -> None:
    """Cheaply check that ``data.path`` holds MNIST-shaped data, reading headers only, and
    (given ``validation_fraction``) that no split of it would be empty.

    Runs before anything starts, so a wrong path fails in a second, not after Ray is up.
    The full check (labels, values) happens when the arrays are loaded.
    """
    if cfg.path is None:
        return
    path = Path(cfg.path).expanduser()
    try:
        if path.is_dir():
            shapes = {key: _idx_header(found) for key, found in idx_files(path).items()}
        elif path.is_file():
            shapes = _npz_shapes(path)
        else:
            raise ConfigError("data.path", str(path),
                              "no such file or folder; give an .npz or a folder of IDX files")
    except ConfigError:
        raise  # already one line naming the key
    except READ_ERRORS as error:
        kind = "MNIST IDX files" if path.is_dir() else "an .npz file"
        raise _unreadable(path, kind, error) from None
    for split in ("train", "test"):
        images, labels = shapes[f"x_{split}"], shapes[f"y_{split}"]
        if len(images) != 3 or images[1:] != IMAGE_SHAPE:
            raise ConfigError("data.path", str(path),
                              f"x_{split} has shape {images}; expected (N, 28, 28)")
        if labels != images[:1]:
            raise ConfigError("data.path", str(path),
                              f"y_{split} has shape {labels}; expected ({images[0]},)")
    if validation_fraction is not None:
        sizes = split_sizes(shapes["x_train"][0], shapes["x_test"][0], validation_fraction,
                            cfg.max_train_samples, cfg.max_test_samples)
        check_split_sizes(sizes, validation_fraction, batch_size, source=str(path))


def _subset(x: np.ndarray, y: np.ndarray, limit: int | None, rng: np.random.Generator):
    if limit is None or limit >= len(y):
        return x, y
    keep = np.sort(rng.permutation(len(y))[:limit])
    return x[keep], y[keep]


def split_sizes(num_train: int, num_test: int, validation_fraction: float,
                max_train_samples: int | None = None,
                max_test_samples: int | None = None) -> dict[str, int]:
    """Images in each split made from ``num_train`` training and ``num_test`` test images."""
    pool = num_train if max_train_samples is None else min(num_train, max_train_samples)
    num_val = max(1, round(pool * validation_fraction)) if pool else 0
    test = num_test if max_test_samples is None else min(num_test, max_test_samples)
    return {"train": pool - num_val, "val": num_val, "test": test}


def check_split_sizes(sizes: dict[str, int], validation_fraction: float,
                      batch_size: int | None = None, source: str | None = None) -> None:
    """Refuse splits a sweep cannot train or score on; warn where a batch exceeds the training
    split (each epoch is then one smaller batch).

    Raises:
        ConfigError: no training, validation or test image.
    """
    if sizes["train"] < 1 or sizes["val"] < 1:
        empty = "training" if sizes["train"] < 1 else "validation"
        pool = sizes["train"] + sizes["val"]
        raise ConfigError("train.validation_fraction", validation_fraction,
                          f"{pool} training images split into {sizes['train']} for training "
                          f"and {sizes['val']} for validation; the {empty} split is empty "
                          "(lower train.validation_fraction or raise data.max_train_samples)")
    if sizes["test"] < 1:
        raise ConfigError("data.path", source, "the test split is empty; the dataset needs test "
                          "images (x_test, y_test)")
    if batch_size is not None and batch_size > sizes["train"]:
        logger.warning("train.batch_size=%d is larger than the training split (%d images): "
                       "every epoch is one batch of %d", batch_size, sizes["train"],
                       sizes["train"])


def make_splits(arrays: dict[str, np.ndarray], validation_fraction: float, seed: int,
                max_train_samples: int | None = None,
                max_test_samples: int | None = None, source: str | None = None) -> Splits:
    """Split training data into train/validation with a fixed seed; the test split stays apart.

    Raises:
        ConfigError: a split would be empty, or the training split holds fewer than two
            classes (nothing to classify).
    """
    rng = np.random.default_rng(seed)
    x, y = _subset(arrays["x_train"], arrays["y_train"], max_train_samples, rng)
    x_test, y_test = _subset(arrays["x_test"], arrays["y_test"], max_test_samples, rng)
    sizes = split_sizes(len(y), len(y_test), validation_fraction)
    check_split_sizes(sizes, validation_fraction, source=source)
    order = rng.permutation(len(y))
    val_idx, train_idx = np.sort(order[:sizes["val"]]), np.sort(order[sizes["val"]:])
    classes = np.unique(y[train_idx])
    if len(classes) < 2:
        raise ConfigError("data.path", source, f"the training split holds {len(classes)} class "
                          f"({classes.tolist()}); a classifier needs two or more")
    return Splits(
        x_train=np.ascontiguousarray(x[train_idx]), y_train=np.ascontiguousarray(y[train_idx]),
        x_val=np.ascontiguousarray(x[val_idx]), y_val=np.ascontiguousarray(y[val_idx]),
        x_test=np.ascontiguousarray(x_test), y_test=np.ascontiguousarray(y_test),
    )


def load_splits(cfg: DataConfig, validation_fraction: float, seed: int) -> Splits:
    """Load the dataset ``cfg`` names and split it; raises ConfigError on a bad source."""
    arrays = load_arrays(cfg)
    splits = make_splits(arrays, validation_fraction, seed, cfg.max_train_samples,
                         cfg.max_test_samples, source=cfg.path or cfg.url)
    logger.info("Loaded %s: %s", cfg.name, splits.sizes())
    return splits
