"""End to end on a user's own image folder (issue 22): the real CLI, real Ray, real training.

The folder is written by the test from real Fashion-MNIST images (``data_helpers``):
ROOT/train/<class>/ with 150 images each of T-shirts, trousers and sneakers, ROOT/test/<class>/
with 15 each; PNG and JPEG, every fourth stored as RGB, every fifth enlarged to 36x36, and
one PNG in train/sneaker cut off after its header. The baseline test (issue 42) writes a
folder of its own: 70 colour photos, 70% sandals and 30% bags (``PHOTOS``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from data_helpers import FOLDER_CLASSES, write_image_folder, write_photo_folder

pytestmark = pytest.mark.slow

PER_CLASS, TEST_PER_CLASS = 150, 15


@pytest.fixture(scope="module")
def folder_sweep(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("photos") / "photos", PER_CLASS,
                              layout="split", test_per_class=TEST_PER_CLASS)
    cwd = tmp_path_factory.mktemp("sweep")
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    result = run_cli(["+experiment=smoke", "data=image_folder", f"data.path={root}",
                      "data.image_size=[28,28]", "search.num_trials=2", "train.epochs=3",
                      "train.batch_size=32", "search.space.train.lr=tag(log, interval(1e-3, 3e-3))",
                      f"sweep_dir={cwd / 'sweep'}"], cwd=cwd, ray_tmp=ray_tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, cwd / "sweep", result


def test_the_summary_data_block_describes_the_folder(folder_sweep):
    root, sweep_dir, result = folder_sweep
    data = json.loads((sweep_dir / "summary.json").read_text())["data"]
    assert data["name"] == "image_folder"
    assert data["input_shape"] == [28, 28, 3]  # some images are RGB: read in colour
    assert data["num_classes"] == 3
    assert data["class_names"] == sorted(FOLDER_CLASSES)
    assert data["sizes"]["test"] == 3 * TEST_PER_CLASS  # the split on disk
    assert data["sizes"]["train"] + data["sizes"]["val"] == 3 * PER_CLASS  # broken.png skipped
    log = (sweep_dir / "sweep.log").read_text() + result.stderr
    assert "Skipped 1 of 496 image files that could not be decoded" in log


def test_the_exported_model_classifies_raw_image_files_after_the_same_decoding(folder_sweep):
    """best_model.keras on the test files, each decoded with sweeper.image_folder.decode_image
    as best_model.json describes: the same accuracy the sweep reported on its test split."""
    import keras

    from sweeper.image_folder import decode_image

    root, sweep_dir, _ = folder_sweep
    info = json.loads((sweep_dir / "best_model.json").read_text())
    assert info["class_names"] == sorted(FOLDER_CLASSES)
    assert info["input_shape"] == [28, 28, 3] and info["input_dtype"] == "uint8"
    model = keras.models.load_model(sweep_dir / "best_model.keras")
    files = sorted((root / "test").rglob("*.*"))
    images = np.stack([decode_image(path, "rgb", info["input_shape"][:2]) for path in files])
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (len(files), 3)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    truth = [info["class_names"].index(path.parent.name) for path in files]
    accuracy = float(np.mean(np.argmax(probabilities, axis=1) == truth))
    assert accuracy == pytest.approx(info["test"]["accuracy"])
    assert accuracy > 0.6  # chance is 1/3
    assert info["test"]["per_class"]["class_names"] == sorted(FOLDER_CLASSES)


def test_the_report_names_the_classes(folder_sweep):
    _, sweep_dir, _ = folder_sweep
    report = (sweep_dir / "report" / "report.md").read_text()
    for name in FOLDER_CLASSES:
        assert f"| {name} |" in report
    assert "- Data: image_folder, images of shape 28x28x3, 3 classes" in report


# Issue 42: a folder of 70 colour photos (40x40 PNGs, real Fashion-MNIST sandals and bags
# enlarged and tinted), 70% sandals in both splits, and a sweep that cannot learn in its
# budget: one trial of one epoch at a learning rate of 1e-7.
PHOTOS = {"train": {"sandal": 35, "bag": 15}, "test": {"sandal": 14, "bag": 6}}


@pytest.fixture(scope="module")
def untrained_sweep(tmp_path_factory):
    root = write_photo_folder(tmp_path_factory.mktemp("photos") / "photos", PHOTOS)
    cwd = tmp_path_factory.mktemp("sweep")
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    args = ["+experiment=smoke", "data=image_folder", f"data.path={root}",
            "data.image_size=[40,40]", "search.num_trials=1", "train.epochs=1",
            "search.space.train.lr=choice(1e-7)"]
    result = run_cli([*args, f"sweep_dir={cwd / 'sweep'}"], cwd=cwd, ray_tmp=ray_tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return args, cwd / "sweep", result


def test_a_model_no_better_than_the_majority_class_says_so_everywhere(untrained_sweep, capsys):
    from sklearn.dummy import DummyClassifier

    import sweeper
    from sweeper.cli import main
    from sweeper.data import load_splits

    args, sweep_dir, result = untrained_sweep
    summary = json.loads((sweep_dir / "summary.json").read_text())
    config = sweeper.compose([*args, f"sweep_dir={sweep_dir}"])
    splits = load_splits(config.data, config.train.validation_fraction, config.train.seed)
    dummy = DummyClassifier(strategy="most_frequent").fit(splits.y_train[:, None],
                                                          splits.y_train)
    assert summary["baseline"]["class_name"] == "sandal" == splits.class_names[
        int(dummy.predict([[0]])[0])]
    assert summary["baseline"]["val_accuracy"] == pytest.approx(
        dummy.score(splits.y_val[:, None], splits.y_val))
    assert summary["baseline"]["test_accuracy"] == pytest.approx(14 / 20)

    [warning] = summary["warnings"]
    assert warning.startswith(f"the best model (test accuracy {summary['test']['accuracy']:.4f})"
                              " is not clearly better than always predicting 'sandal' (0.7000; "
                              "clearly better means above 0.9049 on these 20 test images")
    assert "more epochs (train.epochs)" in warning
    ignored = [name for i, name in enumerate(splits.class_names)
               if not any(row[i] for row in summary["test"]["confusion_matrix"])]
    assert ("predicts no test image as class" in warning) == bool(ignored)
    assert f"warning: {warning}" in result.stdout.splitlines()
    report = (sweep_dir / "report" / "report.md").read_text()
    assert f"- **Warning:** {warning}." in report.splitlines()

    # python -m sweeper report rebuilds the same summary, report and console line.
    (sweep_dir / "report" / "report.md").unlink()
    main(["report", str(sweep_dir)])
    assert json.loads((sweep_dir / "summary.json").read_text()) == summary
    assert (sweep_dir / "report" / "report.md").read_text() == report
    assert f"warning: {warning}" in capsys.readouterr().out.splitlines()
