"""Datasets -> uint8 image arrays, class names and seeded train/validation/test splits.

Nothing here needs TensorFlow: the driver loads the data once per sweep and
puts the arrays in Ray's object store, and trials read them zero-copy.
MNIST and CIFAR go through Keras' downloader and cache (``keras.utils.get_file``),
the path users get; that is the one place Keras is imported, lazily. Image
folders are decoded with Pillow (:mod:`sweeper.image_folder`).

The input shape and the classes come from the data: :class:`Splits` carries
them to the model, the trainer, the evaluation and the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import logging
import pickle
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from sweeper.compat import import_tensorflow
from sweeper.config import ConfigError, DataConfig
from sweeper.summary import counted

logger = logging.getLogger(__name__)

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Optional in an .npz: one name per class, in sorted label order.
NPZ_CLASS_NAMES = "class_names"
# Channels an image may have: grayscale, RGB, RGBA.
CHANNELS = (1, 3, 4)
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
    """uint8 images (N, H, W) or (N, H, W, C) and integer labels 0..K-1 (N,) for each split,
    with the names of the K classes (label i is ``class_names[i]``) and the dataset's name.

    The image shape and class count travel with the arrays: everything downstream (model,
    trainer, evaluation, report, export) reads them from here.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    name: str = ""
    # data_fingerprint of the arrays these splits were cut from ({}: not known).
    fingerprint: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One image's shape: (H, W) for images without a channel axis, else (H, W, C)."""
        return tuple(int(side) for side in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def describe(self) -> dict[str, Any]:
        """The data block of summary.json."""
        return {"name": self.name, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "class_names": list(self.class_names),
                "sizes": self.sizes()}


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
            arrays = {key: archive[key] for key in NPZ_KEYS}
            if NPZ_CLASS_NAMES in archive.files:
                arrays[NPZ_CLASS_NAMES] = archive[NPZ_CLASS_NAMES]
            return arrays
    except ConfigError:
        raise
    except READ_ERRORS as error:
        raise _unreadable(path, "an .npz file of x_train, y_train, x_test, y_test", error) from None


# Where Debian's dataset-fashion-mnist puts its files (conf/data/fashion_mnist.yaml's path).
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def download_mnist(url: str, sha256: str | None) -> Path:
    """Fetch mnist.npz through Keras' downloader; a cached copy with the right hash is reused.
    Offline, the error points to Debian's Fashion-MNIST where this machine has it."""
    import_tensorflow()  # before Keras imports it: TensorFlow starts without its noise
    from keras.utils import get_file

    try:
        return Path(get_file(fname="mnist.npz", origin=url, file_hash=sha256))
    except Exception as error:  # Keras wraps network errors in plain Exception
        local = (f", or use data=fashion_mnist (Debian's copy is in {DEBIAN_FASHION_MNIST})"
                 if DEBIAN_FASHION_MNIST.is_dir() else "")
        raise ConfigError("data.url", url, f"download failed ({error}); set data.path to a "
                          f"local mnist.npz{local}") from None


def to_pixels(images: np.ndarray, name: str, source: str) -> np.ndarray:
    """Images as uint8 pixels 0-255, converted only where the meaning is clear.

    uint8 is kept; other integers in 0-255 are cast; uint16 beyond 255 (16-bit pixels) is
    scaled by its range, ``x >> 8``, as 16-bit image files are (:mod:`sweeper.image_folder`);
    floats in [0, 1] (images already scaled, as many pipelines keep them) are multiplied by
    255 and rounded; floats in [0, 255] are rounded. Anything else is refused: a plain cast of
    [0, 1] floats made nearly every pixel 0 and trained to chance with exit 0 (issue 20). Each
    conversion but the cast is logged.

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
    if images.dtype == np.uint16 and high > 255:
        logger.warning("%s holds 16-bit pixels (uint16 up to %d): scaled to 0-255 by their "
                       "range (x >> 8), as 16-bit PNGs are", name, high)
        return (images >> 8).astype(np.uint8)
    if low < 0 or high > 255:
        raise ConfigError("data.path", source,
                          f"{name} values lie in [{low:g}, {high:g}] ({images.dtype}); expected "
                          "pixels: uint8 0-255, uint16 16-bit pixels, or floats in [0, 1] or "
                          "[0, 255] (not standardized values)")
    if kind == "f" and high <= 1.0:
        logger.warning("%s holds floats in [0, 1]: scaled by 255 to uint8 pixels", name)
        return np.rint(images * 255.0).astype(np.uint8)
    if kind == "f":
        logger.info("%s holds floats in [0, 255]: rounded to uint8 pixels", name)
        return np.rint(images).astype(np.uint8)
    return images.astype(np.uint8)


def image_shape_problem(shape: tuple[int, ...]) -> str | None:
    """What is wrong with an image array's ``shape`` (N, H, W) or (N, H, W, C); None if fine."""
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in CHANNELS):
        return "expected (N, height, width) or (N, height, width, channels) with 1, 3 or 4 channels"
    if min(shape[1:3]) < 1:
        return "images need at least one pixel"
    return None


def check_arrays(arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Refuse arrays that cannot be images and labels: shapes (N, H, W) or (N, H, W, C) with
    C in 1, 3, 4, the same image shape in train and test, one integer label per image
    ((N,) or Keras' (N, 1)), integers or strings; images become uint8 pixels
    (:func:`to_pixels`)."""
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        problem = image_shape_problem(images.shape)
        if problem:
            raise ConfigError("data.path", source,
                              f"x_{split} has shape {images.shape}; {problem}")
        if labels.ndim == 2 and labels.shape[1:] == (1,):
            labels = labels[:, 0]
        if labels.shape != (images.shape[0],):
            raise ConfigError("data.path", source,
                              f"y_{split} has shape {labels.shape}; expected ({images.shape[0]},)"
                              f": one label for each of the {images.shape[0]} images of x_{split}")
        if labels.dtype.kind in "US":  # class names as labels: named by themselves
            arrays[f"y_{split}"] = labels.astype(str)
        elif labels.dtype.kind in "iu" or (
                labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0)):
            arrays[f"y_{split}"] = labels.astype(np.int64)
        else:
            raise ConfigError("data.path", source, f"y_{split} holds {labels.dtype} values; "
                              "expected integer class labels or class names (strings)")
        arrays[f"x_{split}"] = to_pixels(images, f"x_{split}", source)
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ConfigError("data.path", source,
                          f"x_train holds images of shape {arrays['x_train'].shape[1:]} and x_test "
                          f"of {arrays['x_test'].shape[1:]}; both splits need the same shape")
    return arrays


def label_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer type that holds labels 0..num_classes-1 (uint8 for 256)."""
    return np.min_scalar_type(max(num_classes - 1, 0))


def encode_labels(arrays: dict[str, np.ndarray], source: str,
                  names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Labels mapped to 0..K-1 and the K class names, kept as ``arrays["class_names"]``.

    The distinct labels of both splits, sorted, become 0..K-1; their original values are the
    class names, unless ``names`` (or an npz's ``class_names`` array) names them: one name per
    distinct label in sorted order, or one per label value 0..len(names)-1 (labels then stay
    as they are, and a class absent from the data keeps its place).

    Raises:
        ConfigError: names that match neither way, or labels of both kinds (numbers in one
            split, strings in the other).
    """
    if names is None and NPZ_CLASS_NAMES in arrays:
        given = arrays[NPZ_CLASS_NAMES]
        if given.ndim != 1:
            raise ConfigError("data.path", source, f"{NPZ_CLASS_NAMES} has shape {given.shape}; "
                              "expected one name per class")
        names = [str(name) for name in given.tolist()]
    kinds = {arrays[split].dtype.kind in "US" for split in ("y_train", "y_test")}
    if len(kinds) > 1:
        raise ConfigError("data.path", source, "y_train and y_test hold labels of different "
                          f"kinds ({arrays['y_train'].dtype}, {arrays['y_test'].dtype}); give "
                          "both as integers or both as class names")
    values = np.unique(np.concatenate([arrays["y_train"], arrays["y_test"]]))
    numbers = values.dtype.kind in "iu"
    if (names is not None and numbers and values.size and values.min() >= 0
            and values.max() < len(names)):
        mapped = {split: arrays[split] for split in ("y_train", "y_test")}
    elif names is None or len(names) == len(values):
        mapped = {split: np.searchsorted(values, arrays[split]) for split in ("y_train", "y_test")}
        names = names if names is not None else [str(value) for value in values.tolist()]
    else:
        raise ConfigError("data.path", source,
                          f"{len(names)} class names for {len(values)} distinct labels "
                          f"({values[0]}..{values[-1]}); give one name per distinct label "
                          "(sorted) or one per label value 0..K-1")
    dtype = label_dtype(len(names))
    return {**arrays, **{key: value.astype(dtype) for key, value in mapped.items()},
            NPZ_CLASS_NAMES: np.array(names, dtype=str)}


def load_arrays(cfg: DataConfig) -> dict[str, np.ndarray]:
    """The train and test arrays named by ``cfg`` (a file, a folder or a download), labels
    0..K-1, and their class names as ``class_names``."""
    if cfg.name == "image_folder":
        from sweeper.image_folder import load_image_folder

        return load_image_folder(cfg)
    if cfg.name in CIFAR:
        source = Path(cfg.path).expanduser() if cfg.path else download_cifar(cfg)
        arrays = check_arrays(load_cifar(source, cfg.name), str(source))
        return encode_labels(arrays, str(source), arrays.pop("names", None))
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
    return encode_labels(check_arrays(arrays, str(path)), str(path))


# Keras' names for CIFAR (keras.datasets.cifar10/cifar100.load_data): its cache folder, the
# folder inside the archive, the batch files, the label key and the file of class names.
CIFAR = {
    "cifar10": {"cache": "cifar-10-batches-py-target", "folder": "cifar-10-batches-py",
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                "labels": "labels", "meta": "batches.meta", "names": "label_names"},
    "cifar100": {"cache": "cifar-100-python-target", "folder": "cifar-100-python",
                 "train": ["train"], "test": ["test"], "labels": "fine_labels",
                 "meta": "meta", "names": "fine_label_names"},
}
# The globals a CIFAR batch pickle needs (numpy arrays); any other is refused, so a tampered
# file cannot run code (Keras' RestrictedUnpickler allows the same set).
_CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
})


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def read_cifar_batch(stream: BinaryIO) -> dict[str, Any]:
    """One CIFAR python batch (a pickled dict with bytes keys), keys decoded."""
    batch = _CifarUnpickler(stream, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError("not a CIFAR batch (no dict inside)")
    return {key.decode() if isinstance(key, bytes) else key: value
            for key, value in batch.items()}


def _cifar_reader(source: Path, folder: str, stack: contextlib.ExitStack):
    """A function opening one file of the CIFAR folder inside ``source`` (None if absent): the
    archive Keras downloads (read without extracting), the extracted folder, or the folder
    above it. An archive stays open until ``stack`` closes."""
    if source.is_file():
        archive = stack.enter_context(tarfile.open(source, "r:*"))  # noqa: SIM115 (the stack closes it)
        members = {Path(member.name).name: member for member in archive.getmembers()
                   if member.isfile() and Path(member.name).parent.name == folder}

        def open_member(name: str) -> BinaryIO | None:
            member = members.get(name)
            return archive.extractfile(member) if member is not None else None

        return open_member
    inner = source / folder if (source / folder).is_dir() else source

    def open_file(name: str) -> BinaryIO | None:
        path = inner / name
        return path.open("rb") if path.is_file() else None

    return open_file


def load_cifar(source: Path, name: str) -> dict[str, Any]:
    """CIFAR-10 or CIFAR-100 (fine labels) as keras.datasets' load_data returns it: uint8
    images (N, 32, 32, 3) and labels, plus the class names of its meta file (``names``,
    None without one)."""
    layout = CIFAR[name]
    if not source.exists():
        raise ConfigError("data.path", str(source), f"no such file or folder; give the {name} "
                          f"archive Keras downloads or its extracted {layout['folder']}/ folder")
    arrays: dict[str, Any] = {"names": None}
    try:
        with contextlib.ExitStack() as stack:
            open_file = _cifar_reader(source, layout["folder"], stack)
            for split in ("train", "test"):
                images, labels = [], []
                for part in layout[split]:
                    stream = open_file(part)
                    if stream is None:
                        raise ConfigError("data.path", str(source),
                                          f"no {layout['folder']}/{part} inside; expected "
                                          f"Keras' {name} archive or its extracted folder")
                    with stream:
                        batch = read_cifar_batch(stream)
                    data = np.asarray(batch["data"], dtype=np.uint8)
                    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                    labels.append(np.asarray(batch[layout["labels"]]))
                arrays[f"x_{split}"] = np.ascontiguousarray(np.concatenate(images))
                arrays[f"y_{split}"] = np.concatenate(labels)
            meta = open_file(layout["meta"])
            if meta is not None:
                with meta:
                    names = read_cifar_batch(meta).get(layout["names"])
                if names:
                    arrays["names"] = [n.decode() if isinstance(n, bytes) else str(n)
                                       for n in names]
    except ConfigError:
        raise
    except (*READ_ERRORS, tarfile.TarError, pickle.UnpicklingError, KeyError) as error:
        raise _unreadable(source, f"Keras' {name} archive or folder", error) from None
    return arrays


def download_cifar(cfg: DataConfig) -> Path:
    """The extracted CIFAR folder in Keras' cache, fetched by Keras' downloader exactly as
    ``keras.datasets.cifar10.load_data()`` fetches it (so either one reuses the other's copy)."""
    import_tensorflow()  # before Keras imports it: TensorFlow starts without its noise
    from keras.utils import get_file

    try:
        return Path(get_file(fname=CIFAR[cfg.name]["cache"], origin=cfg.url, extract=True,
                             file_hash=cfg.sha256))
    except Exception as error:  # Keras wraps network errors in plain Exception
        raise ConfigError("data.url", cfg.url,
                          f"download failed ({error}); set data.path to a local copy of the "
                          f"{cfg.name} archive or its extracted folder") from None


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
                 batch_size: int | None = None) -> tuple[int, int] | None:
    """Cheaply check that ``data.path`` holds images and labels, reading headers only, and
    (given ``validation_fraction``) that no split of it would be empty.

    Runs before anything starts, so a wrong path fails in a second, not after Ray is up.
    The full check (labels, values, decoding) happens when the data is loaded.

    Returns:
        The images' (height, width) as the model gets them: ``data.image_size`` when set,
        else the headers' where they tell it, else None.
    """
    if cfg.name == "image_folder":
        from sweeper.image_folder import find_layout

        find_layout(Path(cfg.path or "").expanduser())
        return _after_resize(cfg, None)
    if cfg.name in CIFAR:
        if cfg.path is not None and not Path(cfg.path).expanduser().exists():
            raise ConfigError("data.path", cfg.path, f"no such file or folder; give the "
                              f"{cfg.name} archive Keras downloads or its extracted folder")
        return _after_resize(cfg, (32, 32))
    if cfg.path is None:
        return _after_resize(cfg, None)
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
        problem = image_shape_problem(images)
        if problem:
            raise ConfigError("data.path", str(path), f"x_{split} has shape {images}; {problem}")
        if labels not in (images[:1], (images[0], 1)):
            raise ConfigError("data.path", str(path),
                              f"y_{split} has shape {labels}; expected ({images[0]},): one "
                              f"label for each of the {images[0]} images of x_{split}")
    if validation_fraction is not None:
        sizes = split_sizes(shapes["x_train"][0], shapes["x_test"][0], validation_fraction,
                            cfg.max_train_samples, cfg.max_test_samples)
        check_split_sizes(sizes, validation_fraction, batch_size, source=str(path))
    return _after_resize(cfg, (shapes["x_train"][1], shapes["x_train"][2]))


def _after_resize(cfg: DataConfig, size: tuple[int, int] | None) -> tuple[int, int] | None:
    """The (height, width) the model gets: ``data.image_size`` when set, else ``size``."""
    return (int(cfg.image_size[0]), int(cfg.image_size[1])) if cfg.image_size else size


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
                max_test_samples: int | None = None, source: str | None = None,
                name: str = "") -> Splits:
    """Split training data into train/validation with a fixed seed; the test split stays apart.

    Class names come from ``arrays["class_names"]`` (:func:`encode_labels`); without it the
    labels are taken as 0..K-1 and named by their values.

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
        raise ConfigError("data.path", source, f"the training split holds "
                          f"{counted(len(classes), 'class', 'classes')} ({classes.tolist()}); "
                          "a classifier needs two or more")
    names = arrays.get(NPZ_CLASS_NAMES)
    if names is None:  # labels already 0..K-1: named by their values
        top = max(int(arrays["y_train"].max(initial=0)), int(arrays["y_test"].max(initial=0)))
        names = [str(label) for label in range(top + 1)]
    return Splits(
        x_train=np.ascontiguousarray(x[train_idx]), y_train=np.ascontiguousarray(y[train_idx]),
        x_val=np.ascontiguousarray(x[val_idx]), y_val=np.ascontiguousarray(y[val_idx]),
        x_test=np.ascontiguousarray(x_test), y_test=np.ascontiguousarray(y_test),
        class_names=tuple(str(name) for name in names), name=name,
    )


# The published class names of datasets whose files hold labels only (Zalando's
# Fashion-MNIST README; MNIST's digits name themselves).
DATASET_CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}


def data_fingerprint(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """What identifies a loaded dataset: its class names and, for each of the four arrays
    (``x_train``, ``y_train``, ``x_test``, ``y_test``, before any subset or split), its shape,
    dtype and a BLAKE2b hash of its bytes; ``digest`` hashes all of that in one string.

    Cheap beside loading: 0.05-0.06 s for Fashion-MNIST's 70 000 images (55 MB) on one core.
    """
    names = arrays.get(NPZ_CLASS_NAMES)
    parts: dict[str, Any] = {"class_names": None if names is None else [str(n) for n in names]}
    for key in NPZ_KEYS:
        array = np.ascontiguousarray(arrays[key])
        parts[key] = {"shape": list(array.shape), "dtype": str(array.dtype),
                      "blake2b": hashlib.blake2b(memoryview(array).cast("B"),
                                                 digest_size=16).hexdigest()}
    summary = repr(sorted(parts.items())).encode()
    return {**parts, "digest": hashlib.blake2b(summary, digest_size=16).hexdigest()}


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two :func:`data_fingerprint` results, in words (empty: the same
    data): ``class names 3 -> 4 (...)``, ``x_train shape [2000, 28, 28] -> [...]``,
    ``y_test content``."""
    changes = []
    before, after = saved.get("class_names"), current.get("class_names")
    if before != after:
        changes.append(f"class names {len(before or ())} -> {len(after or ())} "
                       f"({', '.join(after or ())})")
    for key in NPZ_KEYS:
        old, new = saved.get(key) or {}, current.get(key) or {}
        for what in ("shape", "dtype"):
            if old.get(what) != new.get(what):
                changes.append(f"{key} {what} {old.get(what)} -> {new.get(what)}")
        if old.get("shape") == new.get("shape") and old.get("blake2b") != new.get("blake2b"):
            changes.append(f"{key} content")
    return changes


def resized(splits: Splits, cfg: DataConfig) -> Splits:
    """``splits`` with every split's images resized to ``data.image_size`` (when set and not
    already their size) by the rule image folders decode with
    (:func:`sweeper.image_folder.resize_images`: Pillow, bilinear, uint8 and the channel
    axis kept): once, on the driver, after the subsets are drawn (only the images used are
    resized), before anything is sent to a trial."""
    if not cfg.image_size or splits.x_train.shape[1:3] == tuple(cfg.image_size):
        return splits
    from sweeper.image_folder import resize_images

    before = splits.x_train.shape[1:3]
    splits = dataclasses.replace(splits, **{key: resize_images(getattr(splits, key),
                                                               cfg.image_size)
                                            for key in ("x_train", "x_val", "x_test")})
    logger.info("Resized the %s images from %dx%d to %dx%d (data.image_size, bilinear)",
                cfg.name, *before, *splits.x_train.shape[1:3])
    return splits


def load_splits(cfg: DataConfig, validation_fraction: float, seed: int) -> Splits:
    """Load the dataset ``cfg`` names and split it; raises ConfigError on a bad source."""
    arrays = load_arrays(cfg)
    known = DATASET_CLASS_NAMES.get(cfg.name)
    numbered = [str(label) for label in range(len(known or ()))]
    named = arrays.get(NPZ_CLASS_NAMES)
    top = int(max(arrays["y_train"].max(initial=0), arrays["y_test"].max(initial=0)))
    if known and top == len(known) - 1 and (named is None or
                                            [str(n) for n in named] == numbered):
        arrays = {**arrays, NPZ_CLASS_NAMES: np.array(known)}
    splits = make_splits(arrays, validation_fraction, seed, cfg.max_train_samples,
                         cfg.max_test_samples, source=cfg.path or cfg.url, name=cfg.name)
    splits = dataclasses.replace(splits, fingerprint=data_fingerprint(arrays))
    splits = resized(splits, cfg)
    logger.info("Loaded %s: %s images of shape %s, %d classes", cfg.name, splits.sizes(),
                splits.input_shape, splits.num_classes)
    return splits
