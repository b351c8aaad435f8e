"""Configs compose and validate before Ray starts; a user's mistake is one line and exit code 2."""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from data_helpers import write_image_folder

from sweeper.config import ConfigError
from sweeper.overrides import CONFIG_PATH
from sweeper.sweep import validate

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(path.stem for path in (REPO / "conf" / "experiment").glob("*.yaml"))


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


MISTAKES = [
    (["train.lr=-1"], "train.lr"),
    (["scheduler=foo"], "scheduler=foo is invalid: not a config option"),
    (["data=cifar11"], "data=cifar11 is invalid: not a config option"),
    (["train.epochs=2", "scheduler.grace_period=3"], "train.epochs"),
    (["data.path=/no/such/mnist.npz"], "data.path"),
    (["data=fashion_mnist", "data.path=/no/such/folder"], "data.path"),
    (["data.path={not_mnist_npz}"], "data.path"),
    (["data.path={folder_without_idx}"], "data.path"),
    (["train.learning_rate=0.1"], "train.learning_rate=0.1 is invalid: no such setting"),
    (["train.lrr=0.1"], "did you mean train.lr?"),
    # `+` lifts Hydra's struct check: the stray key was set and never read.
    (["+train.lrr=0.1"], "train.lrr=0.1 is invalid: no such setting; did you mean train.lr?"),
    (["+model.filter=3"], "model.filter=3 is invalid: no such setting; did you mean model.filters"),
    (["+epochs=3"], "epochs=3 is invalid: no such setting"),
    (["trian.lr=0.1"], "trian.lr=0.1 is invalid: no such setting; did you mean train?"),
    (["train.batch_size=abc"], "train.batch_size='abc' is invalid: "),
    (["train.epochs=ten"], "train.epochs"),
    (["train.precision=float16"], "train.precision"),
    (["train.jit_compile=sometimes"], "train.jit_compile"),
    (["search.space.train.lr=interval(1e-4"], "search.space.train.lr"),
    (["search.space.train.lr=interval(1e-2, 1e-4)"], "search.space.train.lr"),
    (["search.space.model.width=choice(1, 2)"], "search.space.model.width"),
    # Issue 19: searched keys that could not change a trial, and casts the setting cannot take.
    (["search.space.data.max_train_samples=choice(100, 3000)"],
     "search.space.data.max_train_samples"),
    (["search.space.train.validation_fraction=choice(0.05, 0.5)"],
     "search.space.train.validation_fraction"),
    (["search.space.train.epochs=choice(1, 5)"], "search.space.train.epochs"),
    (["search.space.model.dense_units=float(interval(32, 128))"],
     "search.space.model.dense_units"),
    # Issue 20: data that cannot train, and files of every wrong kind a loader may meet; each
    # one line naming data.path or the setting, nothing started, nothing left behind.
    (["data=fashion_mnist", "data.path={fashion}", "data.max_train_samples=20",
      "train.validation_fraction=0.99"], "train.validation_fraction"),
    (["data.path={text_file}"], "data.path"),
    (["data.path={empty_file}"], "data.path"),
    (["data.path={truncated_npz}"], "data.path"),
    (["data.path={gzip_file}"], "data.path"),
    (["data.path={zip_of_text}"], "data.path"),
    (["data.path={truncated_idx_folder}"], "data.path"),
    (["data.path={one_class_npz}"], "data.path"),
    (["data.path={standardized_npz}"], "data.path"),
    (["data.path=/etc"], "data.path"),
    # Issue 23: a model builder that cannot be found (a user's own: tests/test_own_model.py).
    (["model._target_=no_such_module.build"],
     "cannot import no_such_module (ModuleNotFoundError: No module named 'no_such_module')"),
    (["model._target_=sweeper.config.no_builder"], "has no no_builder"),
    (["model._target_=sweeper.config.CNN_TARGET"], "is a str, not a function"),
    (["model._target_=my_models"], "must name a function as module.function"),
    # Issue 22: bad data of the new kinds, each refused in one line before Ray.
    (["data=image_folder", "data.path={empty_folder}"], "class folder"),
    (["data=image_folder", "data.path={class_without_images}"],
     "holds no images (.png, .jpg, .jpeg, .bmp, .gif, .webp, .tif, .tiff)"),
    (["data=image_folder", "data.path={one_class_folder}"], "a classifier needs two or more"),
    (["data=image_folder", "data.path={mixed_sizes_folder}"], "data.image_size=None is invalid"),
    (["data=image_folder"], "data.path=None is invalid: data=image_folder reads"),
    (["data=image_folder", "data.path={fashion}", "data.image_size=[28]"], "data.image_size"),
    (["data=npz", "data.path={small_npz}", "data.image_size=[0,32]"], "data.image_size"),
    (["data=image_folder", "data.path={fashion}", "data.color_mode=cmyk"], "data.color_mode"),
    (["data=npz", "data.path={lengths_differ_npz}"], "y_train has shape (39,)"),
    (["data=npz", "data.path={wrong_keys_npz}"], "npz lacks x_train"),
    (["data=npz", "data.path={small_npz}"], "model.padding='valid' is invalid: 8x8 images"),
    (["data=cifar10", "data.path={broken_archive}"], "cannot read it as Keras' cifar10"),
    (["data=cifar100", "data.path={fashion}"], "no cifar-100-python/train inside"),
    (["model.padding=full"], "model.padding"),
    (["name=" + "n" * 300], "sweep_dir"),
    (["name=.."], "name"),
    (["+experiment=no_such_experiment"], "experiment=no_such_experiment"),
    (["+experiment=smoke", "model.dropout=1.5"], "model.dropout"),
    (["search.sampler=grid"], "search.sampler"),
    (["search.metric=f1"], "search.metric"),
    (["search.storage=not-a-url"], "search.storage"),
    (["search.warm_start=/no/such/sweep"], "search.warm_start"),
    (["resources.gpu_per_trial=2"], "resources.gpu_per_trial"),
    (["resources.gpu_per_trial=1.5"], "resources.gpu_per_trial"),
    (["resources.cpu_per_trial=4096"], "resources.cpu_per_trial"),
    (["resume.errored=maybe"], "resume.errored"),
    (["recovery.max_failures=-1"], "recovery.max_failures"),
    # Issue 24: the knobs that move accuracy, the time budget, a depth the images cannot hold.
    (["train.schedule=linear"], "train.schedule"),
    (["train.warmup_epochs=10"], "train.warmup_epochs"),
    (["train.erasing=1.5"], "train.erasing"),
    (["search.time_budget_s=0"], "search.time_budget_s"),
    (["data=fashion_mnist", "data.path=/usr/share/datasets/fashion-mnist",
      "data.max_train_samples=100", "model.blocks=4"], "model.blocks=4 is invalid: 28x28 images"),
    # Issue 42: a pretrained backbone's settings.
    (["model=backbone", "model.name=VGG16"], "model.name='VGG16' is invalid: must be one of"),
    (["model=backbone", "model.weights=/no/such/weights.h5"], "model.weights"),
    (["model=backbone", "model.trainable_fraction=1.5"], "model.trainable_fraction"),
    (["model=backbone", "search.space.model.trainable_fraction=interval(0, 2)"],
     "search.space.model.trainable_fraction='interval(0, 2)' is invalid: includes 2.0"),
]


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> dict[str, str]:
    """Data paths that exist but cannot train: CIFAR-shaped images of one class (any image
    shape is data since issue 22), a folder of other files."""
    folder = tmp_path_factory.mktemp("bad_data")
    npz = folder / "cifar_like.npz"
    images = np.zeros((40, 32, 32, 3), dtype=np.uint8)
    labels = np.zeros(40, dtype=np.uint8)
    np.savez(npz, x_train=images, y_train=labels, x_test=images, y_test=labels)
    empty = folder / "pictures"
    empty.mkdir()
    (empty / "cat.png").write_bytes(b"\x89PNG")
    files = {"not_mnist_npz": str(npz), "folder_without_idx": str(empty)}
    # Wrong files of every kind, made here from real Fashion-MNIST where they need content.
    fashion = Path("/usr/share/datasets/fashion-mnist")
    text, blank = folder / "hostname", folder / "empty.npz"
    text.write_text("a-host-name\n")
    blank.write_bytes(b"")
    real = folder / "real.npz"
    x, y = np.zeros((40, 28, 28), np.uint8), np.arange(40, dtype=np.uint8) % 10
    np.savez(real, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    truncated = folder / "truncated.npz"
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    gz = folder / "data.npz.gz"
    gz.write_bytes(gzip.compress(real.read_bytes()))
    zipped = folder / "notes.npz"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("readme.txt", "no arrays here")
    idx = folder / "idx"
    idx.mkdir()
    for source in fashion.glob("*-ubyte.gz"):
        content = source.read_bytes()
        if source.name.startswith("train-images"):  # header intact, pixels cut short
            content = gzip.compress(gzip.decompress(content)[:100_000])
        (idx / source.name).write_bytes(content)
    one_class, standardized = folder / "one_class.npz", folder / "standardized.npz"
    np.savez(one_class, x_train=x, y_train=np.full(40, 3, np.uint8), x_test=x[:10],
             y_test=y[:10])
    np.savez(standardized, x_train=(x - 127.5) / 73.0, y_train=y, x_test=x[:10], y_test=y[:10])
    # Issue 22: image folders and arrays that cannot train.
    empty_folder, no_images, one_class = (folder / "empty", folder / "no_images",
                                          folder / "one_class")
    empty_folder.mkdir()
    (no_images / "sneaker").mkdir(parents=True)
    (no_images / "trouser").mkdir()
    (no_images / "sneaker" / "notes.txt").write_text("not an image")
    write_image_folder(one_class, per_class=3, broken=False)
    for extra in ("trouser", "tshirt"):
        shutil.rmtree(one_class / extra)
    mixed = write_image_folder(folder / "mixed", per_class=5, broken=False)
    np.savez(folder / "lengths.npz", x_train=x, y_train=y[:39], x_test=x[:10], y_test=y[:10])
    np.savez(folder / "keys.npz", images=x, labels=y)
    small = np.zeros((40, 8, 8, 3), np.uint8)
    np.savez(folder / "small.npz", x_train=small, y_train=y, x_test=small[:10], y_test=y[:10])
    broken_archive = folder / "cifar-10-python.tar.gz"
    broken_archive.write_bytes(gzip.compress(b"not a tar archive" * 100))
    files.update(empty_folder=str(empty_folder), class_without_images=str(no_images),
                 one_class_folder=str(one_class), mixed_sizes_folder=str(mixed),
                 lengths_differ_npz=str(folder / "lengths.npz"),
                 wrong_keys_npz=str(folder / "keys.npz"), small_npz=str(folder / "small.npz"),
                 broken_archive=str(broken_archive))
    return {**files, "fashion": str(fashion), "text_file": str(text), "empty_file": str(blank),
            "truncated_npz": str(truncated), "gzip_file": str(gz), "zip_of_text": str(zipped),
            "truncated_idx_folder": str(idx), "one_class_npz": str(one_class),
            "standardized_npz": str(standardized)}


@pytest.mark.parametrize(("overrides", "key"), MISTAKES, ids=[" ".join(o) for o, _ in MISTAKES])
def test_a_mistake_exits_2_with_one_line_before_ray_starts(tmp_path, bad_data, overrides, key):
    ray_tmp = tmp_path / "ray"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    result = run_cli(*(o.format(**bad_data) for o in overrides), cwd=tmp_path, env=env)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and key in lines[0]
    # Nothing was started: Ray would have made its session folder, the sweep its directory.
    assert not ray_tmp.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(compose, experiment):
    cfg, space = validate(compose(f"+experiment={experiment}"))
    assert cfg.name == experiment
    assert space, "an experiment searches at least one parameter"


GROUP_OPTIONS = sorted(
    f"{path.parent.name}={path.stem}" for path in (REPO / "conf").glob("*/*.yaml")
    if path.parent.name != "experiment"
)


# What an option needs from the user before it validates (a cluster's shared folder, data).
NEEDS = {"cluster=remote": ["cluster.storage_path=/mnt/shared/sweeps"],
         "data=image_folder": ["data.path={image_folder}", "data.image_size=[28,28]"],
         "data=npz": ["data.path={npz}"]}


@pytest.mark.parametrize("option", GROUP_OPTIONS)
def test_every_option_of_every_config_group_composes_and_validates(compose, option,
                                                                     tmp_path_factory):
    """Data options that read a user's files get small real ones (Fashion-MNIST images)."""
    folder = tmp_path_factory.mktemp("own_data")
    paths = {"image_folder": str(write_image_folder(folder / "images", per_class=3)),
             "npz": str(folder / "data.npz")}
    x, y = np.zeros((40, 28, 28), np.uint8), np.arange(40) % 10
    np.savez(paths["npz"], x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    _, space = validate(compose(option, *(need.format(**paths)
                                          for need in NEEDS.get(option, []))))
    assert space


def test_joining_a_cluster_without_shared_storage_is_refused(compose):
    with pytest.raises(ConfigError) as raised:
        validate(compose("cluster=remote"))
    assert raised.value.key == "cluster.storage_path"


def test_the_experiments_the_issue_names_exist():
    assert {"cnn_lr", "smoke", "cnn_tuned"} <= set(EXPERIMENTS)
    assert len(EXPERIMENTS) >= 3


def test_the_smoke_experiment_is_tiny_and_runs_on_fashion_mnist(compose, fashion_mnist_dir):
    cfg, _ = validate(compose("+experiment=smoke", "data=fashion_mnist"))
    assert cfg.data.path == str(fashion_mnist_dir)
    assert cfg.train.epochs <= 3
    assert cfg.search.num_trials <= 8
    assert cfg.data.max_train_samples is not None and cfg.data.max_train_samples <= 5000


def test_cnn_tuned_searches_the_new_knobs_for_an_hour(compose):
    cfg, space = validate(compose("+experiment=cnn_tuned", "data=fashion_mnist"))
    # 50 minutes of search, then the best config retrained on train+validation (about 9
    # minutes of the 2-core machine for its 15 epochs): the hour holds both.
    assert cfg.search.time_budget_s == 3000 and cfg.final.retrain
    assert cfg.train.epochs == 15
    assert {"model.blocks", "model.batch_norm", "model.pooling", "model.conv_dropout",
            "train.optimizer", "train.weight_decay", "train.label_smoothing",
            "train.translation", "train.erasing"} <= set(space)
    assert cfg.train.schedule == "cosine" and cfg.train.warmup_epochs == 1


def test_a_command_line_group_choice_beats_the_experiments(compose):
    """`+experiment=cnn_lr data=fashion_mnist` (as in the README) runs cnn_lr on Fashion-MNIST."""
    cfg, _ = validate(compose("+experiment=cnn_lr", "data=fashion_mnist"))
    assert (cfg.name, cfg.data.name, cfg.train.epochs) == ("cnn_lr", "fashion_mnist", 10)


def test_search_spaces_can_be_changed_from_the_command_line(compose):
    cfg, space = validate(compose("search.space.train.lr=tag(log, interval(1e-5, 1e-2))",
                                  "search.space.model.dropout=interval(0, 0.5)"))
    assert space["train.lr"].low == pytest.approx(1e-5)
    assert space["model.dropout"].high == pytest.approx(0.5)


def test_validation_errors_name_key_value_and_what_is_allowed(compose):
    with pytest.raises(ConfigError) as caught:
        validate(compose("scheduler.reduction_factor=1"))
    assert caught.value.key == "scheduler.reduction_factor"
    assert str(caught.value) == "scheduler.reduction_factor=1 is invalid: must be >= 2"


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_cli("--cfg", "job", "+experiment=smoke", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: smoke" in result.stdout
    assert "lr: tag(log, interval(1e-4, 3e-2))" in result.stdout


USER_EXPERIMENT = """\
# @package _global_
defaults:
  - override /space: wide
  - override /scheduler: none

name: mine
train:
  epochs: 4
"""


def test_a_users_own_experiment_from_config_dir(tmp_path, compose):
    from sweeper.overrides import compose_config

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)

    cfg, space = validate(compose_config(["+experiment=mine"], config_dirs=[str(tmp_path)]))
    assert (cfg.name, cfg.train.epochs, cfg.scheduler.name) == ("mine", 4, "none")
    assert {"train.batch_size", "model.filters", "model.l2"} <= set(space)

    result = run_cli("--config-dir", str(tmp_path), "+experiment=mine", "train.lr=-3",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: train.lr=-3.0 is invalid: must be a positive number"


def test_checkout_reads_conf_beside_the_package():
    assert Path(CONFIG_PATH) == REPO / "conf"


def test_configs_work_from_an_installed_wheel(tmp_path):
    # Build from a copy: an in-tree build leaves build/ behind, whose stale files later wheels ship.
    source = tmp_path / "source"
    for name in ("sweeper", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # Offline where the venv has setuptools; otherwise pip fetches it into an isolated build.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([*pip, "wheel", "--no-deps", *isolation, "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("sweeper-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    result = run_cli("--cfg", "job", "+experiment=smoke", cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr
    assert "name: smoke" in result.stdout

    where = subprocess.run(
        [sys.executable, "-c", "import sweeper.overrides as m; print(m.__file__, m.CONFIG_PATH)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.split() == [str(site / "sweeper" / "overrides.py"), "pkg://sweeper.conf"]

    result = run_cli("+experiment=cnn_wide", "train.lr=-1", cwd=elsewhere, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: train.lr=-1.0 is invalid: must be a positive number"


def test_fresh_true_runs_a_new_sweep_beside_the_old_one(compose, tmp_path, monkeypatch):
    from sweeper.cli import preflight
    from sweeper.sweep import fresh_variant

    cfg, _ = validate(compose("+experiment=smoke", "data=fashion_mnist"))
    variant = fresh_variant(cfg, stamp="20261129-060000")
    assert (variant.name, variant.sweep_dir) == ("smoke-20261129-060000",
                                                 "sweeps/smoke-20261129-060000")
    assert not variant.fresh and cfg.name == "smoke"  # the composed config is left as it was
    monkeypatch.chdir(tmp_path)  # preflight claims (creates and locks) the new sweep's folder
    argv = preflight(["+experiment=smoke", "data=fashion_mnist", "fresh=true"])
    new_name = next(arg for arg in argv if arg.startswith("name=")).removeprefix("name=")
    new_name = new_name.strip("'")  # quoted for Hydra's grammar
    assert new_name.startswith("smoke-") and f"sweep_dir='sweeps/{new_name}'" in argv
    assert argv[-1] == "fresh=false"
    assert (tmp_path / "sweeps" / new_name / ".sweep.lock").is_file()
