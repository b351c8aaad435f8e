"""Datasets -> uint8 image arrays and seeded train/validation/test splits.

Nothing here needs TensorFlow: the driver loads the data once per sweep and
puts the arrays in Ray's object store, and trials read them zero-copy.
MNIST goes through Keras' downloader and cache (``keras.utils.get_file``), the
path users get; that is the one place Keras is imported, lazily.
"""

from __future__ import annotations

import gzip
import logging
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


def load_idx_folder(folder: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for key, found in idx_files(folder).items():
        try:
            arrays[key] = read_idx(found)
        except (OSError, ValueError) as error:
            raise ConfigError("data.path", str(folder),
                              f"cannot read {found.name}: {error}") from None
    return arrays


def load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in NPZ_KEYS if key not in archive.files]
            if missing:
                raise ConfigError("data.path", str(path), f"npz lacks {', '.join(missing)}; "
                                  f"expected keys {', '.join(NPZ_KEYS)}")
            return {key: archive[key] for key in NPZ_KEYS}
    except (OSError, ValueError) as error:
        raise ConfigError("data.path", str(path), f"not a readable .npz file ({error})") from None


def download_mnist(url: str, sha256: str | None) -> Path:
    """Fetch mnist.npz through Keras' downloader; a cached copy with the right hash is reused."""
    from keras.utils import get_file

    try:
        return Path(get_file(fname="mnist.npz", origin=url, file_hash=sha256))
    except Exception as error:  # Keras wraps network errors in plain Exception
        raise ConfigError("data.url", url,
                          f"download failed ({error}); set data.path to a local mnist.npz"
                          ) from None


def check_arrays(arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Refuse anything that is not MNIST-shaped: 28x28 images, labels 0-9, matching lengths."""
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
            raise ConfigError("data.path", source,
                              f"x_{split} has shape {images.shape}; expected (N, 28, 28)")
        if labels.shape != (images.shape[0],):
            raise ConfigError("data.path", source,
                              f"y_{split} has shape {labels.shape}; expected ({images.shape[0]},)")
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ConfigError("data.path", source, f"y_{split} has labels outside 0-9")
        if images.dtype != np.uint8:
            if images.min() < 0 or images.max() > 255:
                raise ConfigError("data.path", source,
                                  f"x_{split} values lie outside 0-255; expected raw pixels")
            arrays[f"x_{split}"] = images.astype(np.uint8)
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


def check_source(cfg: DataConfig) -> None:
    """Cheaply check that ``data.path`` holds MNIST-shaped data, reading headers only.

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
    except (OSError, ValueError, EOFError) as error:
        raise ConfigError("data.path", str(path), f"cannot read it as MNIST ({error})") from None
    for split in ("train", "test"):
        images, labels = shapes[f"x_{split}"], shapes[f"y_{split}"]
        if len(images) != 3 or images[1:] != IMAGE_SHAPE:
            raise ConfigError("data.path", str(path),
                              f"x_{split} has shape {images}; expected (N, 28, 28)")
        if labels != images[:1]:
            raise ConfigError("data.path", str(path),
                              f"y_{split} has shape {labels}; expected ({images[0]},)")


def _subset(x: np.ndarray, y: np.ndarray, limit: int | None, rng: np.random.Generator):
    if limit is None or limit >= len(y):
        return x, y
    keep = np.sort(rng.permutation(len(y))[:limit])
    return x[keep], y[keep]


def make_splits(arrays: dict[str, np.ndarray], validation_fraction: float, seed: int,
                max_train_samples: int | None = None,
                max_test_samples: int | None = None) -> Splits:
    """Split training data into train/validation with a fixed seed; the test split stays apart."""
    rng = np.random.default_rng(seed)
    x, y = _subset(arrays["x_train"], arrays["y_train"], max_train_samples, rng)
    x_test, y_test = _subset(arrays["x_test"], arrays["y_test"], max_test_samples, rng)
    order = rng.permutation(len(y))
    num_val = max(1, round(len(y) * validation_fraction))
    val_idx, train_idx = np.sort(order[:num_val]), np.sort(order[num_val:])
    return Splits(
        x_train=np.ascontiguousarray(x[train_idx]), y_train=np.ascontiguousarray(y[train_idx]),
        x_val=np.ascontiguousarray(x[val_idx]), y_val=np.ascontiguousarray(y[val_idx]),
        x_test=np.ascontiguousarray(x_test), y_test=np.ascontiguousarray(y_test),
    )


def load_splits(cfg: DataConfig, validation_fraction: float, seed: int) -> Splits:
    """Load the dataset ``cfg`` names and split it; raises ConfigError on a bad source."""
    arrays = load_arrays(cfg)
    splits = make_splits(arrays, validation_fraction, seed,
                         cfg.max_train_samples, cfg.max_test_samples)
    logger.info("Loaded %s: %s", cfg.name, splits.sizes())
    return splits
