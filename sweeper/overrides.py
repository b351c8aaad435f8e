"""The command line's overrides to a composed Hydra config, as ``python -m sweeper`` reads them.

Search-space expressions and text settings (names, paths) are quoted for Hydra's grammar,
Hydra's own flags are told apart from overrides, and Hydra's and OmegaConf's multi-line
composition errors become one ``KEY=VALUE is invalid: WHAT IS ALLOWED`` line. Used by
:func:`sweeper.compose` and the CLI; imports no Ray and no TensorFlow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import DictConfig

from sweeper.config import ConfigError, closest_setting, register_configs

_CHECKOUT_CONF = Path(__file__).resolve().parent.parent / "conf"
# A checkout (or editable install) reads conf/ beside the package; a wheel ships it as sweeper.conf.
CONFIG_PATH = str(_CHECKOUT_CONF) if (_CHECKOUT_CONF / "config.yaml").is_file() else "pkg://sweeper.conf"
CONFIG_NAME = "config"
register_configs()

# Hydra reads `key=interval(...)` as a sweep of the app itself; search-space values are quoted
# so that `search.space.train.lr=tag(log, interval(1e-5, 1e-2))` reaches us as a string.
_SPACE_OVERRIDE = re.compile(r"^\+{0,2}(search\.space\.[\w.]+)=(.*)$")

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


@dataclass(frozen=True)
class _Flag:
    """One of Hydra's command-line flags as ``python -m sweeper`` treats it."""

    names: tuple[str, ...]  # the long name first
    takes: str = ""  # what its value is, for messages; "" for a switch
    choices: tuple[str, ...] = ()
    optional: bool = False  # its value may be left out (--info)
    prints: bool = False  # Hydra prints something and runs no sweep (--cfg, --help)
    refused: str = ""  # why sweeper does not take it, with what to do instead


_FLAGS = (
    _Flag(("--help", "-h"), prints=True),
    _Flag(("--hydra-help",), prints=True),
    _Flag(("--version",), prints=True),
    _Flag(("--cfg", "-c"), "job|hydra|all", ("job", "hydra", "all"), prints=True),
    _Flag(("--resolve",)),
    _Flag(("--package", "-p"), "PACKAGE"),
    _Flag(("--info", "-i"), "TOPIC", ("all", "config", "defaults", "defaults-tree",
                                       "plugins", "searchpath"), optional=True, prints=True),
    _Flag(("--shell-completion", "-sc"), prints=True),
    _Flag(("--run", "-r")),
    _Flag(("--config-dir", "-cd"), "FOLDER"),
    _Flag(("--config-name", "-cn"), "NAME"),
    _Flag(("--multirun", "-m"), refused="sweeper runs the search itself; say what to search "
          "with search.space.KEY=EXPR (choice, range, interval) and how many trials with "
          "search.num_trials=N"),
    _Flag(("--config-path", "-cp"), "FOLDER", refused="sweeper's own configs are always "
          "read; add a folder of your own beside them with --config-dir FOLDER"),
    _Flag(("--experimental-rerun",), "FILE", refused="a sweep is resumed by running its "
          "command again"),
)
_FLAG_BY_NAME = {name: flag for flag in _FLAGS for name in flag.names}
OPTIONS_HELP = ("--config-dir FOLDER, --config-name NAME, --cfg job|hydra|all [--resolve] "
                "[--package PACKAGE], --info [TOPIC], --help, --hydra-help")


@dataclass
class CommandLine:
    """``python -m sweeper``'s arguments: Hydra's flags and the overrides, which may come in
    any order (Hydra's own parser takes no override after a flag's value).

    Attributes:
        overrides: The overrides in the order given (``key=value``, ``+experiment=NAME``).
        config_dirs: ``--config-dir`` folders, as given.
        config_name: ``--config-name``, the primary config (default: sweeper's ``config``).
        flags: Hydra's other flags, each as ``--long-name`` or ``--long-name=value``.
    """

    overrides: list[str] = field(default_factory=list)
    config_dirs: list[str] = field(default_factory=list)
    config_name: str = CONFIG_NAME
    flags: list[str] = field(default_factory=list)

    @property
    def prints_only(self) -> bool:
        """Hydra prints something (help, the config, its info) and no sweep runs."""
        return any(_FLAG_BY_NAME[flag.split("=", 1)[0]].prints for flag in self.flags)

    @property
    def composes(self) -> bool:
        """The printing asks Hydra to compose the config (--cfg, --info), so an override's
        mistake shows there too."""
        return any(flag.split("=", 1)[0] in ("--cfg", "--info") for flag in self.flags)

    def hydra_argv(self) -> list[str]:
        """The arguments for Hydra's own parser: flags first, then the overrides. More than
        one --config-dir (Hydra's flag takes one) reaches Hydra as ``hydra.searchpath``."""
        argv = list(self.flags)
        if self.config_name != CONFIG_NAME:
            argv.append(f"--config-name={self.config_name}")
        overrides = list(self.overrides)
        if len(self.config_dirs) == 1:
            argv.append(f"--config-dir={self.config_dirs[0]}")
        elif self.config_dirs:
            overrides.append(searchpath_override(self.config_dirs))
        return [*argv, *overrides]


def parse_command_line(argv: list[str]) -> CommandLine:
    """Read ``python -m sweeper``'s arguments, flags and overrides in any order.

    Args:
        argv: The arguments after ``python -m sweeper``, overrides already quoted for Hydra
            (:func:`quote_space_overrides`).

    Raises:
        ConfigError: One line naming the argument and what is allowed: an unknown flag, a flag
            without its value or with a value it does not take, a --config-dir that is not a
            folder, or a flag sweeper does not take (--multirun).
    """
    command, args = CommandLine(), list(reversed(argv))
    while args:
        arg = args.pop()
        if not arg.startswith("-"):
            command.overrides.append(arg)
            continue
        name, has_value, value = arg.partition("=")
        flag = _FLAG_BY_NAME.get(name)
        if flag is None:
            raise ConfigError.from_line(f"{arg} is invalid: not an option of python -m sweeper"
                                        f"{_closest_flag(name)}; options: {OPTIONS_HELP}; "
                                        "every other argument is an override KEY=VALUE")
        if flag.refused:
            raise ConfigError.from_line(f"{name} is invalid: {flag.refused}")
        if flag.takes and not has_value:
            if flag.optional and (not args or args[-1] not in flag.choices):
                value = flag.choices[0]  # --info's topic may be left out
            elif not args or args[-1].split("=", 1)[0] in _FLAG_BY_NAME:
                raise ConfigError.from_line(f"{name} is invalid: it needs a value: "
                                            f"{name} {flag.takes}")
            else:
                value = args.pop()
        elif not flag.takes and has_value:
            raise ConfigError.from_line(f"{arg} is invalid: {name} takes no value")
        if flag.choices and value not in flag.choices:
            raise ConfigError.from_line(f"{name}={value} is invalid: allowed: "
                                        f"{', '.join(flag.choices)}")
        long_name = flag.names[0]
        if long_name == "--config-dir":
            folder = Path(value).expanduser()
            if not folder.is_dir():
                raise ConfigError.from_line(
                    f"--config-dir={value} is invalid: {folder.resolve()} is not a folder; "
                    "give the folder that holds your config groups (model/, experiment/, ...)")
            command.config_dirs.append(str(folder))
        elif long_name == "--config-name":
            command.config_name = value
        elif long_name != "--run":  # Hydra's default: running the app
            command.flags.append(f"{long_name}={value}" if flag.takes else long_name)
    return command


def _closest_flag(name: str) -> str:
    import difflib

    match = difflib.get_close_matches(name, _FLAG_BY_NAME, n=1, cutoff=0.8)
    return f" (did you mean {match[0]}?)" if match else ""


def searchpath_override(config_dirs: list[str]) -> str:
    """``hydra.searchpath=[...]``: Hydra also reads configs from ``config_dirs``."""
    folders = ",".join(f"file://{Path(d).expanduser().resolve()}" for d in config_dirs)
    return f"hydra.searchpath=[{folders}]"


def compose_config(overrides: list[str], config_dirs: list[str] | None = None,
                   config_name: str = CONFIG_NAME) -> DictConfig:
    """Compose the sweep config as ``python -m sweeper`` would (for pre-flight checks and
    tests); ``config_name`` is ``--config-name``, the primary config, read from sweeper's
    conf/ or else from the first of ``config_dirs`` that holds it (a sweep folder's
    ``best_config``)."""
    folders = [Path(d).expanduser().resolve() for d in config_dirs or []]
    primary = next((folder for folder in folders if config_name != CONFIG_NAME
                    and (folder / f"{config_name}.yaml").is_file()), None)
    searched = [f"file://{folder}" for folder in folders if folder != primary]
    GlobalHydra.instance().clear()
    if primary is not None:
        # Hydra's compose finds its primary config only in the folder it was initialized
        # with (hydra.searchpath extends the search for the others); sweeper's conf/ is searched
        # next, as under Hydra's own --config-dir.
        searched.insert(0, CONFIG_PATH if CONFIG_PATH.startswith("pkg://")
                        else f"file://{CONFIG_PATH}")
        context = initialize_config_dir(str(primary), version_base="1.3")
    elif CONFIG_PATH.startswith("pkg://"):
        context = initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3")
    else:
        context = initialize_config_dir(CONFIG_PATH, version_base="1.3")
    if searched:
        overrides = [*overrides, f"hydra.searchpath=[{','.join(searched)}]"]
    with context:
        return compose(config_name=config_name, overrides=overrides)


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
    if isinstance(error, MissingConfigException) and not error.options and "primary" in str(
            error):
        name = error.missing_cfg_file
        return (f"--config-name={name} is invalid: no config {name}.yaml in sweeper's conf/ "
                "or a --config-dir folder")
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
