"""Every image mode Pillow opens decodes to the uint8 pixels Keras (or a careful user) would
get, or is refused in one line; files that cannot be decoded are skipped with a warning, or
the input is refused (issue 41, items 2 and 11).

Every image here is written by the test with Pillow from real Fashion-MNIST pixels
(``data_helpers.class_images``): a 28x28 grayscale image, and a colour one made from it with
three different channels.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from data_helpers import FOLDER_CLASSES, class_images

from sweeper.config import ConfigError, DataConfig
from sweeper.data import load_splits
from sweeper.image_folder import UndecodableImage, decode_image, load_image_folder, read_header

GRAY = class_images(FOLDER_CLASSES["tshirt"], 1)[0]  # (28, 28) uint8
COLOUR = np.stack([GRAY, GRAY // 2, 255 - GRAY], axis=-1)  # (28, 28, 3): channels differ
ALPHA = (np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8)  # every alpha level
# A palette of 16 colours and the image of its indices.
INDICES = (GRAY // 16).astype(np.uint8)
PALETTE = np.stack([np.arange(16) * 17, np.arange(16) * 8, 255 - np.arange(16) * 17],
                   axis=-1).astype(np.uint8)


# JPEGs of little loss and no chroma subsampling: Fashion-MNIST's sharp edges in channels
# this different lose up to 254 levels at a pixel with 4:2:0.
JPEG = {"quality": 95, "subsampling": 0}


def luma(rgb: np.ndarray) -> np.ndarray:
    """Pillow's ITU-R 601-2 luma of RGB pixels (the documented grayscale of colour)."""
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).convert("L"))


def palette_image(mode: str = "P"):
    from PIL import Image

    image = Image.fromarray(INDICES, "L").convert("P")
    image.putpalette(PALETTE.tobytes())
    return image if mode == "P" else image.convert(mode)


def sixteen_bit(low_byte: np.ndarray, dtype: str = "<u2"):
    """A 16-bit grayscale image whose high byte is GRAY: x >> 8 must give GRAY back."""
    from PIL import Image

    return Image.fromarray((GRAY.astype(np.uint16) * 256 + low_byte).astype(dtype))


def with_alpha(mode: str, pixels: np.ndarray):
    from PIL import Image

    image = Image.fromarray(pixels)
    image.putalpha(Image.fromarray(ALPHA))
    assert image.mode == mode
    return image


def exif_rotated(pixels: np.ndarray):
    """The image stored turned by 90 degrees counter-clockwise, with EXIF orientation 6
    (turn clockwise to show it); cropped to 28x24 so that a missed turn changes the shape."""
    from PIL import Image

    image = Image.fromarray(np.rot90(pixels[:, 2:26], 1).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    return image, exif


def write(path: Path, kind: str) -> tuple[np.ndarray, int]:
    """Write the file of ``kind`` at ``path`` (its suffix is the format); return the RGB
    pixels it must decode to and the tolerance (JPEG, colour spaces)."""
    from PIL import Image

    if kind == "1":
        Image.fromarray(GRAY > 127).save(path)
        return np.repeat(((GRAY > 127) * 255).astype(np.uint8)[..., None], 3, -1), 0
    if kind == "L":
        Image.fromarray(GRAY).save(path, **JPEG)
        return np.repeat(GRAY[..., None], 3, -1), 6 if path.suffix == ".jpg" else 0
    if kind == "LA":
        with_alpha("LA", GRAY).save(path)
        return np.repeat(GRAY[..., None], 3, -1), 0
    if kind == "RGB":
        Image.fromarray(COLOUR).save(path, **({"lossless": True} if path.suffix == ".webp"
                                              else {}))
        return COLOUR, 0
    if kind == "RGBA":
        with_alpha("RGBA", COLOUR).save(path, **({"lossless": True, "exact": True}
                                                  if path.suffix == ".webp" else {}))
        return COLOUR, 0
    if kind == "P":
        palette_image().save(path)
        return PALETTE[INDICES], 0
    if kind == "P+tRNS bytes":  # one alpha per palette entry
        palette_image().save(path, transparency=bytes(range(0, 256, 16)))
        return PALETTE[INDICES], 0
    if kind == "P+tRNS index":  # one transparent palette entry
        palette_image().save(path, transparency=3)
        return PALETTE[INDICES], 0
    if kind == "PA":
        image = palette_image("PA")
        image.putalpha(Image.fromarray(ALPHA))
        image.save(path)
        return PALETTE[INDICES], 0
    if kind == "CMYK":
        Image.fromarray(COLOUR).convert("CMYK").save(path, **JPEG)
        return COLOUR, 8 if path.suffix == ".jpg" else 0
    if kind == "YCbCr":
        Image.fromarray(COLOUR).convert("YCbCr").save(path)
        return COLOUR, 3
    if kind == "LAB":  # gray content: LAB's 8-bit a/b lose colours, not grays
        gray_rgb = np.repeat(GRAY[..., None], 3, -1)
        Image.fromarray(gray_rgb).convert("LAB").save(path)
        return gray_rgb, 3
    if kind == "I;16 x*257":  # 16-bit made from 8-bit: decodes back exactly
        sixteen_bit(GRAY).save(path)
        return np.repeat(GRAY[..., None], 3, -1), 0
    if kind == "I;16 any low byte":  # x >> 8, not x / 257 rounded, nor clipped
        sixteen_bit(255 - GRAY).save(path)
        return np.repeat(GRAY[..., None], 3, -1), 0
    if kind == "I;16B":
        image = sixteen_bit(GRAY, ">u2")
        assert image.mode == "I;16B"
        image.save(path)
        return np.repeat(GRAY[..., None], 3, -1), 0
    if kind.startswith("EXIF 6"):
        image, exif = exif_rotated(COLOUR)
        if kind == "EXIF 6 uncompressed":
            image.save(path, exif=exif)
        elif path.suffix == ".tif":
            image.save(path, exif=exif, compression="tiff_lzw")
        elif path.suffix == ".webp":
            image.save(path, exif=exif, lossless=True)
        else:
            image.save(path, exif=exif, **JPEG)
        # A missed or wrong turn differs by over 200 levels; JPEG's loss at these edges by 18.
        return COLOUR[:, 2:26], 24 if path.suffix == ".jpg" else 0
    if kind == "I":
        Image.fromarray(GRAY.astype(np.int32)).save(path)
        return np.empty(0), 0
    if kind == "F":
        Image.fromarray(GRAY.astype(np.float32) / 255).save(path)
        return np.empty(0), 0
    raise AssertionError(kind)


# (kind, file) -> the Pillow mode it opens in (None: refused with that mode's reason).
DECODED = [
    ("1", "png", "1"), ("1", "bmp", "1"), ("L", "png", "L"), ("L", "gif", "P"),
    ("L", "jpg", "L"), ("LA", "png", "LA"), ("RGB", "png", "RGB"), ("RGB", "bmp", "RGB"),
    ("RGB", "webp", "RGB"), ("RGBA", "png", "RGBA"), ("RGBA", "webp", "RGBA"),
    ("RGBA", "tif", "RGBA"), ("P", "png", "P"), ("P", "gif", "P"), ("P+tRNS bytes", "png", "P"),
    ("P+tRNS index", "png", "P"), ("P+tRNS index", "gif", "P"), ("PA", "tif", "PA"),
    ("CMYK", "jpg", "CMYK"), ("CMYK", "tif", "CMYK"), ("YCbCr", "tif", "YCbCr"),
    ("LAB", "tif", "LAB"), ("I;16 x*257", "png", "I;16"), ("I;16 any low byte", "png", "I;16"),
    ("I;16 x*257", "tif", "I;16"), ("I;16B", "tif", "I;16B"), ("EXIF 6", "jpg", "RGB"),
    ("EXIF 6", "tif", "RGB"), ("EXIF 6", "webp", "RGB"),
]


# Files TensorFlow's decoder reads otherwise or not at all (the rules are the module's).
KERAS_DIFFERS = {
    ("1", "bmp"),  # its BMP decoder reads 8-, 24- and 32-bit only
    ("RGBA", "webp"),  # it refuses a WebP with alpha for three channels
    # Its GIF decoder blacks out transparent pixels; its PNG decoder keeps their palette
    # colour, as sweeper does for both.
    ("P+tRNS index", "gif"),
}


@pytest.mark.parametrize(("kind", "suffix", "mode"), DECODED)
def test_each_image_mode_decodes_to_the_pixels_it_shows(tmp_path, kind, suffix, mode):
    path = tmp_path / f"image.{suffix}"
    rgb, tolerance = write(path, kind)
    (height, width), opened = read_header(path)
    assert opened == mode and (height, width) == rgb.shape[:2]
    for color_mode, expected in (("rgb", rgb), ("grayscale", luma(rgb)[..., None])):
        pixels = decode_image(path, color_mode)
        assert pixels.dtype == np.uint8 and pixels.shape == expected.shape, color_mode
        difference = np.abs(pixels.astype(int) - expected.astype(int)).max()
        assert difference <= tolerance, (color_mode, difference)


def test_a_turned_image_pillow_decodes_to_another_size_is_refused_never_wrong(tmp_path):
    """Pillow 13.0 scrambles an uncompressed TIFF that its orientation tag turns (a
    compressed one it reads right): the right pixels, or refused in one line."""
    path = tmp_path / "image.tif"
    rgb, _ = write(path, "EXIF 6 uncompressed")
    try:
        pixels = decode_image(path, "rgb")
    except UndecodableImage as error:
        assert "Pillow decodes it to 24x28 pixels, its header says 28x24" in str(error)
    else:
        assert np.array_equal(pixels, rgb)


@pytest.mark.parametrize(("kind", "what"), [("I", "32-bit integer"), ("F", "32-bit float")])
def test_images_without_an_agreed_pixel_range_are_refused_in_one_line(tmp_path, kind, what):
    path = tmp_path / "image.tif"
    write(path, kind)
    for read in (read_header, lambda p: decode_image(p, "grayscale")):
        with pytest.raises(UndecodableImage, match=f"{what} image .* save the images as 8- or "
                                                   "16-bit PNG") as caught:
            read(path)
        assert "\n" not in str(caught.value)


def test_keras_decodes_the_formats_it_reads_to_the_same_pixels(tmp_path):
    """TensorFlow's decoder, which ``image_dataset_from_directory`` uses, on each file of a
    format it reads (EXIF orientation aside, which Keras ignores): the same RGB pixels. A
    16-bit colour PNG (TensorFlow writes it; Pillow cannot) decodes as x >> 8 by both."""
    import tensorflow as tf

    for kind, suffix, _ in DECODED:
        if suffix == "tif" or kind.startswith("EXIF") or (kind, suffix) in KERAS_DIFFERS:
            continue
        path = tmp_path / f"{kind.replace(' ', '_').replace('*', 'x')}.{suffix}"
        write(path, kind)
        theirs = tf.io.decode_image(tf.io.read_file(str(path)), channels=3,
                                    expand_animations=False).numpy()
        ours = decode_image(path, "rgb")
        # JPEG: TensorFlow's default IDCT is libjpeg's fast integer one (16 levels off at
        # Fashion-MNIST's edges); Pillow uses the accurate one.
        tolerance = 20 if suffix == "jpg" else 0
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= tolerance, kind
    deep = tmp_path / "rgb48.png"
    tf.io.write_file(str(deep), tf.io.encode_png(
        (COLOUR.astype(np.uint16) * 256 + ALPHA[..., None]).astype(np.uint16)))
    assert np.array_equal(decode_image(deep, "rgb"), COLOUR)
    assert np.array_equal(tf.io.decode_png(tf.io.read_file(str(deep)), channels=3).numpy(),
                          COLOUR)


def write_classes(root: Path, save) -> Path:
    """ROOT/<class>/ with 6 real Fashion-MNIST images of each FOLDER_CLASSES class, each
    written by ``save(pixels, path_without_suffix)``."""
    for name, label in FOLDER_CLASSES.items():
        (root / name).mkdir(parents=True)
        for index, pixels in enumerate(class_images(label, 6)):
            save(pixels, root / name / f"{index}")
    return root


def folder_config(path: Path) -> DataConfig:
    return DataConfig(name="image_folder", path=str(path), url=None, sha256=None)


def test_a_folder_of_16_bit_pngs_loads_as_the_same_folder_of_8_bit_ones(tmp_path):
    from PIL import Image

    eight = write_classes(tmp_path / "eight", lambda pixels, path: Image.fromarray(
        pixels).save(path.with_suffix(".png")))
    sixteen = write_classes(tmp_path / "sixteen", lambda pixels, path: Image.fromarray(
        pixels.astype(np.uint16) * 257).save(path.with_suffix(".png")))
    assert Image.open(next(sixteen.rglob("*.png"))).mode == "I;16"
    ours, theirs = (load_splits(folder_config(root), 0.2, 0) for root in (eight, sixteen))
    for split in ("train", "val", "test"):
        assert np.array_equal(getattr(ours, f"x_{split}"), getattr(theirs, f"x_{split}"))
        assert np.array_equal(getattr(ours, f"y_{split}"), getattr(theirs, f"y_{split}"))
    assert theirs.x_train.std() > 20  # real images, not all white


def bomb(path: Path) -> Path:
    """A real PNG of 14000x14000 1-bit pixels (23 KB): over twice Pillow's
    MAX_IMAGE_PIXELS, so Pillow refuses to open it (DecompressionBombError)."""
    from PIL import Image

    Image.new("1", (14000, 14000)).save(path)
    return path


def test_files_that_cannot_be_decoded_are_skipped_with_a_warning_naming_each(tmp_path, caplog):
    from PIL import Image

    root = write_classes(tmp_path / "photos", lambda pixels, path: Image.fromarray(
        pixels).save(path.with_suffix(".png")))
    sneaker = root / "sneaker"
    bad = {
        bomb(sneaker / "bomb.png"): "exceeds limit",
        sneaker / "empty.png": "not an image file",
        sneaker / "text.png": "not an image file",
        sneaker / "cut.png": "truncated",
        sneaker / "broken_link.png": "No such file",
        sneaker / "float.tif": "32-bit float image",
    }
    (sneaker / "empty.png").write_bytes(b"")
    (sneaker / "text.png").write_text("not a picture\n")
    (sneaker / "cut.png").write_bytes((sneaker / "0.png").read_bytes()[:120])
    (sneaker / "broken_link.png").symlink_to(tmp_path / "gone.png")
    Image.fromarray(np.zeros((28, 28), np.float32)).save(sneaker / "float.tif")
    (sneaker / "folder.png").mkdir()  # a folder, not a file: not an image, not warned about
    os.mkfifo(sneaker / "pipe.png")  # a pipe: never opened (it would block)
    with caplog.at_level(logging.WARNING, logger="sweeper.image_folder"):
        arrays = load_image_folder(DataConfig(name="image_folder", path=str(root), url=None,
                                              sha256=None, test_fraction=0.2))
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"Skipped {len(bad)} of {len(bad) + 18} image files that "
                                  "could not be decoded: ")
    shown = warnings[0].split(": ", 1)[1]
    for path in sorted(bad)[:5]:  # the warning shows five, in file order
        assert re.search(re.escape(f"{path} (") + "[^/]*" + bad[path], shown), path
    assert len(arrays["y_train"]) + len(arrays["y_test"]) == 18


def test_a_folder_without_one_decodable_file_is_refused_saying_why(tmp_path):
    from PIL import Image

    for name in ("bags", "shirts"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.png").write_text("not a picture\n")
        Image.fromarray(np.zeros((28, 28), np.float32)).save(tmp_path / name / "b.tif")
    with pytest.raises(ConfigError) as caught:
        load_image_folder(folder_config(tmp_path))
    assert caught.value.key == "data.path"
    assert caught.value.allowed == (
        f"none of its 4 image files can be decoded, e.g. {tmp_path / 'bags' / 'a.png'} (not an "
        "image file Pillow can identify)")


@pytest.fixture
def ray_tmp():
    return Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))


def test_a_class_with_no_decodable_image_is_refused_in_one_line_leaving_nothing(tmp_path,
                                                                               ray_tmp):
    """Through the CLI: a class folder whose only images are a decompression bomb and an
    empty file. Before the fix Pillow's DecompressionBombError crashed the loader with a
    traceback, exit 1, and the sweep folder was left behind."""
    from PIL import Image

    root = tmp_path / "photos"
    (root / "shirts").mkdir(parents=True)
    for index, pixels in enumerate(class_images(FOLDER_CLASSES["tshirt"], 4)):
        Image.fromarray(pixels).save(root / "shirts" / f"{index}.png")
    (root / "bombs").mkdir()
    bomb(root / "bombs" / "bomb.png")
    (root / "bombs" / "empty.png").write_bytes(b"")
    sweep_dir = tmp_path / "sweeps" / "photos"
    result = run_cli(["+experiment=smoke", "data=image_folder", f"data.path={root}",
                      f"sweep_dir={sweep_dir}"], cwd=tmp_path, timeout=300, ray_tmp=ray_tmp)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith(f"error: data.path={str(root)!r} is invalid: class 'bombs' has "
                               "no training image that can be decoded, e.g. ")
    assert "bomb.png (Image size (196000000 pixels) exceeds limit" in lines[0]
    assert not sweep_dir.exists() and not (tmp_path / "sweeps").exists()
    assert not any(ray_tmp.iterdir())  # Ray never started
