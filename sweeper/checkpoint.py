"""Trial checkpoints: the model's and the optimizer's variables in one NumPy archive.

Trials checkpoint every epoch, so writing one must cost little next to an epoch: the
variables as an ``.npz`` cost a fraction of a Keras archive (``.keras``: h5py and zip
bookkeeping; benchmarks/fixed_costs.py measures both). The architecture is not stored: the
trial's config rebuilds it (:func:`sweeper.trainer.build_model`), and the sweep exports the
best trial's model as a ``.keras`` file anyone can load.

Each array is keyed by its variable's path (``model/cnn/conv2d/kernel``,
``optimizer/model/cnn/conv2d/kernel:momentum``), never by its position: Adam's momentum and
velocity have the same shapes, so a Keras upgrade that reordered them would load silently
wrong by position. The Keras version that wrote a checkpoint is recorded; a checkpoint whose
keys or shapes do not fit the model is refused (:class:`CheckpointMismatch`), never loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

VARIABLES_FILE = "variables.npz"
STATE_FILE = "state.json"
FORMAT = "sweeper-variables-by-path/1"
_MODEL, _OPTIMIZER = "model", "optimizer"
_AUTO_SUFFIX = re.compile(r"_\d+$")


class CheckpointMismatch(ValueError):
    """The checkpoint's variables do not fit the model they are loaded into."""


def variables_by_key(model) -> dict[str, object]:
    """Every variable of a compiled ``model`` and its optimizer, by a key that is the same for
    every build of the same architecture.

    Keras names layers uniquely within a process (``conv2d``, then ``conv2d_3`` in the next
    model built), so each path component is numbered anew within this model, in order of
    appearance (``conv2d_3`` -> ``conv2d``, ``conv2d_4`` -> ``conv2d_1``). An optimizer slot
    (``adam_1/cnn_conv2d_3_kernel_momentum``) is keyed by its model variable's key and the
    slot's name; the optimizer's own variables (``iteration``) by their names. Under
    ``mixed_float16`` Keras wraps the optimizer in a LossScaleOptimizer: the inner optimizer's
    variables are keyed as without it, the wrapper's loss scale (``dynamic_scale``,
    ``step_counter``) by its names; the wrapper's own ``iteration`` and ``learning_rate``,
    which it keeps but never uses (its step count and rate are the inner optimizer's), are
    left out rather than keyed like the inner optimizer's.
    """
    from sweeper.model import base_optimizer

    canonical: dict[str, str] = {}
    seen: dict[str, int] = {}

    def stable(part: str) -> str:
        if part not in canonical:
            base = _AUTO_SUFFIX.sub("", part)
            count = seen.get(base, 0)
            seen[base] = count + 1
            canonical[part] = base if count == 0 else f"{base}_{count}"
        return canonical[part]

    keyed: dict[str, object] = {}
    slot_owner: dict[str, str] = {}  # a model variable's path as slot names spell it -> key
    for variable in model.weights:
        key = f"{_MODEL}/" + "/".join(stable(part) for part in variable.path.split("/"))
        keyed[key] = variable
        slot_owner[variable.path.replace("/", "_")] = key
    inner = base_optimizer(model.optimizer)
    own = {id(variable) for variable in inner.variables}
    wrapper = [variable for variable in model.optimizer.variables if id(variable) not in own]
    for variable in [*inner.variables, *wrapper]:
        name = variable.path.split("/", 1)[-1]  # without the optimizer's own (numbered) name
        owner = next((path for path in sorted(slot_owner, key=len, reverse=True)
                      if name.startswith(f"{path}_")), None)
        key = (f"{_OPTIMIZER}/{slot_owner[owner]}:{name[len(owner) + 1:]}" if owner
               else f"{_OPTIMIZER}/{name}")
        keyed.setdefault(key, variable)
    return keyed


def save(model, folder: Path, epoch: int) -> None:
    """Write ``model``'s weights, its optimizer's state and the epoch count into ``folder``."""
    import keras

    arrays = {key: variable.numpy() for key, variable in variables_by_key(model).items()}
    np.savez(Path(folder) / VARIABLES_FILE, **arrays)
    (Path(folder) / STATE_FILE).write_text(json.dumps(
        {"epoch": epoch, "format": FORMAT, "keras": keras.__version__}))


def exists(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint this module can restore."""
    return (Path(folder) / VARIABLES_FILE).is_file()


def epoch_of(folder: Path) -> int:
    return int(json.loads((Path(folder) / STATE_FILE).read_text())["epoch"])


def load_into(model, folder: Path) -> None:
    """Set a compiled ``model`` of the checkpoint's architecture to the saved state.

    Raises:
        CheckpointMismatch: The checkpoint is of another format, or its variables' keys or
            shapes differ from the model's (the message names the Keras versions).
    """
    import keras

    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    written_by = f"written by Keras {state.get('keras', 'of an earlier sweeper')}"
    if state.get("format") != FORMAT:
        raise CheckpointMismatch(f"{folder}: a checkpoint of another layout ({written_by}, "
                                 f"format {state.get('format')!r}, expected {FORMAT!r}); "
                                 "start the sweep anew (fresh=true)")
    optimizer = model.optimizer
    # build_model creates the slots; a model compiled elsewhere has none until its first step.
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    variables = variables_by_key(model)
    with np.load(folder / VARIABLES_FILE) as archive:
        saved = {name: archive[name] for name in archive.files}
    if set(saved) != set(variables):
        differ = sorted(set(saved) ^ set(variables))
        raise CheckpointMismatch(
            f"{folder}: its variables ({written_by}) are not the model's (Keras "
            f"{keras.__version__}): {', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}")
    for key, variable in variables.items():
        if tuple(variable.shape) != saved[key].shape:
            raise CheckpointMismatch(f"{folder}: variable {key} has shape "
                                     f"{tuple(variable.shape)}, saved {saved[key].shape}")
    for key, variable in variables.items():
        variable.assign(saved[key])


def restore(folder: Path, build):
    """The model of a checkpoint and the epochs it had trained.

    ``build`` makes a freshly compiled model of the trial's architecture.
    """
    model = build()
    load_into(model, folder)
    return model, epoch_of(folder)
