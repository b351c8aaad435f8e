"""The model builder contract: ``model._target_`` names a function that returns a Keras model.

A builder is called as ``builder(input_shape, num_classes, **settings)``, where
``input_shape`` is ``(H, W, C)`` of float32 images in [0, 1] and ``settings`` are the model
config's other keys (``_target_`` and ``from_logits`` are sweeper's own). The classic CNN is
one such builder, :func:`sweeper.model.cnn`. Resolving and checking a builder imports the
user's module, not Keras, so the default CNN's checks stay as cheap as they were.
"""

from __future__ import annotations

import importlib
import inspect
import site
import sys
import sysconfig
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sweeper.compat import startup_noise_filtered
from sweeper.config import CNN_TARGET, ConfigError, ModelConfig

# Keys of a model config that sweeper reads itself; a builder gets them only if it asks.
SWEEPER_KEYS = ("_target_", "from_logits")
# The first two positional parameters every builder takes; never config keys.
BUILDER_INPUTS = ("input_shape", "num_classes")


def model_settings(model: ModelConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Every key of a model config, ``_target_`` included, as a plain dict."""
    return asdict(model) if isinstance(model, ModelConfig) else dict(model)


def model_target(model: ModelConfig | Mapping[str, Any]) -> str:
    return str(model_settings(model).get("_target_") or "")


def from_logits(model: ModelConfig | Mapping[str, Any]) -> bool:
    """Whether the builder's outputs are logits (``from_logits: true``), not probabilities."""
    return bool(model_settings(model).get("from_logits", False))


def resolve_builder(target: str) -> Callable[..., Any]:
    """Import ``module.function`` named by ``model._target_``.

    Raises:
        ConfigError: The module cannot be imported (with its own error message), or has no
            such function, or it is not callable.
    """
    module_name, _, function_name = target.rpartition(".")
    if not module_name or not function_name:
        raise ConfigError("model._target_", target,
                          "must name a function as module.function, e.g. my_models.small_resnet")
    try:
        # A user's module imports Keras, so TensorFlow starts here on the driver: without its
        # start-up noise before the one line a mistake gets.
        with startup_noise_filtered():
            module = importlib.import_module(module_name)
    except Exception as error:  # the user's module may fail with any error while importing
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError("model._target_", target,
                          f"cannot import {module_name} ({type(error).__name__}: {message}); "
                          "run from the folder that holds it, or install it") from None
    if not hasattr(module, function_name):
        raise ConfigError("model._target_", target,
                          f"module {module_name} ({_where(module)}) has no {function_name}")
    builder = getattr(module, function_name)
    if not callable(builder):
        raise ConfigError("model._target_", target,
                          f"{module_name}.{function_name} is a {type(builder).__name__}, "
                          "not a function that returns a keras.Model")
    return builder


def builder_kwargs(model: ModelConfig | Mapping[str, Any],
                   builder: Callable[..., Any]) -> dict[str, Any]:
    """The keyword arguments ``builder`` gets from a model config."""
    accepts = _parameters(builder)
    return {key: value for key, value in model_settings(model).items()
            if key not in SWEEPER_KEYS or (accepts is not None and key in accepts)}


def check_builder(model: ModelConfig | Mapping[str, Any],
                  searched: Mapping[str, Any] | None = None) -> None:
    """Refuse a builder that cannot be imported, or keys it does not take.

    Args:
        model: The model config.
        searched: The model settings the search space samples (names without ``model.``)
            and their search-space expressions.

    Raises:
        ConfigError: Naming ``model._target_``, ``model.KEY`` or ``search.space.model.KEY``.
    """
    target = model_target(model)
    if not target:
        raise ConfigError("model._target_", None, "a model config needs _target_: "
                          "module.function (the function that builds the model)")
    if target == CNN_TARGET and isinstance(model, ModelConfig):
        return  # typed by ModelConfig; importing its builder would import Keras here
    builder = resolve_builder(target)
    accepts = _parameters(builder)
    if accepts is None:
        return  # **kwargs: any key is welcome
    taken = ", ".join(name for name in accepts if name not in BUILDER_INPUTS) or "nothing else"
    settings = model_settings(model)
    for key, value in settings.items():
        if key not in SWEEPER_KEYS and key not in accepts:
            raise ConfigError(f"model.{key}", value,
                              f"not a parameter of {target}; it takes {taken}")
    for key, expression in (searched or {}).items():
        if key not in accepts and key not in settings:
            raise ConfigError(f"search.space.model.{key}", expression,
                              f"not a parameter of {target}; it takes {taken}")
    signature = inspect.signature(builder)
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2:
        raise ConfigError("model._target_", target,
                          "must take (input_shape, num_classes, **settings)")
    for name in list(accepts)[2:]:
        parameter = signature.parameters[name]
        if (parameter.default is inspect.Parameter.empty and name not in settings
                and name not in searched and parameter.kind is not parameter.VAR_POSITIONAL):
            raise ConfigError(f"model.{name}", None, f"{target} needs it; set it in the model "
                                                     f"config or with +model.{name}=VALUE")


def parameter_default(model: ModelConfig | Mapping[str, Any], name: str) -> Any:
    """The builder's default for parameter ``name`` (None when it has none)."""
    builder = resolve_builder(model_target(model))
    parameter = inspect.signature(builder).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def _parameters(builder: Callable[..., Any]) -> list[str] | None:
    """Names the builder takes by keyword, in order; None when it takes ``**kwargs``."""
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return None  # a builtin or C function: let the call decide
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _where(module: Any) -> str:
    return getattr(module, "__file__", None) or "a namespace package"


def _installed_roots() -> list[Path]:
    roots = [*site.getsitepackages(), site.getusersitepackages()]
    roots += [sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib")]
    return [Path(root).resolve() for root in roots if root]


def code_to_ship(model: ModelConfig | Mapping[str, Any]) -> Path | None:
    """The file or package folder of the model's builder that workers on other nodes lack:
    None for sweeper's own CNN and for builders of installed packages (the workers have
    those the way they have sweeper)."""
    target = model_target(model)
    top = target.split(".", 1)[0]
    if target == CNN_TARGET or top == "sweeper":
        return None
    resolve_builder(target)  # imports it, or says why not
    module = sys.modules[top]
    location = getattr(module, "__file__", None)
    if location is None:
        return None  # a namespace package: nothing to point at
    path = Path(location).resolve()
    if any(root == path or root in path.parents for root in _installed_roots()):
        return None
    return path.parent if path.name == "__init__.py" else path


def runtime_env(model: ModelConfig | Mapping[str, Any]) -> dict[str, Any] | None:
    """Ray's runtime environment that ships the builder's code to every worker, or None.

    ``py_modules`` takes the module's file or its top-level package folder: only the user's
    code travels, not the folder it was run from (which holds the sweeps and maybe data).
    """
    code = code_to_ship(model)
    return None if code is None else {"py_modules": [str(code)]}
