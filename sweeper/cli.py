"""``python -m sweeper [overrides]``: compose the config, check it, run the sweep, show results.

``python -m sweeper report SWEEP_DIR`` rebuilds a finished sweep's summary and report.

A user's mistake (bad override, value, search space or dataset) ends with one
line on stderr and exit code 2, before Ray starts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf

from sweeper.config import ConfigError, closest_setting, register_configs

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

_CHECKOUT_CONF = Path(__file__).resolve().parent.parent / "conf"
# A checkout (or editable install) reads conf/ beside the package; a wheel ships it as sweeper.conf.
CONFIG_PATH = str(_CHECKOUT_CONF) if (_CHECKOUT_CONF / "config.yaml").is_file() else "pkg://sweeper.conf"
CONFIG_NAME = "config"

# Hydra reads `key=interval(...)` as a sweep of the app itself; search-space values are quoted
# so that `search.space.train.lr=tag(log, interval(1e-5, 1e-2))` reaches us as a string.
_SPACE_OVERRIDE = re.compile(r"^\+{0,2}(search\.space\.[\w.]+)=(.*)$")
# Hydra flags after which the run is Hydra's business (help, printing the config, multirun).
_HYDRA_ONLY_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i",
                     "--shell-completion", "-sc", "--multirun", "-m", "--version"}

register_configs()
logger = logging.getLogger("sweeper")

LOCK_FILE, LOCK_OWNER_FILE = ".sweep.lock", ".sweep.lock.owner"
# Held from before Hydra writes into the sweep folder until the process ends: one driver per
# sweep folder. The kernel releases it when the process dies, SIGKILL included.
_sweep_lock = None
# The folder this run created for a new sweep: removed again if the run is refused or fails
# before any trial ran, so a mistake leaves no half-made sweep behind.
_created_dir: Path | None = None


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


def preflight(argv: list[str]) -> list[str]:
    """Compose and validate before Hydra runs anything; exits 2 with one line on a mistake.

    Returns the arguments to run with: ``fresh=true`` becomes an explicit new name and folder,
    so that Hydra's own files land in the new sweep's folder too.
    """
    overrides, config_dirs, hydra_only = split_hydra_args(argv)
    if hydra_only:
        return argv
    try:
        cfg = compose_config(overrides, config_dirs)
    except Exception as error:  # Hydra and OmegaConf raise many types for a user's mistake
        _exit_usage(describe_composition_error(error, overrides))
    finally:
        GlobalHydra.instance().clear()
    from sweeper.sweep import (
        COMPLETE,
        SweepOutcome,
        check_sweep_dir,
        fresh_variant,
        sweep_state,
        validate,
    )
    from sweeper.tuner import SweepPaths

    try:
        typed, _ = validate(cfg)
        if typed.sweep_dir.startswith("~"):
            # Hydra makes its run folder (.hydra/, sweep.log) from sweep_dir as written: a
            # folder named "~" in the current one. Give it the path the sweep is written to.
            typed.sweep_dir = str(Path(typed.sweep_dir).expanduser())
            argv = [*argv, f"sweep_dir={hydra_quoted(typed.sweep_dir)}"]
        if typed.fresh:
            typed = fresh_variant(typed)
            argv = [*argv, f"name={hydra_quoted(typed.name)}",
                    f"sweep_dir={hydra_quoted(typed.sweep_dir)}", "fresh=false"]
        root = SweepPaths.for_config(typed).root
        check_sweep_dir(typed, root)
    except ConfigError as error:
        _exit_usage(str(error))
    except Exception as error:  # e.g. OmegaConf type errors surfacing on conversion
        _exit_usage(describe_composition_error(error))
    if sweep_state(root) == COMPLETE:
        # Nothing to run: report it without Hydra, which would rewrite the sweep's .hydra/
        # and append to its sweep.log.
        report_outcome(SweepOutcome(summary=json.loads((root / "summary.json").read_text()),
                                    table="", sweep_dir=root, state="already_complete"))
        sys.exit(0)
    _claim(typed)
    return argv


def _claim(cfg) -> None:
    """Take the sweep folder's lock before Hydra writes into it; exit 2 if another driver holds
    it (the same sweep started twice would otherwise resume it as interrupted and train the
    same trials twice)."""
    global _sweep_lock, _created_dir
    from filelock import FileLock, Timeout

    from sweeper.tuner import SweepPaths

    folder = SweepPaths.for_config(cfg).root
    created = None if folder.exists() else folder
    while created is not None and not created.parent.exists():
        created = created.parent  # the topmost folder this run makes
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / LOCK_FILE)
        lock.acquire(timeout=0)
    except Timeout:
        owner = folder / LOCK_OWNER_FILE
        who = owner.read_text().strip() if owner.is_file() else "another process"
        _exit_usage(f"name={cfg.name!r} is invalid: a sweep is running in {folder} ({who}); "
                    "wait for it to end, or choose another name=...")
    except OSError as error:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        _exit_usage(f"sweep_dir={str(folder)!r} is invalid: cannot create or lock it "
                    f"({error.strerror or error})")
    (folder / LOCK_OWNER_FILE).write_text(f"process {os.getpid()} on {socket.gethostname()}\n")
    _sweep_lock, _created_dir = lock, created


def _remove_created_dir() -> None:
    """Remove the folder this run made for a new sweep that was refused before training."""
    if _created_dir is not None and _created_dir.is_dir():
        shutil.rmtree(_created_dir, ignore_errors=True)


def _exit_usage(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


_user_argv: list[str] = []  # the arguments as the user gave them, for the resume command


def resume_command() -> str:
    """The command that resumes this sweep, quoted so that pasting it into a shell works
    whatever the name, paths or search-space expressions hold."""
    return "python -m sweeper " + shlex.join(_user_argv)


def _say(line: str = "", file=None) -> None:
    """Print a result line for the user, and keep it in sweep.log (when Hydra set one up)."""
    from sweeper.progress import RECORD_LOGGER

    print(line, file=file)
    if line:
        logging.getLogger(RECORD_LOGGER).info(line)


def print_results(summary: dict, sweep_dir: Path) -> None:
    """The best trial, its test scores, the compute ASHA saved and where every file is
    (summary.json keeps the paths relative to ``sweep_dir``)."""
    from sweeper.results import resolve_in_sweep

    best, test = summary["best"], summary.get("test")
    paths = {key: resolve_in_sweep(path, sweep_dir) for key, path in summary["paths"].items()}
    if best is not None:
        _say(f"Best: trial {best['trial_id']} {summary['metric']}={best['metric_value']:.4f} "
             f"at epoch {best['epoch']} with {best['config']}")
    if test:
        _say(f"Test ({test['num_samples']} held-out images, model from its {test['source']}): "
             f"accuracy {test['accuracy']:.4f}, macro precision {test['precision_macro']:.4f}, "
             f"recall {test['recall_macro']:.4f}, F1 {test['f1_macro']:.4f}")
    if summary.get("epochs_ratio") is not None:
        _say(f"Epochs trained: {summary['epochs_trained']} of {summary['epochs_full_budget']} "
             f"for a full-budget search ({summary['epochs_ratio']:.0%}); early stopping saved "
             f"{summary['epochs_full_budget'] - summary['epochs_trained']} epochs")
    _say(f"Sweep directory: {sweep_dir}")
    _say(f"Summary:         {sweep_dir / 'summary.json'}")
    for label, key in (("Best model", "best_model"), ("Best config", "best_config"),
                       ("Report", "report"), ("Trials table", "trials_csv")):
        if paths.get(key) and paths[key].exists():
            _say(f"{label + ':':<17}{paths[key]}")
    _say(f"TensorBoard:     tensorboard --logdir {shlex.quote(str(paths['tensorboard']))}")


REPORT_HELP = """\
usage: python -m sweeper report SWEEP_DIR

Rebuild a finished sweep's summary.json, trials.csv and report/ (report.md and its plots)
from the sweep folder alone, training nothing: after an upgrade of sweeper, after deleting
the report, or for a sweep folder copied from elsewhere (cp -r, ray rsync-down); the paths
in summary.json are relative to the folder. Prints the best trial, its test scores and
where the files are.

example: python -m sweeper report sweeps/cnn_lr"""


def report_command(args: list[str]) -> None:
    """``python -m sweeper report SWEEP_DIR``: rebuild summary.json, trials.csv and report/."""
    if args in (["--help"], ["-h"]):
        print(REPORT_HELP)
        return
    if len(args) != 1 or args[0].startswith("-"):
        _exit_usage("usage: python -m sweeper report <sweep_dir>")
    from sweeper.report import rebuild

    folder = Path(args[0]).expanduser().resolve()
    try:
        summary = rebuild(folder)
    except FileNotFoundError as error:
        _exit_usage(str(error))
    print_results(summary, folder)


def report_outcome(outcome) -> None:
    summary = outcome.summary
    if outcome.state == "already_complete":
        _say(f"Sweep {summary['experiment']!r} is already complete; nothing to run "
              "(fresh=true starts a new sweep beside it).")
    else:
        _say()
        _say(f"Best trials ({summary['metric']}, {summary['mode']}):")
        _say(outcome.table)
        _say()
    print_results(summary, Path(outcome.sweep_dir))


@hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from sweeper.progress import RECORD_LOGGER, configure_output
    from sweeper.sweep import SweepFailed, run_sweep

    configure_output(cfg.verbose)
    logging.getLogger(RECORD_LOGGER).info("Sweep config:\n%s", OmegaConf.to_yaml(cfg))
    try:
        outcome = run_sweep(cfg)
    except ConfigError as error:
        # Raised before Ray starts (e.g. the data cannot train, or a download failed).
        _remove_created_dir()
        _exit_usage(str(error))
    except SweepFailed as error:
        _say(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        _say(f"Interrupted. Resume with: {resume_command()}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    if outcome.state == "interrupted":
        counts = outcome.summary["trial_counts"]
        _say(f"Interrupted after {sum(counts.values())} trials ({counts}); partial results in "
             f"{outcome.sweep_dir}. Resume with: {resume_command()}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    report_outcome(outcome)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        report_command(argv[1:])
        return
    quoted = quote_space_overrides(argv)
    ready = preflight(quoted)
    # fresh=true has become an explicit name and folder: resuming continues that sweep.
    _user_argv[:] = [*argv, *ready[len(quoted):]]
    sys.argv = [sys.argv[0], *ready]
    hydra_main()


if __name__ == "__main__":
    main()
