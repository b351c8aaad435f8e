"""The command line, ``python -m sweeper [overrides]``: compose and check the config through
:func:`sweeper.compose`, run it with :func:`sweeper.run`, print where the results are.

``python -m sweeper report SWEEP_DIR`` rebuilds a finished sweep's summary and report.

A user's mistake (bad override, value, search space or dataset) ends with one
line on stderr and exit code 2, before Ray starts.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sweeper.api import ALREADY_COMPLETE, SweepResult, compose, load, run
from sweeper.config import ConfigError, SweepConfig
from sweeper.layout import SweepLayout
from sweeper.overrides import (
    CONFIG_NAME,
    CONFIG_PATH,
    CommandLine,
    compose_config,
    describe_composition_error,
    hydra_quoted,
    parse_command_line,
    quote_space_overrides,
)
from sweeper.summary import (
    STATE_INTERRUPTED,
    STATE_TIME_BUDGET,
    Summary,
    file_lines,
    format_table,
    outcome_lines,
    table_heading,
)

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

logger = logging.getLogger("sweeper")

# Held from before Hydra writes into the sweep folder until the process ends: one driver per
# sweep folder. The kernel releases it when the process dies, SIGKILL included.
_sweep_lock = None
# The folder this run created for a new sweep: removed again if the run is refused or fails
# before any trial ran, so a mistake leaves no half-made sweep behind.
_created_dir: Path | None = None
# The config preflight composed and validated; Hydra's run uses it rather than checking the
# same config again.
_checked_config: SweepConfig | None = None
# Set once Hydra calls the sweep: a failure before (Hydra's own) leaves no folder behind.
_hydra_ran = False


def preflight(argv: list[str]) -> list[str]:
    """Compose and validate before Hydra runs anything; exits 2 with one line on a mistake.

    Args:
        argv: The command line's arguments, flags and overrides in any order, as typed.

    Returns the arguments to run with: ``fresh=true`` becomes an explicit new name and folder,
    so that Hydra's own files land in the new sweep's folder too.
    """
    global _checked_config
    command = _parsed(argv)
    if command.prints_only:
        return argv
    from sweeper.sweep import COMPLETE, check_sweep_dir, fresh_variant, mark_validated, sweep_state
    from sweeper.sweep import validated as checked

    try:
        typed = compose(command.overrides, command.config_dirs or None,
                        config_name=command.config_name)
        _, space = checked(typed)
        if typed.sweep_dir.startswith("~"):
            # Hydra makes its run folder (.hydra/, sweep.log) from sweep_dir as written: a
            # folder named "~" in the current one. Give it the path the sweep is written to.
            typed.sweep_dir = str(Path(typed.sweep_dir).expanduser())
            argv = [*argv, f"sweep_dir={hydra_quoted(typed.sweep_dir)}"]
        if typed.fresh:
            typed = fresh_variant(typed)
            argv = [*argv, f"name={hydra_quoted(typed.name)}",
                    f"sweep_dir={hydra_quoted(typed.sweep_dir)}", "fresh=false"]
        mark_validated(typed, space)  # a new name or an expanded folder changes no check
        root = SweepLayout.for_config(typed).root
        check_sweep_dir(typed, root)
    except ConfigError as error:
        _exit_usage(str(error))
    if sweep_state(root) == COMPLETE:
        # Nothing to run: report it without Hydra, which would rewrite the sweep's .hydra/
        # and append to its sweep.log.
        finished = load(root)
        report_outcome(SweepResult(finished.summary, finished.layout, ALREADY_COMPLETE))
        sys.exit(0)
    if SweepLayout(root).data_fingerprint.is_file():
        # A resume: its data must be what the sweep began with, checked before Hydra writes
        # into the folder (the sweep loads it again to train: one more load per resume).
        from sweeper.data import load_splits
        from sweeper.sweep import check_data_unchanged

        try:
            check_data_unchanged(typed, root, load_splits(
                typed.data, typed.train.validation_fraction, typed.train.seed))
        except ConfigError as error:
            _exit_usage(str(error))
    _claim(typed)
    _checked_config = typed
    return argv


def _claim(cfg) -> None:
    """Take the sweep folder's lock before Hydra writes into it; exit 2 if another driver holds
    it (the same sweep started twice would otherwise resume it as interrupted and train the
    same trials twice)."""
    global _sweep_lock, _created_dir
    from filelock import FileLock, Timeout

    layout = SweepLayout.for_config(cfg)
    folder = layout.root
    created = None if folder.exists() else folder
    while created is not None and not created.parent.exists():
        created = created.parent  # the topmost folder this run makes
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(layout.lock)
        lock.acquire(timeout=0)
    except Timeout:
        owner = layout.lock_owner
        who = owner.read_text().strip() if owner.is_file() else "another process"
        _exit_usage(f"name={cfg.name!r} is invalid: a sweep is running in {folder} ({who}); "
                    "wait for it to end, or choose another name=...")
    except OSError as error:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        _exit_usage(f"sweep_dir={str(folder)!r} is invalid: cannot create or lock it "
                    f"({error.strerror or error})")
    layout.lock_owner.write_text(f"process {os.getpid()} on {socket.gethostname()}\n")
    _sweep_lock, _created_dir = lock, created


def _remove_created_dir() -> None:
    """Remove the folder this run made for a new sweep that was refused before training."""
    if _created_dir is not None and _created_dir.is_dir():
        shutil.rmtree(_created_dir, ignore_errors=True)


def _parsed(argv: list[str]) -> CommandLine:
    """The command line read (sweeper.overrides.parse_command_line), its overrides quoted for
    Hydra; exits 2 with one line on a mistake."""
    try:
        command = parse_command_line(argv)
    except ConfigError as error:
        _exit_usage(str(error))
    command.overrides = quote_space_overrides(command.overrides)
    return command


def _check_composes(command: CommandLine) -> None:
    """Exit 2 with one line where Hydra could not compose the config it is asked to print."""
    from hydra.core.global_hydra import GlobalHydra

    try:
        compose_config(command.overrides, command.config_dirs, command.config_name)
    except Exception as error:  # Hydra and OmegaConf raise many types for a user's mistake
        _exit_usage(describe_composition_error(error, command.overrides))
    finally:
        GlobalHydra.instance().clear()


def _run_hydra(command: CommandLine) -> None:
    """Hand the command line to Hydra, flags before overrides (its parser takes no override
    after a flag's value); a folder this run made is removed if Hydra fails before the sweep
    begins."""
    sys.argv = [sys.argv[0], *command.hydra_argv()]
    try:
        hydra_main()
    finally:
        if not _hydra_ran:
            _remove_created_dir()


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


def print_results(summary: Summary, layout: SweepLayout) -> None:
    """The best trial, its test scores, the compute early stopping saved and where every file
    is: the sentences report.md opens with (sweeper.summary.outcome_lines)."""
    for line in [*outcome_lines(summary), *file_lines(summary, layout)]:
        _say(line)


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
    print_results(summary, SweepLayout(folder))


def report_outcome(result: SweepResult) -> None:
    summary = result.summary
    if result.state == ALREADY_COMPLETE:
        _say(f"Sweep {summary.experiment!r} is already complete; nothing to run "
             "(fresh=true starts a new sweep beside it).")
    else:
        _say()
        _say(table_heading(summary))
        _say(format_table(summary))
        _say()
    print_results(summary, result.layout)


@hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from sweeper.progress import RECORD_LOGGER, configure_output
    from sweeper.sweep import SweepFailed

    global _hydra_ran
    _hydra_ran = True
    configure_output(cfg.verbose)
    logging.getLogger(RECORD_LOGGER).info("Sweep config:\n%s", OmegaConf.to_yaml(cfg))
    try:
        # The console is configured above (Hydra's handlers, verbose): none of the API's.
        outcome = run(_checked_config if _checked_config is not None else cfg,
                      console=False)
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
    if outcome.state == STATE_INTERRUPTED:
        _say(f"Interrupted after {outcome.summary.counts_phrase()}; partial results in "
             f"{outcome.sweep_dir}. Resume with: {resume_command()}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    report_outcome(outcome)
    if outcome.state == STATE_TIME_BUDGET:
        budget = outcome.summary.time_budget_s
        _say(f"Time budget of {budget:g} s spent after {outcome.summary.counts_phrase()}; "
             f"the results above are the best so far. Continue the sweep for another "
             f"{budget:g} s with: {resume_command()}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        report_command(argv[1:])
        return
    command = _parsed(argv)
    if command.prints_only:  # --help, --cfg, --info: Hydra prints; no sweep, no folder
        if any(flag.startswith(("--cfg", "--info", "--help")) for flag in command.flags):
            _check_composes(command)
        _run_hydra(command)
        return
    ready = preflight(argv)
    # fresh=true has become an explicit name and folder: resuming continues that sweep.
    _user_argv[:] = ready
    _run_hydra(_parsed(ready))


if __name__ == "__main__":
    main()
