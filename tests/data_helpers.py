"""Real datasets of other kinds, written by the tests from real Fashion-MNIST images: image
folders (PNG and JPEG, grayscale and RGB, several sizes), npz files of any shape, and CIFAR
archives in the exact format Keras reads."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Three Fashion-MNIST classes, by the folder names the tests give them (sorted: labels 0, 1, 2).
FOLDER_CLASSES = {"sneaker": 7, "trouser": 1, "tshirt": 0}
# Fashion-MNIST classes that write_photo_folder can take photos of, by folder name.
PHOTO_CLASSES = {"bag": 8, "sandal": 5, "shirt": 6}


def fashion_arrays() -> dict[str, np.ndarray]:
    from sweeper.data import load_idx_folder

    return load_idx_folder(FASHION_MNIST)


def class_images(label: int, count: int, start: int = 0) -> np.ndarray:
    """``count`` real Fashion-MNIST training images (28x28 uint8) of class ``label``."""
    arrays = fashion_arrays()
    picked = np.flatnonzero(arrays["y_train"] == label)[start:start + count]
    return arrays["x_train"][picked]


def save_image(pixels: np.ndarray, path: Path, index: int) -> Path:
    """Write one image, varying how by ``index``: every third a JPEG (else PNG), every fourth
    converted to RGB, every fifth enlarged to 36x36 (bilinear). Returns the path written."""
    from PIL import Image

    image = Image.fromarray(pixels)
    if index % 4 == 3:
        image = image.convert("RGB")
    if index % 5 == 4:
        image = image.resize((36, 36), Image.Resampling.BILINEAR)
    suffix = ".jpg" if index % 3 == 2 else ".png"
    target = path.with_suffix(suffix)
    image.save(target, quality=95) if suffix == ".jpg" else image.save(target)
    return target


def write_image_folder(root: Path, per_class: int, layout: str = "classes",
                       test_per_class: int = 0, broken: bool = True) -> Path:
    """An image folder of the three FOLDER_CLASSES made of real Fashion-MNIST images.

    ``layout="classes"``: ROOT/<class>/*.png|jpg; ``layout="split"``: ROOT/train/<class>/...
    and ROOT/test/<class>/... (``test_per_class`` images each, taken after the training ones).
    With ``broken``, ROOT's first class also holds ``broken.png``, a PNG cut off after its
    header, which must be skipped with a warning.
    """
    splits = {"": (0, per_class)} if layout == "classes" else {
        "train": (0, per_class), "test": (per_class, test_per_class)}
    for split, (start, count) in splits.items():
        for name, label in FOLDER_CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index, pixels in enumerate(class_images(label, count, start)):
                save_image(pixels, folder / f"{name}_{start + index:04d}", index)
    if broken:
        first = root / ("train" if layout == "split" else "") / next(iter(FOLDER_CLASSES))
        whole = (first / "sneaker_0000.png").read_bytes()
        (first / "broken.png").write_bytes(whole[:60])
    return root


def write_photo_folder(root: Path, counts: dict[str, dict[str, int]], side: int = 40) -> Path:
    """A small folder of colour photos in the split layout, ROOT/<split>/<class>/NNNN.png,
    ``counts[split][class]`` images each; the classes are Fashion-MNIST class names
    (``PHOTO_CLASSES``). Each image is a real Fashion-MNIST one enlarged to side x side
    (bilinear) and tinted to RGB, the test images taken after the training ones."""
    from PIL import Image

    start = {name: 0 for split in counts.values() for name in split}
    for split, classes in counts.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index, pixels in enumerate(class_images(PHOTO_CLASSES[name], count, start[name])):
                grey = Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR)
                tinted = (np.asarray(grey, dtype=np.float32)[..., None]
                          * np.array([1.0, 0.8, 0.5])).astype(np.uint8)
                Image.fromarray(tinted, "RGB").save(folder / f"{index:04d}.png")
            start[name] += count
    return root


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def colour_npz(path: Path, train: int = 600, test: int = 200, side: int = 32) -> Path:
    """Fashion-MNIST images of classes 0, 1 and 7 as colour images (N, side, side, 3): each
    resized to side x side (bilinear) and tinted per class so that colour carries signal too;
    labels kept as Fashion-MNIST's own values {0, 1, 7}."""
    from PIL import Image

    arrays = fashion_arrays()
    keep = np.isin(arrays["y_train"], list(FOLDER_CLASSES.values()))
    x, y = arrays["x_train"][keep][:train + test], arrays["y_train"][keep][:train + test]
    tint = {0: (1.0, 0.6, 0.6), 1: (0.6, 1.0, 0.6), 7: (0.6, 0.6, 1.0)}
    images = np.stack([
        (np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR),
                    dtype=np.float32)[..., None] * np.array(tint[int(label)])).astype(np.uint8)
        for image, label in zip(x, y, strict=True)])
    return save_npz(path, x_train=images[:train], y_train=y[:train], x_test=images[train:],
                    y_test=y[train:])


def cifar_archive(path: Path, name: str = "cifar10", per_batch: int = 40) -> Path:
    """A small CIFAR archive in the exact format Keras reads (and the Toronto site ships):
    a .tar.gz holding ``cifar-10-batches-py/`` with pickled dicts ``data_batch_1..5`` and
    ``test_batch`` (bytes keys; ``data`` a uint8 array (N, 3072) in channel-major order,
    ``labels`` a list) plus ``batches.meta`` (``label_names``); for cifar100
    ``cifar-100-python/`` with ``train`` and ``test`` (``fine_labels``, ``coarse_labels``) and
    ``meta`` (``fine_label_names``). The images are real Fashion-MNIST ones resized to 32x32
    and tinted per channel, so that channels differ."""
    from PIL import Image

    arrays = fashion_arrays()
    classes = 10

    def batch(offset: int, count: int, label_key: str) -> dict[bytes, object]:
        pixels = arrays["x_train"][offset:offset + count]
        labels = arrays["y_train"][offset:offset + count].astype(int)
        big = np.stack([np.asarray(Image.fromarray(p).resize((32, 32))) for p in pixels])
        rgb = np.stack([big, big // 2, 255 - big], axis=1)  # (N, 3, 32, 32): channel-major
        content = {b"batch_label": b"made by the sweeper tests",
                   b"data": rgb.reshape(count, 3072).astype(np.uint8),
                   label_key.encode(): labels.tolist(),
                   b"filenames": [f"{i}.png".encode() for i in range(count)]}
        if label_key == "fine_labels":
            content[b"coarse_labels"] = (labels // 2).tolist()
        return content

    names = [f"class_{i}".encode() for i in range(classes)]
    if name == "cifar10":
        folder = "cifar-10-batches-py"
        files = {f"data_batch_{i}": batch((i - 1) * per_batch, per_batch, "labels")
                 for i in range(1, 6)}
        files["test_batch"] = batch(5 * per_batch, per_batch, "labels")
        files["batches.meta"] = {b"label_names": names, b"num_cases_per_batch": per_batch}
    else:
        folder = "cifar-100-python"
        files = {"train": batch(0, 5 * per_batch, "fine_labels"),
                 "test": batch(5 * per_batch, per_batch, "fine_labels"),
                 "meta": {b"fine_label_names": names, b"coarse_label_names": names[:5]}}
    with tarfile.open(path, "w:gz") as archive:
        for file_name, content in files.items():
            # Protocol 4: Python 3 bytes need no codecs global, which Keras' restricted
            # unpickler (and ours) refuses; the Toronto files are Python 2 pickles of str.
            data = pickle.dumps(content, protocol=4)
            info = tarfile.TarInfo(f"{folder}/{file_name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path
