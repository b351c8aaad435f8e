"""Folders of image files -> uint8 arrays, labels and class names, decoded with Pillow.

Two layouts, the ones Keras' ``image_dataset_from_directory`` and torchvision's
``ImageFolder`` read::

    DIR/<class>/*.png            the test split is held out per class (data.test_fraction)
    DIR/train/<class>/*.png      with DIR/test/<class>/... (or DIR/val/<class>/...)
                                 as the test split

Class names are the class folders' names, sorted. Images are read in two passes
over a thread pool the size of the machine's cores (Pillow decodes and resizes
without holding the GIL): headers first (sizes and modes, to settle the common
size and colour mode before any pixel is decoded), then the pixels, written
straight into one preallocated array. :func:`decode_image` is the decoding a
trained model expects, for a user's own files too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from sweeper.config import ConfigError, DataConfig

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# data.color_mode -> Pillow's mode; images stored in any other mode than these count as colour.
PILLOW_MODES = {"rgb": "RGB", "grayscale": "L"}
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
SPLIT_FOLDERS = ("train", "test", "val")  # DIR/train + DIR/test, or DIR/val without test/
# Names listed in the warning about files that could not be decoded.
SHOWN_SKIPPED = 5

T = TypeVar("T")


@dataclass(frozen=True)
class FolderLayout:
    """The image files of a folder by class; ``test`` is None when the test split is to be
    held out of ``train`` per class."""

    root: Path
    class_names: tuple[str, ...]
    train: dict[str, list[Path]]
    test: dict[str, list[Path]] | None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _class_files(folder: Path, source: Path) -> dict[str, list[Path]]:
    """Image files below each class folder of ``folder`` (sub-folders included), sorted."""
    classes = sorted(entry for entry in folder.iterdir()
                     if entry.is_dir() and not entry.name.startswith("."))
    files = {entry.name: sorted(path for path in entry.rglob("*")
                                if path.is_file() and _is_image(path)) for entry in classes}
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        raise ConfigError("data.path", str(source),
                          f"class folder {folder / empty[0]} holds no images "
                          f"({', '.join(IMAGE_EXTENSIONS)})"
                          + (f"; so do {len(empty) - 1} more" if len(empty) > 1 else ""))
    return files


def find_layout(root: Path) -> FolderLayout:
    """Which layout ``root`` has, its classes and their image files; decodes nothing.

    Raises:
        ConfigError: no such folder, no class folders, a class folder without images, fewer
            than two classes, or test classes the training data does not have.
    """
    if not root.is_dir():
        raise ConfigError("data.path", str(root), "no such folder; data=image_folder reads a "
                          "folder of class folders (DIR/<class>/*.png or DIR/train/<class>/...)")
    if (root / "train").is_dir():
        held_out = next((root / name for name in SPLIT_FOLDERS[1:] if (root / name).is_dir()),
                        None)
        if held_out is None:
            raise ConfigError("data.path", str(root), "has train/ but neither test/ nor val/ "
                              "beside it for the test split")
        train, test = _class_files(root / "train", root), _class_files(held_out, root)
        unknown = sorted(set(test) - set(train))
        if unknown:
            raise ConfigError("data.path", str(root),
                              f"{held_out.name}/ has classes train/ lacks: {', '.join(unknown)}")
    else:
        train, test = _class_files(root, root), None
    if len(train) < 2:
        where = root / "train" if test is not None else root
        found = f"class folder ({next(iter(train))})" if train else "class folders"
        raise ConfigError("data.path", str(root),
                          f"{where} holds {len(train)} {found}; a classifier needs two or more "
                          "(DIR/<class>/*.png)")
    return FolderLayout(root, tuple(train), train, test)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _in_pool(work: Callable[[T], object], items: Iterable[T], workers: int) -> list:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(work, items))


def read_header(path: Path) -> tuple[tuple[int, int], str] | None:
    """An image file's (height, width) and Pillow mode from its header; None if Pillow
    cannot identify it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return (image.height, image.width), image.mode
    except (OSError, ValueError, SyntaxError):  # PIL.UnidentifiedImageError is an OSError
        return None


def decode_image(path: str | Path, color_mode: str,
                 image_size: tuple[int, int] | list[int] | None = None) -> np.ndarray:
    """One image file as the model was trained on it: uint8 (H, W, C), C=3 for ``rgb`` and 1
    for ``grayscale``, resized (bilinear) to ``image_size`` = (height, width) if given.

    Example: ``model.predict(decode_image("cat.png", "rgb", (64, 64))[None])`` with the
    ``color_mode`` and ``input_shape`` of the sweep's best_model.json.
    """
    from PIL import Image

    with Image.open(path) as image:
        converted = image.convert(PILLOW_MODES[color_mode])
    if image_size is not None and converted.size != (image_size[1], image_size[0]):
        converted = converted.resize((image_size[1], image_size[0]),
                                     Image.Resampling.BILINEAR)
    pixels = np.asarray(converted, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _target_size(headers: list[tuple[tuple[int, int], str]], cfg: DataConfig,
                 root: Path) -> tuple[int, int]:
    if cfg.image_size:
        return int(cfg.image_size[0]), int(cfg.image_size[1])
    sizes = sorted({size for size, _ in headers})
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
        raise ConfigError("data.image_size", None,
                          f"the images in {root} have {len(sizes)} different sizes ({shown}); "
                          "set data.image_size=[height,width] to resize them all")
    return sizes[0]


def load_image_folder(cfg: DataConfig, workers: int | None = None) -> dict[str, np.ndarray]:
    """The train and test arrays of the image folder ``cfg.path``, labels 0..K-1 in sorted
    class-folder order and the class names as ``class_names``.

    Files Pillow cannot decode are skipped, with one warning naming them and their count.

    Args:
        cfg: ``path``, ``image_size``, ``color_mode``, ``test_fraction`` and ``seed``.
        workers: Decoding threads; None uses every core this process may run on.

    Raises:
        ConfigError: a layout :func:`find_layout` refuses, images of several sizes without
            ``data.image_size``, or a class left without an image that can be decoded.
    """
    root = Path(cfg.path or "").expanduser()
    layout = find_layout(root)
    workers = workers or _cpu_count()
    # Every file once, in a fixed order: class by class, train folders before test folders.
    files: list[Path] = []
    labels: list[int] = []
    test_files = layout.test or {}
    for split in (layout.train, test_files):
        for name, paths in split.items():
            files += paths
            labels += [layout.class_names.index(name)] * len(paths)
    in_test = np.zeros(len(files), dtype=bool)
    in_test[len(files) - sum(len(paths) for paths in test_files.values()):] = True
    headers = _in_pool(read_header, files, workers)
    readable = np.array([header is not None for header in headers], dtype=bool)
    found = [header for header in headers if header is not None]
    if not found:
        raise ConfigError("data.path", str(root), f"none of its {len(files)} image files "
                          "can be decoded")
    height, width = _target_size(found, cfg, root)
    color_mode = cfg.color_mode or (
        "rgb" if any(mode not in GRAY_MODES for _, mode in found) else "grayscale")
    channels = 3 if color_mode == "rgb" else 1
    images = np.zeros((len(files), height, width, channels), dtype=np.uint8)

    def decode_into(index: int) -> bool:
        if not readable[index]:
            return False
        try:
            images[index] = decode_image(files[index], color_mode, (height, width))
        except (OSError, ValueError, SyntaxError):
            return False
        return True

    decoded = np.array(_in_pool(decode_into, range(len(files)), workers), dtype=bool)
    labels_array = np.array(labels, dtype=np.int64)
    if not decoded.all():
        skipped = [files[i] for i in np.flatnonzero(~decoded)]
        shown = ", ".join(str(path) for path in skipped[:SHOWN_SKIPPED])
        logger.warning("Skipped %d of %d image files that could not be decoded: %s%s",
                       len(skipped), len(files), shown,
                       " ..." if len(skipped) > SHOWN_SKIPPED else "")
        images, labels_array, in_test = images[decoded], labels_array[decoded], in_test[decoded]
    counts = np.bincount(labels_array[~in_test], minlength=len(layout.class_names))
    if not counts.all():
        empty = layout.class_names[int(np.flatnonzero(counts == 0)[0])]
        raise ConfigError("data.path", str(root), f"class {empty!r} has no training image that "
                          "can be decoded")
    if layout.test is None:
        in_test = _hold_out(labels_array, cfg.test_fraction, cfg.seed)
    logger.info("Decoded %d images from %s as %dx%d %s with %d threads", len(labels_array),
                root, height, width, color_mode, workers)
    return {"x_train": images[~in_test], "y_train": labels_array[~in_test],
            "x_test": images[in_test], "y_test": labels_array[in_test],
            "class_names": np.array(layout.class_names, dtype=str)}


def _hold_out(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded test mask holding out ``fraction`` of each class (at least one image of a
    class that has two or more, never its last one)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(max(1, round(len(members) * fraction)), len(members) - 1)
        mask[rng.permutation(members)[:count]] = True
    return mask
