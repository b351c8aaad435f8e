"""Trial checkpoints: a restored model continues exactly where the saved one stopped."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sweeper import checkpoint
from sweeper.config import SweepConfig
from sweeper.trainer import build_model, make_dataset, train


def config(seed: int = 0, filters: int = 32) -> SweepConfig:
    cfg = SweepConfig()
    cfg.train.epochs, cfg.train.batch_size, cfg.train.seed = 1, 64, seed
    cfg.model.filters = filters
    return cfg


def variables(model) -> list[np.ndarray]:
    return [v.numpy() for v in [*model.weights, *model.optimizer.variables]]


def one_more_epoch(model, splits) -> list[np.ndarray]:
    model.fit(make_dataset(splits.x_train, splits.y_train, 64), epochs=1, verbose=0, shuffle=False)
    return variables(model)


def test_restored_model_continues_like_the_saved_one(small_splits, tmp_path):
    trained = train(config(), small_splits)
    checkpoint.save(trained, tmp_path, epoch=1)

    # Built from another seed, so every value must come from the checkpoint.
    restored, epoch = checkpoint.restore(tmp_path,
                                         lambda: build_model(config(seed=7), (28, 28), 10))
    assert epoch == 1
    saved, loaded = variables(trained), variables(restored)
    assert len(saved) == len(loaded)
    assert all(np.array_equal(a, b) for a, b in zip(saved, loaded, strict=True))
    assert int(restored.optimizer.iterations) == int(trained.optimizer.iterations) > 0

    after_saved, after_restored = one_more_epoch(trained, small_splits), one_more_epoch(
        restored, small_splits)
    assert all(np.allclose(a, b, atol=1e-6)
               for a, b in zip(after_saved, after_restored, strict=True))


def test_a_checkpoint_does_not_load_into_another_architecture(small_splits, tmp_path):
    checkpoint.save(build_model(config(), (28, 28), 10), tmp_path, epoch=0)
    with pytest.raises(checkpoint.CheckpointMismatch, match="shape"):
        checkpoint.restore(tmp_path, lambda: build_model(config(filters=16), (28, 28), 10))


def test_variables_are_keyed_by_path_the_same_for_every_build(small_splits, tmp_path):
    """A second build in one process names its layers conv2d_3...; the keys stay the same,
    and Adam's two slots of each weight have keys of their own (not positions)."""
    first, second = build_model(config(), (28, 28), 10), build_model(config(), (28, 28), 10)
    keys = list(checkpoint.variables_by_key(first))
    assert keys == list(checkpoint.variables_by_key(second))
    assert "model/cnn/conv2d/kernel" in keys and "model/cnn/conv2d_1/kernel" in keys
    assert {"optimizer/model/cnn/conv2d/kernel:momentum",
            "optimizer/model/cnn/conv2d/kernel:velocity", "optimizer/iteration"} <= set(keys)

    trained = train(config(), small_splits)
    checkpoint.save(trained, tmp_path, epoch=1)
    state = json.loads((tmp_path / checkpoint.STATE_FILE).read_text())
    assert state["format"] == checkpoint.FORMAT and state["keras"]
    # Stored in another order (as a Keras upgrade might list them): loaded by key all the same.
    with np.load(tmp_path / checkpoint.VARIABLES_FILE) as archive:
        arrays = {name: archive[name] for name in reversed(archive.files)}
    np.savez(tmp_path / checkpoint.VARIABLES_FILE, **arrays)
    restored, _ = checkpoint.restore(tmp_path, lambda: build_model(config(seed=3), (28, 28), 10))
    assert all(np.array_equal(a, b)
               for a, b in zip(variables(trained), variables(restored), strict=True))


def test_a_checkpoint_of_another_layout_is_refused_not_loaded(tmp_path):
    """Checkpoints keyed by position (sweeper before issue 21) name no format: refused."""
    model = build_model(config(), (28, 28), 10)
    np.savez(tmp_path / checkpoint.VARIABLES_FILE,
             **{f"model_{i:04d}": v.numpy() for i, v in enumerate(model.weights)})
    (tmp_path / checkpoint.STATE_FILE).write_text(json.dumps({"epoch": 1}))
    with pytest.raises(checkpoint.CheckpointMismatch, match="another layout"):
        checkpoint.restore(tmp_path, lambda: build_model(config(), (28, 28), 10))


def test_an_empty_folder_is_no_checkpoint(tmp_path):
    assert not checkpoint.exists(tmp_path)
