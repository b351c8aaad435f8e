"""The report of a sweep: PNG plots, report.md, trials.csv and summary.json, rebuildable.

:func:`publish` writes everything a finished sweep leaves for people to read;
:func:`rebuild` does the same again from the sweep folder alone (Ray Tune's
trial folders plus the saved test scores), training nothing. Plots are drawn
with matplotlib's object API (no pyplot state, no display needed); a plot that
cannot be drawn is skipped with a warning and never fails the sweep.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sweeper.layout import SweepLayout
from sweeper.results import TrialRecord, build_summary, load_records
from sweeper.summary import (
    FAILED,
    Summary,
    TestScores,
    cell,
    class_names,
    outcome_lines,
    trials_table,
    write_trials_csv,
)

logger = logging.getLogger(__name__)


class SkipPlot(Exception):
    """A plot that the sweep's results cannot support (e.g. one trial only); says why."""


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0, nrows: int = 1):
    """A figure of ``nrows`` x ``ncols`` panels, each ``width`` x ``height`` inches; flat axes."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return figure, list(figure.subplots(nrows, ncols, squeeze=False).flat)


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _scored(records: list[TrialRecord]) -> list[TrialRecord]:
    return [r for r in records if r.best_value is not None and r.status != FAILED]


def _start_time(record: TrialRecord) -> float:
    """When the trial started (Unix seconds; inf if it never reported): trial ids are random,
    so this is what orders trials."""
    if not record.history or "timestamp" not in record.history[0]:
        return math.inf
    first = record.history[0]
    return first["timestamp"] - first.get("time_total_s", 0.0)


def _running_best(values: list[float], mode: str) -> list[float]:
    pick = max if mode == "max" else min
    best: list[float] = []
    for value in values:
        best.append(value if not best else pick(best[-1], value))
    return best


def plot_best_so_far(summary: Summary, records: list[TrialRecord]):
    """Best validation score found so far, against wall time and against trial number."""
    metric, mode = summary.metric, summary.mode
    reports = [(row["timestamp"], row[metric]) for r in _scored(records) for row in r.history
               if "timestamp" in row and math.isfinite(row.get(metric, math.nan))]
    if not reports:
        raise SkipPlot(f"no trial reported a finite {metric}")
    ordered = sorted(_scored(records), key=_start_time)
    origin = min(_start_time(ordered[0]), min(t for t, _ in reports))
    reports.sort()
    figure, (by_time, by_trial) = _figure(ncols=2)
    seconds = [t - origin for t, _ in reports]
    by_time.step(seconds, _running_best([v for _, v in reports], mode), where="post",
                 marker="o", markersize=4)
    by_time.set_xlim(left=0)
    by_time.set(xlabel="seconds since the first trial started",
                ylabel=f"best {metric} so far", title="Best so far, by time")
    # Each trial at its number, as on the console and in summary.json; a sweep too old to
    # have numbers, in the order its trials started.
    numbered = all(r.number is not None for r in ordered)
    if numbered:
        ordered = sorted(ordered, key=lambda r: r.number)
    numbers = [r.number for r in ordered] if numbered else list(range(1, len(ordered) + 1))
    values = [r.best_value for r in ordered]
    by_trial.scatter(numbers, values, s=16, alpha=0.6, label="trial's best")
    by_trial.step(numbers, _running_best(values, mode), where="post", label="best so far")
    by_trial.set(xlabel="trial number" if numbered else "trial, in the order they started",
                 ylabel=metric, title="Best so far, by trial")
    by_trial.xaxis.set_major_locator(_integer_ticks())
    by_trial.legend(loc="best")
    return figure


MARKERS = "osD^vP*Xh<>"


def plot_learning_curves(summary: Summary, records: list[TrialRecord]):
    """Every trial's validation curve, coloured by its sampled value of the most important
    parameter, its last point marked by how many epochs it trained, the rungs where the
    scheduler decided drawn as dotted lines."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.lines import Line2D

    metric, max_epochs = summary.metric, summary.max_epochs
    curves = [r for r in records if r.history]
    if not curves:
        raise SkipPlot("no trial reported an epoch")
    figure, (axes,) = _figure(width=7.5, height=4.5)
    colours = colormaps["viridis"]
    key = most_important_parameter(summary, records)
    values = [r.config.get(key) for r in curves] if key else []
    numeric = bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                   for v in values)
    if numeric:
        low, high = min(values), max(values)
        if high <= low:  # one value: any range around it gives it one colour
            high = low + abs(low) * 0.01 + 1e-12
        log = _searched_log(summary, key) and low > 0
        norm = (LogNorm if log else Normalize)(vmin=low, vmax=high)

        def colour(record):
            return colours(norm(record.config[key]))
    else:
        labels = sorted({str(v) for v in values})

        def colour(record):
            return colours(labels.index(str(record.config.get(key))) / max(len(labels) - 1, 1)
                           if key else 0.4)
    trained = sorted({r.epochs_trained for r in curves})
    marker = {n: MARKERS[i % len(MARKERS)] for i, n in enumerate(trained)}
    for record in curves:
        epochs = [row["epoch"] for row in record.history]
        series = [row.get(metric, math.nan) for row in record.history]
        failed = record.status == FAILED
        shade = "tab:red" if failed else colour(record)
        axes.plot(epochs, series, linewidth=1.2, color=shade,
                  linestyle="--" if failed else "-", alpha=0.85)
        axes.plot(epochs[-1:], series[-1:], marker=marker[record.epochs_trained], markersize=7,
                  color=shade, linestyle="")
    for epoch, rung in _rung_epochs(summary, curves, max_epochs):
        axes.axvline(epoch, color="grey", linestyle=":", linewidth=1)
        axes.annotate(f"rung {rung}", (epoch, 1), xycoords=("data", "axes fraction"),
                      xytext=(2, -10), textcoords="offset points", fontsize=8, color="grey")
    handles = [Line2D([], [], marker=marker[n], color="grey", linestyle="",
                      label=f"{n} epoch{'s' if n != 1 else ''}"
                      + (" (full budget)" if n == max_epochs else ""))
               for n in trained]
    if any(r.status == FAILED for r in curves):
        handles.append(Line2D([], [], color="tab:red", linestyle="--", label="failed"))
    if numeric:
        figure.colorbar(ScalarMappable(norm=norm, cmap=colours), ax=axes, label=key)
    elif key:
        handles += [Line2D([], [], color=colours(i / max(len(labels) - 1, 1)),
                           label=f"{key}={label}") for i, label in enumerate(labels)]
    axes.legend(handles=handles, title="trained", loc="best", fontsize=8)
    axes.xaxis.set_major_locator(_integer_ticks())
    axes.set(xlabel="epoch", ylabel=metric,
             title=f"Learning curves (colour: {key or 'trial'}; dotted: the scheduler's rungs)")
    return figure


def _rung_epochs(summary: Summary, curves: list[TrialRecord],
           max_epochs: int) -> list[tuple[int, int]]:
    """(epoch, rung number) of each rung where the scheduler decided; for a summary without
    decisions, the epochs where trials stopped short of the budget."""
    decisions = summary.scheduler_decisions or []
    rungs = {(int(d["epoch"]), int(d["rung"])) for d in decisions if d.get("rung")}
    if rungs or decisions:
        return sorted(rungs)
    stops = sorted({r.epochs_trained for r in curves if r.epochs_trained < max_epochs})
    return [(epoch, number) for number, epoch in enumerate(stops, 1)]


def _searched_log(summary: Summary, key: str) -> bool:
    from sweeper.space import parse_distribution

    text = summary.search_space.get(key)
    try:
        return bool(text) and bool(getattr(parse_distribution(key, text), "log", False))
    except Exception:  # a search space written by another version: a linear scale will do
        return False


# Optuna's importance evaluator (a random forest over the trials) says little below this.
MIN_TRIALS_FOR_IMPORTANCE = 4


def _importance_skipped(summary: Summary, records: list[TrialRecord]) -> str | None:
    """Why parameter importance says nothing for this sweep, or None when it does."""
    space = summary.search_space
    if len(space) < 2:
        searched = ", ".join(space) or "none"
        return (f"one parameter was searched ({searched}); importance compares two or more "
                "parameters, and a single one accounts for everything")
    scored = _scored(records)
    if len(scored) < MIN_TRIALS_FOR_IMPORTANCE:
        return (f"{len(scored)} scored trial{'s' if len(scored) != 1 else ''}; importance needs "
                f"at least {MIN_TRIALS_FOR_IMPORTANCE}")
    if len({repr(sorted(r.config.items())) for r in scored}) < 2:
        return "every scored trial sampled the same values"
    return None


def most_important_parameter(summary: Summary, records: list[TrialRecord]) -> str | None:
    """The searched parameter that matters most for the metric (Optuna's importance, where it
    can say; else the first searched parameter), or None without a search space."""
    import optuna

    space = summary.search_space
    if not space:
        return None
    if _importance_skipped(summary, records) is None:
        try:
            return next(iter(optuna.importance.get_param_importances(_study(summary, records))))
        except (ValueError, RuntimeError, StopIteration, SkipPlot):
            pass
    return sorted(space)[0]


def _study(summary: Summary, records: list[TrialRecord]):
    """An Optuna study holding the sweep's scored trials, for Optuna's analysis tools."""
    import optuna

    from sweeper.space import encode_choice, parse_distribution

    space = summary.search_space
    if not space:
        raise SkipPlot("summary.json has no search space")
    distributions = {key: parse_distribution(key, text) for key, text in space.items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    direction = "maximize" if summary.mode == "max" else "minimize"
    study = optuna.create_study(direction=direction)
    for record in _scored(records):
        params = {k: encode_choice(v) for k, v in record.config.items() if k in distributions}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: distributions[k] for k in params},
            value=record.best_value))
    return study


def plot_param_importance(summary: Summary, records: list[TrialRecord]):
    """Each searched parameter's importance for the search metric (Optuna's default evaluator)."""
    import optuna

    reason = _importance_skipped(summary, records)
    if reason:
        raise SkipPlot(reason)
    importances = optuna.importance.get_param_importances(_study(summary, records))
    names = list(importances)[::-1]
    figure, (axes,) = _figure(height=max(3.0, 1.0 + 0.5 * len(names)))
    axes.barh(names, [importances[n] for n in names])
    axes.set(xlabel="importance (Optuna's default evaluator; sums to 1)", xlim=(0, 1),
             title=f"Parameter importance for {summary.metric}")
    return figure


def _as_sampled(choices: Sequence[Any], values: list[Any]) -> list[Any]:
    """A choice's values as the trials got them. summary.json keeps the expression, whose
    numbers became floats for a float setting: the schema says so for sweeper's own settings,
    but for a user's builder only its default did (``ratio=0.5``: ``choice(1, 2)`` gave
    2.0), so the trials' own values tell."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not numbers or not all(isinstance(v, float) for v in numbers):
        return list(choices)
    return [float(c) if isinstance(c, int) and not isinstance(c, bool) else c for c in choices]


def plot_search_space(summary: Summary, records: list[TrialRecord]):
    """Where the searcher sampled each parameter, and the score each sample reached."""
    from matplotlib.ticker import NullFormatter
    from optuna.distributions import CategoricalDistribution

    from sweeper.space import choice_text, parse_distribution

    space = summary.search_space
    scored = _scored(records)
    if not space or not scored:
        raise SkipPlot("no search space or no scored trial")
    from matplotlib.colors import BoundaryNorm

    max_epochs = max(int(summary.max_epochs), 1)
    epochs_norm = BoundaryNorm([n + 0.5 for n in range(max_epochs + 1)], 256)
    ncols = min(3, len(space))
    figure, panels = _figure(ncols=ncols, width=6.0 if ncols == 1 else 4.0, height=3.5,
                             nrows=-(-len(space) // ncols))
    for axes in panels[len(space):]:
        axes.set_visible(False)
    for axes, (key, text) in zip(panels, sorted(space.items()), strict=False):
        distribution = parse_distribution(key, text)
        values = [r.config.get(key) for r in scored]
        if isinstance(distribution, CategoricalDistribution):
            labels = [choice_text(c) for c in _as_sampled(distribution.choices, values)]
            positions = [labels.index(choice_text(v)) for v in values]
            axes.set_xticks(range(len(labels)), labels)
            values = positions
        elif getattr(distribution, "log", False):
            axes.set_xscale("log")
            axes.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide
        points = axes.scatter(values, [r.best_value for r in scored], norm=epochs_norm,
                              c=[r.epochs_trained for r in scored], cmap="viridis", s=28,
                              edgecolors="black", linewidths=0.4)
        axes.set(xlabel=key, ylabel=summary.metric, title=key)
    figure.colorbar(points, ax=panels[:len(space)], label="epochs trained",
                    ticks=range(1, max_epochs + 1))
    figure.suptitle("Search space coverage (each trial's best score; colour: epochs trained)")
    return figure


def plot_confusion_matrix(summary: Summary, records: list[TrialRecord]):
    """The best model's confusion matrix on the held-out test split."""
    test = summary.test
    if not test:
        raise SkipPlot("the best model was not evaluated on the test split")
    matrix = test.confusion_matrix
    size = len(matrix)
    names = class_names(summary, size)
    # Past ~20 classes (CIFAR-100) the counts and names no longer fit their cells.
    figure, (axes,) = _figure(width=max(6.0, 0.3 * size), height=max(5.5, 0.3 * size))
    image = axes.imshow(matrix, cmap="Blues")
    peak = max(max(row) for row in matrix) or 1
    if size <= 20:
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                axes.text(j, i, str(count), ha="center", va="center", fontsize=7,
                          color="white" if count > peak / 2 else "black")
    axes.set_xticks(range(size), names, rotation=90 if size > 10 else 45, ha="right",
                    fontsize=7 if size > 20 else None)
    axes.set_yticks(range(size), names, fontsize=7 if size > 20 else None)
    baseline = summary.baseline
    against = ("" if baseline is None or baseline.test_accuracy is None else
               f";\nalways predicting {baseline.class_name!r}: {baseline.test_accuracy:.4f}")
    axes.set(xlabel="predicted class", ylabel="true class",
             title=f"Test confusion matrix (accuracy {test.accuracy:.4f}{against})")
    figure.colorbar(image, ax=axes)
    return figure


PLOTS: dict[str, tuple[str, Callable[..., Any]]] = {
    "best_so_far": ("Best validation score so far", plot_best_so_far),
    "learning_curves": ("Learning curves and ASHA rungs", plot_learning_curves),
    "param_importance": ("Parameter importance", plot_param_importance),
    "search_space": ("Search space coverage", plot_search_space),
    "confusion_matrix": ("Test confusion matrix of the best model", plot_confusion_matrix),
}


def draw_plots(summary: Summary, records: list[TrialRecord], folder: Path,
               skipped: dict[str, str] | None = None) -> list[str]:
    """Write each plot as ``<name>.png`` in ``folder``; returns the names drawn. Why a plot
    was not drawn goes into ``skipped`` (name -> a sentence for report.md)."""
    skipped = {} if skipped is None else skipped
    folder.mkdir(parents=True, exist_ok=True)
    drawn = []
    for name, (_, draw) in PLOTS.items():
        path = folder / f"{name}.png"
        path.unlink(missing_ok=True)  # a plot skipped now must not show a stale picture
        try:
            draw(summary, records).savefig(path, dpi=100)
        except SkipPlot as reason:  # the results cannot support it: said in report.md
            logger.info("Skipped the %s plot: %s", name, reason)
            skipped[name] = str(reason)
            continue
        except Exception as error:  # a broken plot must never break the sweep
            logger.warning("Skipped the %s plot: %s: %s", name, type(error).__name__, error)
            skipped[name] = f"it could not be drawn ({type(error).__name__}: {error})"
            path.unlink(missing_ok=True)
            continue
        drawn.append(name)
    return drawn


def _cell(value: Any) -> str:
    return cell(value).replace("|", "\\|")  # a pipe would end the markdown cell


def _markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(none)"]
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row[key]) for key in header) + " |" for row in rows]
    return lines


def report_markdown(summary: Summary, drawn: list[str],
                    skipped: dict[str, str] | None = None) -> str:
    """report.md: the outcome in a few lines, the plots, the test figures and the trials table."""
    test = summary.test
    lines = [f"# Sweep report: {summary.experiment}", "", *outcome_lines(summary, markdown=True),
             ""]
    for name, (title, _) in PLOTS.items():
        if name in drawn:
            lines += [f"## {title}", "", f"![{title}]({name}.png)", ""]
        elif name in (skipped or {}):
            lines += [f"## {title}", "", f"Not drawn: {skipped[name]}.", ""]
    if test:
        per_class = test.per_class
        scored = per_class.get("scored") or [True] * len(per_class["f1"])
        names = class_names(summary, len(per_class["f1"]))
        rows = [{"class": names[i], "precision": per_class["precision"][i],
                 "recall": per_class["recall"][i], "f1": per_class["f1"][i],
                 "support": per_class["support"][i],
                 # Test images predicted as the class: 0 where the model ignores it.
                 "predicted": sum(row[i] for row in test.confusion_matrix),
                 "in macro averages": "yes" if scored[i] else "no (no samples, never predicted)"}
                for i in range(len(per_class["f1"]))]
        lines += ["## Test figures per class", "", *_markdown_table(rows), ""]
    lines += [f"## Trials ({SweepLayout.TRIALS_CSV})", "",
              *_markdown_table(trials_table(summary)), ""]
    return "\n".join(lines)


def publish(summary: Summary, records: list[TrialRecord], layout: SweepLayout) -> None:
    """Write summary.json, trials.csv and report/ (plots + report.md) into the sweep folder."""
    summary.write(layout.summary)
    write_trials_csv(summary, layout.trials_csv)
    skipped: dict[str, str] = {}
    drawn = draw_plots(summary, records, layout.report_dir, skipped)
    layout.report.write_text(report_markdown(summary, drawn, skipped))


def rebuild(sweep_dir: Path) -> Summary:
    """Rebuild summary.json, trials.csv and the report of a finished sweep; trains nothing.

    Trial records come from Ray Tune's trial folders, the sweep's settings from the
    existing summary.json and the test scores from best_model.json; the fields of the summary
    that are not rebuilt here (written by other parts of the sweep) are kept as they were.

    Raises:
        FileNotFoundError: ``sweep_dir`` holds no summary.json or no trials/ folder.
    """
    layout = SweepLayout(Path(sweep_dir).expanduser().resolve())
    for needed in (layout.summary, layout.trials):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} does not exist; is {layout.root} a finished sweep?")
    old = Summary.read(layout.summary)
    records = load_records(layout.trials, old.metric, old.mode, old.max_epochs)
    rebuilt = build_summary(old.experiment, old.metric, old.mode, old.max_epochs, records,
                            layout, search_space=old.search_space,
                            test=read_test_scores(layout))
    summary = dataclasses.replace(old, trials=rebuilt.trials, best=rebuilt.best,
                                  test=rebuilt.test, paths=rebuilt.paths)
    publish(summary, records, layout)
    return summary


def read_test_scores(layout: SweepLayout) -> TestScores | None:
    """The test scores an earlier export of the best model saved in best_model.json, or None."""
    if not layout.best_model_info.is_file():
        return None
    test = json.loads(layout.best_model_info.read_text()).get("test")
    return None if test is None else TestScores.from_dict(test)
