"""sweeper's Python API: compose a config, run a sweep, load what a sweep left behind.

    import sweeper

    config = sweeper.compose(["+experiment=smoke", "data=fashion_mnist"])
    result = sweeper.run(config)            # trains; Ray starts and stops inside
    result.best.config, result.best.metric_value, result.test.accuracy
    result.baseline.test_accuracy, result.warnings  # the majority class; why not to trust it
    result.to_dataframe()                   # one row per trial (pandas)

    sweeper.load("sweeps/smoke")            # any finished or interrupted sweep; no Ray, no TF

The CLI (``python -m sweeper``) is a thin layer over these three functions. Importing this
module imports neither Ray nor TensorFlow: :func:`run` imports them when it runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper.config import ConfigError, SweepConfig
from sweeper.layout import SweepLayout
from sweeper.summary import (
    STATE_COMPLETE,
    STATE_INTERRUPTED,
    Baseline,
    BestTrial,
    Summary,
    TestScores,
    TrialSummary,
)

if TYPE_CHECKING:
    import pandas

ALREADY_COMPLETE = "already_complete"


@dataclass(frozen=True)
class SweepResult:
    """What a sweep left behind: its summary, read from (or written to) its folder.

    Attributes:
        summary: The typed summary.json (:class:`sweeper.summary.Summary`).
        layout: Every path of the sweep folder (:class:`sweeper.layout.SweepLayout`).
        state: ``complete``; ``interrupted`` (re-running the same config resumes it);
            ``time_budget`` (search.time_budget_s ran out: the best so far, scored; running
            it again continues); ``already_complete`` (:func:`run` found it finished and
            trained nothing).
    """

    summary: Summary
    layout: SweepLayout
    state: str = STATE_COMPLETE

    @property
    def sweep_dir(self) -> Path:
        """The sweep folder (absolute)."""
        return self.layout.root

    @property
    def best(self) -> BestTrial | None:
        """The best trial by the search metric on validation data: ``config`` (sampled values),
        ``metric_value``, ``epoch``, ``trial_id``; None when no trial produced a finite one."""
        return self.summary.best

    @property
    def trials(self) -> list[TrialSummary]:
        """One record per trial, in trial-id order."""
        return self.summary.trials

    @property
    def test(self) -> TestScores | None:
        """The best model's scores on the held-out test split (None: not evaluated)."""
        return self.summary.test

    @property
    def baseline(self) -> Baseline | None:
        """The majority-class baseline the scores are compared with: ``class_name`` (the
        training split's most frequent class), ``val_accuracy`` and ``test_accuracy`` of
        always predicting it (None: a sweep written before sweeper had it)."""
        return self.summary.baseline

    @property
    def warnings(self) -> list[str]:
        """Why the best model should not be trusted, one sentence each with what to try (it is
        not clearly better than :attr:`baseline`, or predicts no test image as some class);
        empty when nothing was found. The console and report.md show the same sentences."""
        return self.summary.warnings

    @property
    def best_model(self) -> Path | None:
        """The best model's ``.keras`` file (raw uint8 images in), None when none was saved."""
        path = self.layout.resolve(self.summary.paths.get("best_model"))
        return path if path is not None and path.is_file() else None

    def to_dataframe(self) -> pandas.DataFrame:
        """The trials as a pandas DataFrame, one row per trial: ``trial_id``, one column per
        sampled parameter (``train.lr``, ...), ``status``, ``epochs_trained``,
        ``best_<metric>``, ``last_<metric>``, ``best_epoch``, ``wall_time_s``, ``error``
        (the columns of trials.csv)."""
        import pandas

        from sweeper.summary import trials_table

        return pandas.DataFrame(trials_table(self.summary))


def compose(overrides: Sequence[str] = (),
            config_dir: str | Path | Sequence[str | Path] | None = None,
            config_name: str = "config") -> SweepConfig:
    """The validated sweep config of ``python -m sweeper OVERRIDES``.

    Args:
        overrides: Hydra overrides as on the command line (``+experiment=smoke``,
            ``train.lr=0.01``, ``search.space.train.lr=tag(log, interval(1e-4, 1e-2))``);
            search-space expressions and paths need no extra quoting.
        config_dir: A folder of your own configs searched beside sweeper's (``--config-dir``),
            e.g. one with ``experiment/mine.yaml``; or several.
        config_name: The primary config (``--config-name``), e.g. ``best_config`` with a
            sweep folder as ``config_dir``; default: sweeper's own ``config``.

    Returns:
        The typed config (:class:`sweeper.config.SweepConfig`), every value checked: types,
        ranges, the search space, the dataset's files and shapes, the model builder.

    Raises:
        ConfigError: A mistake; its message is one line, ``KEY=VALUE is invalid: ...``.
    """
    from hydra.core.global_hydra import GlobalHydra

    from sweeper.overrides import compose_config, describe_composition_error, quote_space_overrides
    from sweeper.sweep import validated

    quoted = quote_space_overrides(list(overrides))
    folders = ([] if config_dir is None else [str(config_dir)]
               if isinstance(config_dir, (str, Path)) else [str(d) for d in config_dir])
    try:
        cfg = compose_config(quoted, folders or None, config_name)
    except Exception as error:  # Hydra and OmegaConf raise many types for a user's mistake
        raise ConfigError.from_line(describe_composition_error(error, quoted)) from None
    finally:
        GlobalHydra.instance().clear()
    try:
        return validated(cfg)[0]
    except ConfigError:
        raise
    except Exception as error:  # e.g. OmegaConf type errors surfacing on conversion
        raise ConfigError.from_line(describe_composition_error(error)) from None


def run(config: SweepConfig, console: bool = True) -> SweepResult:
    """Run the sweep of ``config`` (from :func:`compose`), or resume it if it was interrupted.

    Starts Ray in this process (or joins ``cluster.address``), trains the trials, exports and
    test-scores the best model, writes the sweep folder, and stops the Ray it started. A
    config changed after :func:`compose` is validated again; an unchanged one is not.

    Args:
        console: Print the CLI's lines on stdout while it runs (the plan, one line per trial
            event, as ``config.verbose`` says: ``compose(["verbose=2", ...])`` adds Ray's and
            Optuna's own), where the program set up no logging of its own (its root logger
            has no handlers; one that has decides itself: sweeper's loggers are
            ``sweeper.events`` and ``sweeper.record``). False: print nothing, leave logging
            as it is.

    Returns:
        The result; ``state`` says whether it completed, was interrupted (Ctrl-C, SIGTERM:
        run it again to resume), or had completed before (nothing trained).

    Raises:
        ConfigError: The config is wrong (nothing started).
        sweeper.sweep.SweepFailed: No trial produced a result.
    """
    from sweeper.progress import console_for_api
    from sweeper.sweep import run_sweep

    with console_for_api(getattr(config, "verbose", 1) if console else None):
        return run_sweep(config)


def load(sweep_dir: str | Path) -> SweepResult:
    """The result of a finished or interrupted sweep, read from its folder alone.

    Imports neither Ray nor TensorFlow. A sweep whose driver was killed before it wrote
    summary.json is read from its trial folders (each trial's results so far; state
    ``interrupted``).

    Raises:
        FileNotFoundError: ``sweep_dir`` holds no sweep.
    """
    layout = SweepLayout(Path(sweep_dir).expanduser().resolve())
    if layout.summary.is_file():
        summary = Summary.read(layout.summary)
        return SweepResult(summary, layout, summary.state)
    if not layout.sweep_config.is_file() or not layout.trials.is_dir():
        raise FileNotFoundError(f"{layout.summary} does not exist; is {layout.root} a sweep?")
    return SweepResult(_summary_from_trial_folders(layout), layout, STATE_INTERRUPTED)


def _summary_from_trial_folders(layout: SweepLayout) -> Summary:
    import yaml

    from sweeper.results import build_summary, records_from_trial_folders
    from sweeper.space import flatten_space

    saved: dict[str, Any] = yaml.safe_load(layout.sweep_config.read_text())
    search, train = saved.get("search", {}), saved.get("train", {})
    metric, mode = search.get("metric", "val_accuracy"), search.get("mode", "max")
    max_epochs = int(train.get("epochs", 1))
    records = records_from_trial_folders(layout.trials, metric, mode, max_epochs)
    decisions = layout.scheduler_decisions
    return build_summary(saved.get("name", layout.root.name), metric, mode, max_epochs, records,
                         layout, search_space=flatten_space(search.get("space") or {}),
                         state=STATE_INTERRUPTED, reproducible=bool(search.get("reproducible")),
                         scheduler_decisions=(json.loads(decisions.read_text())
                                              if decisions.is_file() else None))
