"""Record a finished ``+experiment=cnn_tuned`` sweep in benchmarks/RESULTS.md (issue 24),
with the same hour of the old ``cnn_wide`` space beside it.

The sweeps themselves are the measurement (one hour of the machine each), so this reads what
they left: each one's summary.json, and optionally the load averages sampled during the runs
and their start and end times. Nothing is trained here; the test split was read once, by each
sweep.

    python -m benchmarks.cnn_tuned [SWEEP_DIR] [--times FILE] [--wide DIR [--wide-times FILE]]
                                   [--load FILE] [--retrain] [--write]

Without SWEEP_DIR, cnn_tuned's column and its line are kept as RESULTS.md has them (its hour
is recorded; its folder may be on another machine) and only ``--wide`` is read anew.

``--wide``: a ``+experiment=cnn_wide`` sweep run with the same budget and final step
(``search.time_budget_s=3000 final.retrain=true``), shown in a column beside cnn_tuned's: what
the new knobs bought. ``--load``: lines ``HH:MM:SS <1-min> <5-min> <15-min> ...``
(``/proc/loadavg`` sampled every few minutes, one file for both runs: each run's column counts
the samples between its start and end); ``--times`` / ``--wide-times``: lines ``start <date>``
and ``... end <date>`` (``date -u``). ``--retrain``: also train cnn_tuned's best config once more
on train+validation for its best epoch count, as ``final.retrain=true`` would have
(sweeper.evaluate.export_best, in this process, into SWEEP_DIR/../<name>_retrained), and score
that model on the test split.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from benchmarks import common

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## cnn_tuned: the knobs that move accuracy, one hour on Fashion-MNIST (issue 24)"
COMMAND = "python -m sweeper +experiment=cnn_tuned data=fashion_mnist"
# cnn_wide's own 40 trials end in about 20 minutes on 2 cores; with 300 it spends the same
# 50-minute search budget as cnn_tuned, so the columns compare spaces, not trial counts.
WIDE_COMMAND = ("python -m sweeper +experiment=cnn_wide data=fashion_mnist "
                "search.time_budget_s=3000 search.num_trials=300 final.retrain=true")
# What earlier runs reached on Fashion-MNIST: cnn_lr's figure is issue 24's.
EARLIER = [("cnn_lr (learning rate only)", "0.905 test accuracy (issue 24)"),
           ("cnn_tuned as first written (10 epochs, a 3600 s search, the best trial's own "
            "checkpoint scored), one hour on an idle machine, 2026-11-30",
            "14 trials, 62 epochs; best the recipe trial, validation 0.9320 at epoch 9, test "
            "0.9237; the same config retrained on train+validation for 9 epochs "
            "(`--retrain`, 306 s): test 0.9261"),
           ("cnn_tuned with 15 epochs and `final.retrain`, 2026-12-01 03:00-04:09 UTC (another "
            "session's load reached 107; the retrain then ran on one CPU, 1081 s)",
            "8 trials, 44 epochs; best the recipe trial, validation 0.9350 at epoch 15, test "
            "0.9295 (retrained)")]
# The reading of the table, written by hand once the runs are in (the section is regenerated
# by --write, so it lives here and not in RESULTS.md).
READING = (
    "The issue's target (>= 0.93 test accuracy within the hour, chosen on validation only) is "
    "reached: test 0.9316 from the recipe (trial 1) retrained on train+validation on both "
    "cores (2 CPUs, 644 s for 15 epochs, 06:27-06:37 UTC), 3733 s from start to results on a "
    "quiet machine (load median 2.2). The recipe's trial trained exactly as in the 03:00 hour "
    "(same seed: validation 0.9350 at epoch 15); the retrain on 2 CPUs instead of 1 scored "
    "0.9316 against 0.9295, within the test split's noise (binomial standard error 0.0025 at "
    "10 000 images). Validation-only check of augmentation for the recipe (one trial, both "
    "cores, `final.evaluate=false`): flip=horizontal + translation=0.05 reached 0.9302 at "
    "epoch 15 against 0.9350 without, so the recipe starts unaugmented.\n\n"
    "What the new knobs bought: the old `cnn_wide` space (learning rate, batch size, filters, "
    "dense units, dropout, L2 of the classic network) with the same 3000 s search and the "
    "same final step reached validation 0.9185 and test 0.9102 (its best config retrained on "
    "train+validation for 11 epochs, 211 s): cnn_tuned's 0.9316 is 0.021 higher, more than 5 "
    "standard errors of the difference (0.004). cnn_wide ran 73 short trials (most stopped by "
    "ASHA at 2 or 6 epochs) where cnn_tuned ran 9 long ones; its best trials reached "
    "0.915-0.919 on validation with different learning rates, dropout and widths. The two "
    "hours ran on "
    "different machines of the same kind (2 cores), each alone; the cnn_wide column is a new "
    "machine's (load median 2.4). Its hour also found a fault, fixed with this record: after "
    "the budget was spent (11:25:51) Tune kept starting the searcher's new trials on the "
    "workers that paused trials freed (with no limit on concurrent trials the searcher kept "
    "proposing), so 22 trials (52-73) started, 18 of them training one epoch, until the run "
    "was ended by hand "
    "with Ctrl-C at 11:30:17, which, the budget being spent, finished it as the budget does "
    "(state time_budget, best retrained and scored). None of those trials could change the "
    "best (one epoch: validation at most 0.870); the wall time above includes those 4.5 "
    "minutes. The searcher now proposes no trial once the budget is spent "
    "(`tests/test_recovery.py::test_time_budget_ends_a_sweep_with_results_and_a_rerun_resumes_it`"
    " runs with no limit on concurrent trials).")


@dataclass(frozen=True)
class Run:
    """One recorded sweep: its column's heading, its folder, the command that ran it, and
    its start and end (UTC, from ``--times``; None when not given). ``recorded``: a column
    kept as RESULTS.md has it (its line and cells, :func:`recorded_run`), read from no
    folder."""

    label: str
    sweep_dir: Path | None
    command: str
    start: datetime | None = None
    end: datetime | None = None
    recorded: tuple[str, dict[str, str]] | None = None

    @property
    def wall_s(self) -> float | None:
        """Seconds from start to end, None without both."""
        if self.start is None or self.end is None:
            return None
        return (self.end - self.start).total_seconds()


def run_times(path: Path | None) -> tuple[datetime | None, datetime | None]:
    """The ``start`` and ``end`` stamps of a times file (``date -u`` format), None for one
    that is missing."""
    stamps: dict[str, datetime] = {}
    for line in (path.read_text().splitlines() if path else []):
        words = line.split()
        for key in ("start", "end"):
            if key in words:
                text = " ".join(words[words.index(key) + 1:])
                stamps[key] = datetime.strptime(text, "%a %b %d %H:%M:%S %Z %Y")
    return stamps.get("start"), stamps.get("end")


def load_figures(path: Path, start: datetime | None = None,
                 end: datetime | None = None) -> dict[str, float] | None:
    """Min, median and max of the 1-minute load average sampled during a run (the samples of
    ``path`` whose time of day lies between ``start`` and ``end``; all of them without both),
    None when no sample does."""
    samples = []
    for line in path.read_text().splitlines():
        words = line.split()
        if len(words) < 2:
            continue
        if start is not None and end is not None:
            stamp = datetime.strptime(words[0], "%H:%M:%S").time()
            if start.time() <= end.time():
                inside = start.time() <= stamp <= end.time()
            else:  # the run went past midnight
                inside = stamp >= start.time() or stamp <= end.time()
            if not inside:
                continue
        samples.append(float(words[1]))
    if not samples:
        return None
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples),
            "samples": len(samples)}


def retrained_test(sweep_dir: Path) -> dict:
    """The test scores of the sweep's best config retrained on train+validation, and the
    seconds the retrain took (``final.retrain=true``'s path, run here afterwards)."""
    import time

    import sweeper
    from sweeper.data import load_splits
    from sweeper.evaluate import export_best
    from sweeper.results import load_records, rank

    out = sweep_dir.parent / f"{sweep_dir.name}_retrained"
    cfg = sweeper.compose(["+experiment=cnn_tuned", "data=fashion_mnist", "final.retrain=true",
                           f"sweep_dir={out}"])
    records = load_records(sweep_dir / "trials", cfg.search.metric, cfg.search.mode,
                           cfg.train.epochs)
    best = rank(records, cfg.search.mode)[0]
    splits = load_splits(cfg.data, cfg.train.validation_fraction, cfg.train.seed)
    out.mkdir(exist_ok=True)
    started = time.monotonic()
    test = export_best(cfg, best, splits, out)
    return {**test, "seconds": time.monotonic() - started, "epochs": best.best_epoch}


def recorded_run(label: str, path: Path = RESULTS) -> Run | None:
    """The column headed ``label`` as this section of ``path`` records it, with its line in
    the list of commands; None when the section has no such column."""
    text = common.recorded_section(path, SECTION)
    lines = text.splitlines()
    header = next((line for line in lines if line.startswith("| | ")), None)
    names = [name.strip() for name in header.strip("|").split("|")][1:] if header else []
    line = next((line for line in lines if line.startswith(f"- {label}: ")), None)
    if label not in names or line is None:
        return None
    column = names.index(label) + 1
    cells = {}
    for row in lines[lines.index(header) + 2:]:
        if not row.startswith("| "):
            break
        parts = [part.strip() for part in row.strip().strip("|").split(" | ")]
        cells[parts[0]] = parts[column]
    return Run(label, None, COMMAND, recorded=(line, cells))


def _line(run: Run) -> str:
    if run.recorded:
        return run.recorded[0]
    when = (f", {run.start:%Y-%m-%d %H:%M}-{run.end:%H:%M} UTC" if run.start and run.end
            else "")
    return f"- {run.label}: `{run.command}` (folder `{run.sweep_dir.name}`{when})"


def _cells(run: Run, load_path: Path | None) -> dict[str, str]:
    """One column of the table: what ``run``'s summary.json says, keyed by row name."""
    if run.recorded:
        return run.recorded[1]
    summary = json.loads((run.sweep_dir / "summary.json").read_text())
    best, test = summary["best"], summary.get("test") or {}
    counts = ", ".join(f"{count} {status}" for status, count in summary["trial_counts"].items())
    load = load_figures(load_path, run.start, run.end) if load_path else None
    source = " (retrained)" if test.get("source") == "retrain" else " (the trial's checkpoint)"
    return {
        "state": str(summary.get("state")),
        "time budget": (f"{summary['time_budget_s']:g} s, spent" if "time_budget_s" in summary
                        else "not reached: every trial ended"),
        "wall time (start to results)": f"{run.wall_s:.0f} s" if run.wall_s else "n/a",
        "trials": f"{summary['num_trials']} ({counts})",
        "epochs trained": f"{summary['epochs_trained']} of {summary['epochs_full_budget']} "
                          "for a full-budget search",
        "best trial": f"{best['trial_id']} at epoch {best['epoch']} of "
                      f"{best['epochs_trained']} trained",
        f"validation {summary['metric']}": f"{best['metric_value']:.4f}",
        "test accuracy (read once)": (f"**{test['accuracy']:.4f}**{source}" if test else "n/a"),
        "test macro F1": f"{test['f1_macro']:.4f}" if test else "n/a",
        "load average during the run (1 min, 2 cores)": (
            f"min {load['min']:.1f}, median {load['median']:.1f}, max {load['max']:.1f} "
            f"({load['samples']} samples)" if load else "n/a"),
        "best config": ", ".join(f"`{key}={value:.4g}`" if isinstance(value, float) else
                                 f"`{key}={value}`" for key, value in best["config"].items()),
    }


def section(runs: list[Run], load_path: Path | None = None,
            retrained: dict | None = None) -> str:
    """RESULTS.md's section: a table with a column for each of ``runs`` (cnn_tuned's first),
    the commands, and the earlier runs."""
    columns = [_cells(run, load_path) for run in runs]
    lines = [common.section_opening(SECTION, "benchmarks.cnn_tuned") + "read from the sweeps:",
             "", *(_line(run) for run in runs), ""]
    lines += ["| | " + " | ".join(run.label for run in runs) + " |",
              "|---|" + "---|" * len(runs)]
    lines += [f"| {row} | " + " | ".join(column.get(row, "n/a") for column in columns) + " |"
              for row in columns[0]]
    if retrained:
        lines.append("")
        lines.append(f"{runs[0].label}'s best config retrained on train+validation afterwards "
                     f"(`--retrain`): test accuracy {retrained['accuracy']:.4f}, macro F1 "
                     f"{retrained['f1_macro']:.4f} ({retrained['epochs']} epochs, "
                     f"{retrained['seconds']:.0f} s).")
    lines += ["", READING] if READING else []
    lines += ["", "Earlier runs on Fashion-MNIST:", ""]
    lines += [f"- {name}: {figure}" for name, figure in EARLIER]
    return "\n".join(lines) + "\n"


def recorded_section(path: Path = RESULTS) -> str:
    """This section of the results file ("" if it has none), for ``python -m benchmarks``,
    which writes the file anew."""
    return common.recorded_section(path, SECTION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, nargs="?",
                        help="the cnn_tuned sweep's folder (default: its recorded column)")
    parser.add_argument("--times", type=Path, help="its start and end times")
    parser.add_argument("--wide", type=Path, help="the same hour's cnn_wide sweep folder")
    parser.add_argument("--wide-times", type=Path, help="its start and end times")
    parser.add_argument("--load", type=Path, help="load averages sampled during the runs")
    parser.add_argument("--retrain", action="store_true",
                        help="also score cnn_tuned's best config retrained on train+validation")
    parser.add_argument("--write", action="store_true", help="record it in RESULTS.md")
    args = parser.parse_args()
    if args.sweep_dir:
        runs = [Run("cnn_tuned", args.sweep_dir, COMMAND, *run_times(args.times))]
    elif (kept := recorded_run("cnn_tuned")) is not None:
        runs = [kept]
    else:
        parser.error(f"{RESULTS} records no cnn_tuned column to keep; give SWEEP_DIR")
    if args.wide:
        runs.append(Run("cnn_wide, same budget", args.wide, WIDE_COMMAND,
                        *run_times(args.wide_times)))
    retrained = retrained_test(args.sweep_dir) if args.retrain and args.sweep_dir else None
    text = section(runs, args.load, retrained)
    print(text)
    if args.write:
        common.record_section(RESULTS, SECTION, text)


if __name__ == "__main__":
    main()
