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

How each image becomes uint8 pixels, by the mode Pillow opens it in (the rules of
Keras' ``image_dataset_from_directory``, which decodes with TensorFlow, wherever it
reads the format; TIFF it does not read):

- EXIF orientation (JPEG, TIFF, WebP, PNG) is applied first
  (``PIL.ImageOps.exif_transpose``): the pixels as a photo viewer shows them. Keras
  does not apply it; a phone photo stored sideways would train sideways. A file whose
  decoded size is not the one its header shows is refused (Pillow 13.0 scrambles an
  uncompressed TIFF that its orientation tag turns).
- ``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``YCbCr``, ``HSV``: Pillow's ``convert`` to
  ``L`` or ``RGB`` (grayscale to rgb repeats the value; colour to grayscale is
  ITU-R 601-2 luma, ``L = R * 299/1000 + G * 587/1000 + B * 114/1000``).
- Alpha (``LA``, ``La``, ``RGBA``, ``RGBa``, ``PA``, ``P`` with transparency) is
  dropped, as Keras drops it for rgb and grayscale: each pixel keeps its colour as if
  opaque (premultiplied colour is un-premultiplied first). Palette images with
  transparency go through ``RGBA`` (the transparent entries keep their palette colour, as
  Keras keeps it for PNG; its GIF decoder makes them black).
- ``CMYK`` (JPEG, TIFF): Pillow's conversion to RGB, ``R = (255 - C) * (255 - K) / 255``
  (G from M, B from Y); no colour profile is applied (Keras applies none either).
- ``LAB`` (TIFF): converted to sRGB with Pillow's ImageCms (littlecms).
- 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``: 16-bit PNG and TIFF):
  scaled by its range, ``x >> 8`` (x / 257 rounded down), as TensorFlow's PNG decoder
  does; a 16-bit image made from an 8-bit one as ``x * 257`` decodes back to it exactly.
  (Pillow's own conversion clips at 255: nearly every pixel white.) 16-bit colour PNGs
  Pillow opens as ``RGB``/``RGBA`` from each sample's high byte: the same ``x >> 8``.
- ``I`` (32-bit integer TIFF) and ``F`` (32-bit float TIFF) are refused: no pixel range
  is agreed for them (floats may be 0-1, 0-255 or anything). Such a file is skipped as
  one that cannot be decoded, saying so; save the images as 8- or 16-bit PNG, or as an
  .npz of floats in [0, 1] or [0, 255] (``data=npz``).
- Animations (GIF, WebP): the first frame, as Keras (``expand_animations=False``).

A file Pillow cannot open or decode (not an image, empty, cut short, a broken link,
unreadable, over Pillow's decompression-bomb limit ``PIL.Image.MAX_IMAGE_PIXELS`` x 2)
or in a refused mode is skipped, with one warning naming the files and why; a class
left without a decodable training image, or a folder with none at all, is refused
in one line (:class:`sweeper.config.ConfigError`).
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

# Keras' formats, and TIFF (torchvision's ImageFolder reads it): 16-bit scans and microscopy.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# data.color_mode -> Pillow's mode; images stored in any other mode than these count as colour.
PILLOW_MODES = {"rgb": "RGB", "grayscale": "L"}
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# 16-bit grayscale, scaled to 8 bits by its range (x >> 8) as TensorFlow's PNG decoder does.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
# Modes without an agreed pixel range: refused, with what to do instead.
REFUSED_MODES = {"I": "a 32-bit integer image (mode I)", "F": "a 32-bit float image (mode F)"}
REFUSED_HINT = ("no pixel range is agreed for it; save the images as 8- or 16-bit PNG, or as an "
                ".npz of floats in [0, 1] or [0, 255] (data=npz)")
# EXIF orientations that turn an image by 90 degrees (its stored width is its shown height).
SIDEWAYS = frozenset({5, 6, 7, 8})
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


class UndecodableImage(ValueError):
    """An image file Pillow cannot open or decode, or one in a mode sweeper refuses; the
    message says why in a few words, without the file's name."""


def _is_image(path: Path) -> bool:
    """An image file by its name: a regular file, or a broken link (skipped later with a
    warning, not silently); never a folder, pipe or device (opening a pipe would block)."""
    return (path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
            and (path.is_file() or (path.is_symlink() and not path.exists())))


def _class_files(folder: Path, source: Path) -> dict[str, list[Path]]:
    """Image files below each class folder of ``folder`` (sub-folders included), sorted."""
    classes = sorted(entry for entry in folder.iterdir()
                     if entry.is_dir() and not entry.name.startswith("."))
    files = {entry.name: sorted(path for path in entry.rglob("*") if _is_image(path))
             for entry in classes}
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


def _header_or_why(path: Path) -> tuple[tuple[int, int], str] | UndecodableImage:
    try:
        return read_header(path)
    except UndecodableImage as error:
        return error


def _named(path: Path, why: BaseException) -> str:
    return f"{path} ({why})"


def _pillow_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file it cannot open or decode: OSError (its
    UnidentifiedImageError and "image file is truncated" among them), ValueError and
    SyntaxError from format plugins, EOFError from a cut-off frame, and the decompression-bomb
    error (an image of over twice ``PIL.Image.MAX_IMAGE_PIXELS``), which is none of these."""
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning)


def _why(error: BaseException) -> str:
    """A few words on why a file could not be read, without the path Pillow's messages repeat."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image file Pillow can identify"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror  # No such file or directory (a broken link), Permission denied
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _refuse_mode(mode: str) -> None:
    if mode in REFUSED_MODES:
        raise UndecodableImage(f"{REFUSED_MODES[mode]}: {REFUSED_HINT}")


def _orientation(image) -> int:
    """The EXIF orientation (1-8; 1 as stored) an opened image's header gives. A PNG's eXIf
    chunk after its pixels is seen only when decoding (reading it here would decode)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    from PIL import ExifTags

    try:
        return int(image.getexif().get(ExifTags.Base.Orientation) or 1)
    except (*_pillow_errors(), TypeError):  # a malformed EXIF block: decoding will tell
        return 1


def _shown_size(image) -> tuple[int, int]:
    """An opened (not yet loaded) image's (height, width) as shown, its EXIF orientation
    applied (a PNG's eXIf chunk after its pixels aside)."""
    width, height = image.size
    if image.format == "TIFF":
        # The stored size: Pillow 13 reports a TIFF's size with its orientation applied (it
        # turns TIFFs itself when loading), older versions do not.
        width, height = image.tag_v2.get(256, width), image.tag_v2.get(257, height)
    if _orientation(image) in SIDEWAYS:
        height, width = width, height
    return height, width


def read_header(path: Path) -> tuple[tuple[int, int], str]:
    """An image file's (height, width) as shown (its EXIF orientation applied) and Pillow
    mode, from its header.

    Raises:
        UndecodableImage: Pillow cannot open it, or its mode is refused (module docstring).
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            _refuse_mode(image.mode)
            return _shown_size(image), image.mode
    except UndecodableImage:
        raise
    except _pillow_errors() as error:
        raise UndecodableImage(_why(error)) from None


def to_model_mode(image, color_mode: str):
    """A Pillow image of any mode as ``L`` (``grayscale``) or ``RGB`` (``rgb``), by the rules
    of the module docstring (EXIF orientation aside: :func:`decode_image` applies it).

    Raises:
        UndecodableImage: a refused mode (``I``, ``F``) or one Pillow cannot convert.
    """
    from PIL import Image, ImageCms

    _refuse_mode(image.mode)
    if image.mode in SIXTEEN_BIT_MODES:
        # Pillow's own conversion to L clips at 255; the range scales as TensorFlow's does.
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    elif image.mode == "LAB":
        image = ImageCms.applyTransform(image, ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"))
    elif image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # Pillow asks for it; the alpha is dropped below
    try:
        return image.convert(PILLOW_MODES[color_mode])
    except ValueError as error:  # "conversion from X to Y not supported"
        raise UndecodableImage(_why(error)) from None


def decode_image(path: str | Path, color_mode: str,
                 image_size: tuple[int, int] | list[int] | None = None) -> np.ndarray:
    """One image file as the model was trained on it: uint8 (H, W, C), C=3 for ``rgb`` and 1
    for ``grayscale``, resized (bilinear) to ``image_size`` = (height, width) if given. Any
    mode Pillow opens is decoded by the rules of the module docstring: EXIF orientation
    applied, 16-bit scaled by its range, alpha dropped, CMYK and LAB as RGB.

    Example: ``model.predict(decode_image("cat.png", "rgb", (64, 64))[None])`` with the
    ``color_mode`` and ``input_shape`` of the sweep's best_model.json.

    Raises:
        UndecodableImage: Pillow cannot open or decode the file (the message says why), or
            its mode is refused (32-bit integer or float).
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            _refuse_mode(image.mode)
            shown = _shown_size(image)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            if image.format != "PNG" and (image.height, image.width) != shown:
                # Pillow 13.0 scrambles an uncompressed TIFF its orientation tag turns.
                raise UndecodableImage(
                    f"Pillow decodes it to {image.height}x{image.width} pixels, its header "
                    f"says {shown[0]}x{shown[1]}; save it again (a TIFF with compression, "
                    "e.g. LZW)")
            converted = to_model_mode(image, color_mode)
    except UndecodableImage:
        raise
    except _pillow_errors() as error:
        raise UndecodableImage(_why(error)) from None
    if image_size is not None and converted.size != (image_size[1], image_size[0]):
        converted = converted.resize((image_size[1], image_size[0]),
                                     Image.Resampling.BILINEAR)
    pixels = np.asarray(converted, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def resize_images(images: np.ndarray, image_size: tuple[int, int] | list[int],
                  workers: int | None = None) -> np.ndarray:
    """uint8 images (N, H, W) or (N, H, W, C) resized to ``image_size`` = (height, width) by
    the rule :func:`decode_image` resizes image files with: Pillow's bilinear resampling,
    each channel on its own (a fourth channel is resized as it is, never taken as alpha to
    premultiply). The dtype and the channel axis (or its absence) stay; images already of that
    size come back as they are, not copied.

    Args:
        images: uint8 pixels of an npz, IDX or CIFAR source (sweeper.data.check_arrays).
        image_size: [height, width] in pixels (``data.image_size``).
        workers: Threads (Pillow resizes without holding the GIL); None: every core.
    """
    from PIL import Image

    height, width = int(image_size[0]), int(image_size[1])
    if images.shape[1:3] == (height, width):
        return images
    planes = images.reshape(*images.shape[:3], -1)
    resized = np.empty((len(images), height, width, planes.shape[3]), dtype=np.uint8)

    def resize_one(index: int) -> None:
        for channel in range(planes.shape[3]):
            plane = Image.fromarray(np.ascontiguousarray(planes[index, :, :, channel]))
            resized[index, :, :, channel] = np.asarray(
                plane.resize((width, height), Image.Resampling.BILINEAR))

    _in_pool(resize_one, range(len(images)), workers or _cpu_count())
    return resized.reshape(len(images), height, width, *images.shape[3:])


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

    Files that cannot be decoded (module docstring) are skipped, with one warning naming
    them, why, and their count.

    Args:
        cfg: ``path``, ``image_size``, ``color_mode``, ``test_fraction`` and ``seed``.
        workers: Decoding threads; None uses every core this process may run on.

    Raises:
        ConfigError: a layout :func:`find_layout` refuses, images of several sizes without
            ``data.image_size``, no file that can be decoded, or a class left without a
            training image that can be decoded.
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
    test_count = sum(len(paths) for paths in test_files.values())
    in_test[len(files) - test_count:] = True
    headers = _in_pool(_header_or_why, files, workers)
    # Why each file that cannot be decoded was skipped, by its index in files.
    skipped = {index: header for index, header in enumerate(headers)
               if isinstance(header, UndecodableImage)}
    found = [header for header in headers if not isinstance(header, UndecodableImage)]
    if not found:
        raise ConfigError("data.path", str(root), f"none of its {len(files)} image files "
                          f"can be decoded, e.g. {_named(files[0], skipped[0])}")
    height, width = _target_size(found, cfg, root)
    color_mode = cfg.color_mode or (
        "rgb" if any(mode not in GRAY_MODES for _, mode in found) else "grayscale")
    channels = 3 if color_mode == "rgb" else 1
    images = np.zeros((len(files), height, width, channels), dtype=np.uint8)

    def decode_into(index: int) -> None:
        if index in skipped:
            return
        try:
            # Resized only to data.image_size: a size the header did not tell (a PNG's EXIF
            # orientation, seen only now) is skipped rather than squeezed into the others'.
            pixels = decode_image(files[index], color_mode,
                                  (height, width) if cfg.image_size else None)
            if pixels.shape[:2] != (height, width):
                raise UndecodableImage(f"it decodes to {pixels.shape[0]}x{pixels.shape[1]}, "
                                       f"the others to {height}x{width}; set "
                                       "data.image_size=[height,width]")
            images[index] = pixels
        except UndecodableImage as error:
            skipped[index] = error

    _in_pool(decode_into, range(len(files)), workers)
    labels_array = np.array(labels, dtype=np.int64)
    if skipped:
        order = sorted(skipped)
        shown = ", ".join(_named(files[i], skipped[i]) for i in order[:SHOWN_SKIPPED])
        logger.warning("Skipped %d of %d image files that could not be decoded: %s%s",
                       len(skipped), len(files), shown,
                       " ..." if len(skipped) > SHOWN_SKIPPED else "")
        decoded = np.ones(len(files), dtype=bool)
        decoded[order] = False
        images, labels_array, in_test = images[decoded], labels_array[decoded], in_test[decoded]
    counts = np.bincount(labels_array[~in_test], minlength=len(layout.class_names))
    if not counts.all():
        empty = int(np.flatnonzero(counts == 0)[0])
        example = next((_named(files[i], skipped[i]) for i in sorted(skipped)
                        if labels[i] == empty and i < len(files) - test_count), None)
        raise ConfigError("data.path", str(root),
                          f"class {layout.class_names[empty]!r} has no training image that "
                          "can be decoded" + (f", e.g. {example}" if example else ""))
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
