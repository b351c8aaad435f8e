"""The command line's overrides to a composed Hydra config, as ``python -m sweeper`` reads them.

Search-space expressions and text settings (names, paths) are quoted for Hydra's grammar,
Hydra's own flags are told apart from overrides, and Hydra's and OmegaConf's multi-line
composition errors become one ``KEY=VALUE is invalid: WHAT IS ALLOWED`` line. Used by
:func:`sweeper.compose` and the CLI; imports no Ray and no TensorFlow.
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import DictConfig

from sweeper.config import closest_setting, register_configs

_CHECKOUT_CONF = Path(__file__).resolve().parent.parent / "conf"
# A checkout (or editable install) reads conf/ beside the package; a wheel ships it as sweeper.conf.
CONFIG_PATH = str(_CHECKOUT_CONF) if (_CHECKOUT_CONF / "config.yaml").is_file() else "pkg://sweeper.conf"
CONFIG_NAME = "config"
register_configs()

# Hydra reads `key=interval(...)` as a sweep of the app itself; search-space values are quoted
# so that `search.space.train.lr=tag(log, interval(1e-5, 1e-2))` reaches us as a string.
_SPACE_OVERRIDE = re.compile(r"^\+{0,2}(search\.space\.[\w.]+)=(.*)$")
# Hydra flags after which the run is Hydra's business (help, printing the config, multirun).
_HYDRA_ONLY_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i",
                     "--shell-completion", "-sc", "--multirun", "-m", "--version"}

# Settings whose values are names, paths, URLs or addresses: Hydra's grammar reads unquoted
# values as its own syntax and refuses `~` and non-ASCII letters, so `name=über-lauf` or
# `sweep_dir=~/sweeps` failed with Hydra's "token recognition error" (issue 20). They reach
# Hydra quoted, as the user meant them (`${...}` interpolations still work inside quotes).
TEXT_KEYS = ("name", "sweep_dir", "data.path", "data.url", "data.sha256", "cluster.address",
             "cluster.storage_path", "search.storage", "search.warm_start",
             "search.warm_start_study")
_TEXT_OVERRIDE = re.compile(
    r"^(\+{0,2})(" + "|".join(re.escape(key) for key in TEXT_KEYS) + r")=(.*)$")


def hydra_quoted(value: str) -> str:
    """``value`` as one single-quoted string of Hydra's override grammar.

    Hydra unescapes a backslash only before a quote or at the end of a quoted string, so
    those backslashes are doubled and the quotes escaped; all others stay as they are.
    """
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"


def quote_space_overrides(argv: list[str]) -> list[str]:
    """Quote search-space expressions and text settings (names, paths) for Hydra, and let
    search-space expressions add parameters without ``+``."""
    quoted = []
    for arg in argv:
        space, text = _SPACE_OVERRIDE.match(arg), _TEXT_OVERRIDE.match(arg)
        if space:
            key, value = space.groups()
            if not value.startswith(("'", '"')):
                value = hydra_quoted(value)
            arg = f"++{key}={value}"
        elif text:
            plus, key, value = text.groups()
            if value and value != "null" and not value.startswith(("'", '"')):
                arg = f"{plus}{key}={hydra_quoted(value)}"
        quoted.append(arg)
    return quoted


def split_hydra_args(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """Separate overrides from Hydra flags; returns (overrides, extra config dirs, hydra_only)."""
    overrides, config_dirs, hydra_only = [], [], False
    args = iter(argv)
    for arg in args:
        if arg in ("--config-dir", "-cd"):
            config_dirs.append(next(args, ""))
        elif arg.startswith("--config-dir="):
            config_dirs.append(arg.split("=", 1)[1])
        elif arg.split("=", 1)[0] in _HYDRA_ONLY_FLAGS or arg.startswith("-"):
            hydra_only = True
        else:
            overrides.append(arg)
    return overrides, config_dirs, hydra_only


def compose_config(overrides: list[str], config_dirs: list[str] | None = None) -> DictConfig:
    """Compose the sweep config as ``python -m sweeper`` would (for pre-flight checks and tests)."""
    overrides = list(overrides)
    if config_dirs:
        dirs = ",".join(f"file://{Path(d).expanduser().resolve()}" for d in config_dirs)
        overrides.append(f"hydra.searchpath=[{dirs}]")
    GlobalHydra.instance().clear()
    if CONFIG_PATH.startswith("pkg://"):
        context = initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3")
    else:
        context = initialize_config_dir(CONFIG_PATH, version_base="1.3")
    with context:
        return compose(config_name=CONFIG_NAME, overrides=overrides)


def describe_composition_error(error: BaseException, overrides: list[str] | None = None) -> str:
    """Hydra's and OmegaConf's multi-line composition errors as one line, ``KEY=VALUE is
    invalid: WHAT IS ALLOWED`` wherever the error names its key: a value of the wrong type
    (OmegaConf's ValidationError), a key the schema does not have (with the closest
    setting, when one is close), a config group option that does not exist."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if isinstance(error, MissingConfigException) and error.options:
        group = (error.missing_cfg_file or "").rsplit("/", 1)[0]
        return (f"{group}={error.missing_cfg_file.rsplit('/', 1)[-1]} is invalid: not a config "
                f"option; allowed: {', '.join(sorted(error.options))}")
    seen: BaseException | None = error
    while seen is not None:
        key = getattr(seen, "full_key", None)
        first = str(getattr(seen, "msg", "") or "").strip().splitlines()[:1]
        if key and first and isinstance(seen, ValidationError):
            return f"{key}={getattr(seen, 'value', None)!r} is invalid: {first[0].rstrip('.')}"
        if key and isinstance(seen, (ConfigAttributeError, ConfigKeyError)):
            return f"{_as_typed(key, overrides)} is invalid: no such setting{closest_setting(key)}"
        seen = seen.__cause__ or seen.__context__
    parts: list[str] = []
    seen = error
    while seen is not None and len(parts) < 2:
        lines = [line.strip() for line in str(seen).splitlines() if line.strip()]
        # OmegaConf repeats its message as a template ('$VALUE'); the filled-in one came first.
        if lines and "$" not in lines[0]:
            parts.append(lines[0].rstrip("."))
        seen = seen.__cause__ or seen.__context__
    return ": ".join(dict.fromkeys(parts)) or type(error).__name__


def _as_typed(key: str, overrides: list[str] | None) -> str:
    """``KEY=VALUE`` as the user wrote it on the command line, or the key alone."""
    for override in overrides or []:
        name, _, value = override.lstrip("+~").partition("=")
        if name == key or name.startswith(f"{key}."):
            return f"{name}={value}"
    return key
