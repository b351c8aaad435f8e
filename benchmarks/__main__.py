"""Run sweeper's benchmarks side by side and write benchmarks/RESULTS.md.

    python -m benchmarks              # all (over an hour on 2 cores)
    python -m benchmarks utilization throughput scaling   # a subset
    python -m benchmarks scaling bookkeeping --scaling-sizes 16:0.5,64:1,128:2

Every comparison is measured in this one invocation, on this machine, as ratios or medians;
the same code path as `python -m sweeper` is measured (sweeper.run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from benchmarks import (
    cnn_tuned,
    data_loading,
    own_model,
    plots,
    scaling,
    search_efficiency,
    throughput,
    utilization,
    worker_memory,
)
from benchmarks.common import markdown_table, ray_session

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ALL = ("utilization", "throughput", "search", "scaling", "bookkeeping", "memory")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", nargs="*", help=f"any of {', '.join(ALL)} (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--search-trials", type=int, default=search_efficiency.NUM_TRIALS,
                        metavar="N", help="trials per search in the search benchmark "
                        f"(default {search_efficiency.NUM_TRIALS})")
    parser.add_argument("--scaling-sizes", type=_sizes, default=scaling.DEFAULT_SIZES,
                        metavar="N:S,...", help="concurrent dummy trials and seconds between "
                        "their reports in the scaling benchmark (default "
                        + ",".join(f"{n}:{s:g}" for n, s in scaling.DEFAULT_SIZES) + ")")
    parser.add_argument("--bookkeeping", type=_bookkeeping, default=scaling.BOOKKEEPING,
                        metavar="TRIALS:AT_ONCE:SECONDS", help="the bookkeeping benchmark's "
                        "trials, trials at once and seconds a trial (default "
                        + ":".join(f"{n:g}" for n in scaling.BOOKKEEPING) + ")")
    args = parser.parse_args()
    chosen = args.benchmarks or list(ALL)
    unknown = sorted(set(chosen) - set(ALL))
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(ALL)}")
    if args.search_trials < 1:
        parser.error(f"--search-trials must be at least 1, got {args.search_trials}")

    ray_session(num_cpus=2)
    # A subset re-measures its benchmarks and keeps the others' figures from the last run.
    raw = args.out.with_suffix(".json")
    figures = _earlier_figures(raw)
    ran = figures.setdefault("measured", {})
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="sweeper-bench-") as tmp:
        workdir = Path(tmp)
        if "utilization" in chosen:
            figures["utilization"] = utilization.measure(workdir)
            figures["driver_peak_rss_mb"] = utilization.driver_peak_rss_mb(workdir)
            figures["worker_start"] = utilization.worker_start(workdir)
        if "throughput" in chosen:
            figures["throughput"] = throughput.measure(workdir)
        if "search" in chosen:
            figures["search"] = search_efficiency.measure(workdir, args.search_trials)
        if "scaling" in chosen:
            figures["scaling"] = _scaling(workdir, args.scaling_sizes)
        if "bookkeeping" in chosen:
            figures["bookkeeping"] = {"rows": scaling.bookkeeping(workdir, *args.bookkeeping),
                                      "load": os.getloadavg()}
        if "memory" in chosen:
            figures["worker_memory"] = worker_memory.measure()
    ran.update({name: stamp for name in chosen})
    _draw(figures, args.out.parent)
    text = _render(figures)
    # Measured (or, for cnn_tuned, read from its sweep) by their own commands.
    for own_command in (data_loading, own_model, cnn_tuned):
        kept = own_command.recorded_section(args.out)
        if kept:
            text = f"{text}\n{kept}"
    print(text)
    args.out.write_text(text + "\n")
    raw.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"\nWritten to {args.out}; every figure in {raw}")


def _sizes(text: str) -> tuple[tuple[int, float], ...]:
    try:
        return tuple((int(n), float(s)) for n, s in (part.split(":") for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give N:SECONDS pairs, e.g. 64:0.5,256:1") from None


def _bookkeeping(text: str) -> tuple[int, int, float]:
    try:
        trials, at_once, seconds = text.split(":")
        parsed = int(trials), int(at_once), float(seconds)
    except ValueError:
        parsed = (0, 0, 0.0)
    if min(parsed) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give TRIALS:AT_ONCE:SECONDS, all above 0, e.g. 2000:16:1")
    return parsed


def _draw(figures: dict, folder: Path) -> None:
    """The figures beside the results file, from whatever figures it will hold."""
    if "utilization" in figures:
        plots.plot_utilization(figures["utilization"], folder / plots.UTILIZATION_PNG)
    methods = figures.get("search", {}).get("methods", {})
    if any(row.get("curve") for method in methods.values() for row in method["per_seed"]):
        plots.plot_search(figures["search"], folder / plots.SEARCH_PNG)


def _earlier_figures(path: Path) -> dict:
    """The figures of an earlier run ({} if there are none to read)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _render(figures: dict) -> str:
    ran = figures.get("measured", {})
    when = ", ".join(f"{name} {stamp}" for name, stamp in ran.items())
    sections = [f"# Benchmark results\n\n`python -m benchmarks` on {platform.node()} "
                f"({platform.machine()}, 2 CPUs for Ray); measured: {when}. Ratios and medians "
                "of runs made side by side in one invocation.\n"]
    if "utilization" in figures:
        sections.append(_utilization_section(figures["utilization"],
                                             figures["driver_peak_rss_mb"]))
        if "worker_start" in figures:
            sections.append(_worker_start_section(figures["worker_start"]))
    if "throughput" in figures:
        sections.append(_throughput_section(figures["throughput"]))
    if "search" in figures:
        sections.append(_search_section(figures["search"]))
    if "scaling" in figures:
        sections.append(_scaling_section(figures["scaling"]))
    if "worker_memory" in figures:
        sections.append(_worker_memory_section(figures["worker_memory"]))
    if "bookkeeping" in figures:
        sections.append(_bookkeeping_section(figures["bookkeeping"]))
    return "\n".join(sections)


def _worker_memory_section(result: dict) -> str:
    table = markdown_table(
        ["trials rebuild their model for", "trials", "RSS after first MiB", "RSS after last MiB",
         "growth MiB/trial"],
        [[label, row["trials"], row["first_mb"], row["last_mb"], row["growth_mb_per_trial"]]
         for label, row in result.items()])
    return ("## 6. Memory of a reused worker that rebuilds its model every trial\n\n"
            "`python -m benchmarks.worker_memory`: the trial path of a reused worker "
            "(`WarmModel.get`, then `train`: one epoch on 800 Fashion-MNIST images) run N "
            "times in one fresh process per row; growth = least-squares slope of the resident "
            "set size after each trial, from the first quarter on. Without the workaround, "
            "TensorFlow's gradient registry keeps every trained model's traced graphs "
            "(tensorflow/tensorflow#97697); `sweeper.compat.forget_custom_gradients` drops "
            "them when the worker rebuilds. Target: at most 0.5 MB (0.48 MiB) a trial."
            f"\n\n{table}\n")


def _utilization_section(rows: list[dict], driver_rss: float) -> str:
    headline = markdown_table(
        ["experiment", "sweep", "trials", "epochs", "utilization", "all runs", "after start",
         "in fit", "trial start -> first step s", "trial end -> next first step s",
         "CPUs busy in start (driver)", "worker peak RSS MB"],
        [[r["experiment"], r["sweep"], r["trials"], r["epochs"], r["utilization"],
          ", ".join(f"{value:.3f}" for value in r.get("utilization_runs", [])),
          r["utilization"] / (1 - r["breakdown"]["start"]),
          r.get("fit_utilization", r["utilization"] + r["breakdown"]["validation"]),
          r.get("start_to_first_step_s", "-"), r.get("end_to_next_first_step_s", "-"),
          _start_cpu(r), r["worker_peak_rss_mb"]] for r in rows])
    parts = ("validation", "start", "reporting", "switching", "tail")
    breakdown = markdown_table(
        ["experiment", "sweep", "training steps", "of which first steps", *parts,
         "overhead s/trial"],
        [[r["experiment"], r["sweep"], r["utilization"], r.get("first_steps_share", "-"),
          *(r["breakdown"][part] for part in parts), r["overhead_per_trial_s"]] for r in rows])
    return ("## 1. Utilization (2 concurrent trials) and 4. memory\n\n"
            "Utilization = time in training steps summed over trials / (wall time from the "
            "sweep's start to its last report x 2), for the run with the median utilization (all "
            "runs: every run's, alternating sweeper and plain); after start = the same without "
            "the one-time start, what a long sweep tends to; in fit = training steps and "
            "validation passes (all of `fit`, the model's own work). Trial start -> first step: "
            "median over trials from entering the trainable to the end of the first training "
            "step (a fresh worker's TensorFlow import and tracing for the first trials; for the "
            "plain way, every trial's). Trial end -> next first step: median over hand-overs "
            "from a trial's last report to the end of the first step of the trial that took its "
            "place (ASHA's stop decision, the worker's release and the next trial's start). "
            "CPUs busy in start: share of the machine's CPU time in use from the sweep's start "
            "to the last first worker's fit (from /proc/stat), and in brackets the driver's "
            "share of it: near 1 means the start is the workers' own CPU work (Ray worker, "
            "imports), with no idle CPU to hide it in. Plain Ray Tune = the documentation's way "
            "(TF import, data loading and model building in every trial, default Tuner "
            f"settings).\n\n{headline}\n\n"
            "Where the workers' time went (shares of wall time x 2, same runs): training steps "
            "(of which first steps: the first step of every trial's fit, mostly the tracing of "
            "the training step on a fresh worker); validation passes; start (sweep start to "
            "each worker's first fit: Ray workers, imports, data, model); reporting (between a "
            "trial's epochs: report and checkpoint); switching (from a trial's end to the next "
            "trial's fit; for the plain way this includes the TensorFlow import, data loading "
            "and model building of every trial); tail (workers idle while the last trial "
            "finishes). Overhead = worker-seconds per trial not in training steps.\n\n"
            f"{breakdown}\n\n![Where the workers' time goes]({plots.UTILIZATION_PNG})\n\n"
            f"Driver (`python -m sweeper +experiment=smoke`) peak RSS: {driver_rss:.0f} MB.\n")


def _worker_start_section(result: dict) -> str:
    runs = result["runs"]
    rows = [[label, figures["start_s"], figures["start_cpu_s"]] for label, figures in runs.items()]
    with_env, without = runs[utilization.WITH_ENV], runs[utilization.WITHOUT_ENV]
    rows.append(["with / without", with_env["start_s"] / without["start_s"],
                 with_env["start_cpu_s"] / without["start_cpu_s"]])
    table = markdown_table(["trial actors", "start s", "CPU-s in start (whole machine)"], rows)
    variable = "=".join(utilization.FORWARDED_VARIABLE)
    return ("### Start of fresh trial workers, with and without a runtime env\n\n"
            "Any runtime env on an actor makes Ray start its worker through a second Python "
            "process (Ray's setup_worker.py shim, which imports Ray only to start the real "
            "worker). Tune gives its trial actors one (environment variables for PyTorch "
            "Lightning); sweeper starts its trials without it (`tuner.tune_settings`). Here a "
            "2-trial, 1-epoch sweep: start = from the sweep's start to the later worker's first "
            "fit, CPU-s = the machine's busy CPU time in that window; \"with a runtime env\" "
            "gets one as a user's sweep would, from a variable Tune forwards to its trials "
            f"(`{variable}`, Tune's default value); median of {result['pairs']} alternating "
            f"pairs.\n\n{table}\n")


def _start_cpu(row: dict) -> str:
    if "start_cpu_busy" not in row:  # figures from before this column existed
        return "-"
    return f"{row['start_cpu_busy']:.2f} ({row['start_cpu_driver']:.2f})"


def _throughput_section(result: dict) -> str:
    table = markdown_table(["sweeper trial images/s", "plain model.fit images/s", "ratio"],
                           [[result["sweeper_images_per_s"], result["plain_images_per_s"],
                             result["ratio"]]])
    levers = markdown_table(["option (same trial)", "images/s vs float32 default"],
                            [[name, ratio] for name, ratio in result.get("levers", {}).items()])
    fixed = result.get("fixed_costs")
    fixed_table = "\n\n" + _fixed_costs_table(fixed) if fixed else ""
    return ("## 2. Trainer throughput (1 thread, batch 32, median of alternating runs)\n\n"
            f"{table}\n\nOptions a user can turn on (`train.precision`, `train.jit_compile`), "
            f"measured on this CPU:\n\n{levers}\n\nFixed costs of a trial "
            "(`python -m benchmarks.fixed_costs`): a checkpoint as the variables in an .npz "
            "against a Keras archive, the first training step after a warm worker's "
            "hand-over against one that sets TensorFlow's global seed again, and a new "
            "model's build and first step with the optimizer's and metrics' variables created "
            "up front against left to Keras' first trace (which then traces the step twice)."
            f"{fixed_table}\n")


def _fixed_costs_table(fixed: dict) -> str:
    rows = []
    for what, costs in (("checkpoint write, every epoch", fixed["checkpoint_ms"]),
                        ("first step of a trial on a warm worker",
                         fixed["first_step_after_handover_ms"]),
                        ("build and first step of a new model",
                         fixed.get("new_model_first_step_ms"))):
        if costs is None:  # figures from before this cost was measured
            continue
        before = next(value for name, value in costs.items() if name != "sweeper")
        rows.append([what, costs["sweeper"], before, before / costs["sweeper"]])
    return markdown_table(["fixed cost (1 thread)", "sweeper ms", "before ms",
                           "before / sweeper"], rows)


def _search_section(result: dict) -> str:
    rows = [[name, m["epochs_to_target"], m["seconds_to_target"],
             m.get("epochs_to_random_final", "-"), m["best_within_budget"], m["final_best"],
             m["epochs_total"]] for name, m in result["methods"].items()]
    table = markdown_table(["search", "epochs to target", "seconds to target",
                            "epochs to random's final best",
                            f"best within {result['budget_epochs']} epochs", "final best",
                            "epochs trained"], rows)
    methods = result["methods"]
    asha = methods["TPE + ASHA"]["epochs_to_target"]
    random_full = methods["random, no early stopping"]["epochs_to_target"]
    total_ratio = (methods["random, no early stopping"]["epochs_total"]
                   / methods["TPE + ASHA"]["epochs_total"])
    per_seed = markdown_table(
        ["search", *(f"seed {seed}" for seed in search_efficiency.SEEDS)],
        [[name, *(f"{row['epochs_to_target']:g} / {row['epochs_to_random_final']:g}"
                  for row in m["per_seed"])] for name, m in methods.items() if "per_seed" in m])
    trials = result.get("num_trials", search_efficiency.NUM_TRIALS)
    return (f"## 3. Search efficiency ({trials} trials a search, medians over seeds "
            f"{search_efficiency.SEEDS})\n\n"
            f"Target val_accuracy {result['target']} (reached by every random full-budget "
            "run). Epochs to random's final best: until the search matches the best model "
            "random search without early stopping found with its whole budget, seed by seed "
            f"(inf: never).\n\n{table}\n\nRandom without early stopping needs "
            f"{random_full / asha:.1f}x the epochs of TPE + ASHA to reach the target; over the "
            f"whole sweep it trains {total_ratio:.1f}x the epochs of TPE + ASHA.\n\n"
            "Seed by seed, epochs to the target / to random's final best (the searches share "
            "their first random trials, so a good early draw decides a seed for all of them):"
            f"\n\n{per_seed}\n\n![Best val_accuracy so far against epochs trained]"
            f"({plots.SEARCH_PNG})\n")


def _scaling(workdir: Path, sizes: tuple) -> dict:
    import os

    rows = scaling.measure(workdir, sizes)
    after = [row for row in rows if row["driver"] == "sweeper"]
    return {"rows": rows, "profiles": scaling.profiles(workdir, *sizes[0]),
            "searcher": scaling.searcher_cost(),
            "study": scaling.study_cost(workdir),
            "projections": {f"{epoch:g} s": scaling.project(after[-1]["ms_per_result"], epoch)
                            for epoch in (1.0, 4.0, 10.0)},
            "load": os.getloadavg()}


def _scaling_section(result: dict) -> str:
    if "rows" not in result:  # figures of the on-paper benchmark before issue 26
        return ""
    doc = scaling.__doc__.split(chr(10), 2)[2].strip()
    by_size: dict = {}
    for row in result["rows"]:
        by_size.setdefault((row["concurrent"], row["interval_s"]), []).append(row)
    tables = []
    for (concurrent, interval), rows in by_size.items():
        plain = next(row for row in rows if row["driver"] == "Ray Tune, no loggers")
        logged = next(row for row in rows if row["driver"] == "Ray Tune, default loggers")
        tables.append(f"{concurrent} trials at once, each reporting every {interval:g} s:\n\n"
                      + markdown_table(
                          ["driver", "results", f"results/s (the trials' pace: "
                           f"{concurrent / interval:g})", "driver busy (CPU / wall)",
                           "driver CPU ms a result",
                           "against Ray Tune without loggers", "against Ray Tune with them"],
                          [[row["driver"], row["results"], f"{row['results_per_s']:.1f}",
                            f"{row['cpu_s'] / row['wall_s']:.2f}",
                            f"{row['ms_per_result']:.2f}",
                            f"{row['ms_per_result'] / plain['ms_per_result']:.2f}x",
                            f"{row['ms_per_result'] / logged['ms_per_result']:.2f}x"]
                           for row in rows]))
    profiles = result["profiles"]
    labels = list(profiles["before"]["parts"])
    profile = markdown_table(
        ["part of the driver", "before: CPU ms a result", "after: CPU ms a result"],
        [[label, *(f"{1000 * profiles[when]['parts'][label] / profiles[when]['results']:.2f}"
                   for when in ("before", "after"))] for label in labels])
    searcher = markdown_table(
        ["finished trials", "Optuna's TPE (ms a suggestion)", "sweeper's (window of "
         f"{scaling_window()} trials)"],
        [[row["finished_trials"], f"{row['optuna_tpe_ms']:.1f}", f"{row['sweeper_ms']:.1f}"]
         for row in result["searcher"]])
    study = markdown_table(
        ["trials running beside it", "SQLite file (sweeper's study before): ms a trial",
         "Optuna's journal file (sweeper's study now): ms a trial", "SQLite against journal"],
        [[row["running_trials"], f"{row['sqlite_ms']:.1f}", f"{row['journal_ms']:.1f}",
          f"{row['sqlite_ms'] / row['journal_ms']:.2f}x"] for row in result.get("study", [])])
    projection = "\n".join(
        f"- epochs of {label}: " + ", ".join(
            f"{row['concurrent_trials']} trials busy {row['driver_busy']:.2f}"
            for row in rows) for label, rows in result["projections"].items())
    load = ", ".join(f"{value:.1f}" for value in result["load"])
    return (f"## 5. The driver's cost per result\n\n{doc}\n\nLoad average at the end "
            f"(other sessions shared this 2-core machine): {load}.\n\n"
            + "\n\n".join(tables)
            + "\n\nWhere the driver's CPU goes (cProfile, CPU time, sweeper at the first size; "
            "profiling slows it, so parts are shares of a slower whole; the callbacks' lines "
            "are parts of \"callbacks\"):\n\n" + profile
            + "\n\nTPE's suggestion as the study grows (wide space, in-memory study):\n\n"
            + searcher
            + (f"\n\nThe study's cost of one trial (TPE's ask and the tell) while others run, "
               f"{result['study'][0]['finished_trials']} finished trials of the wide space "
               "stored, each running trial with 10 epochs "
               "(`benchmarks.scaling.study_cost`):\n\n" + study if result.get("study") else "")
            + "\n\nProjection from sweeper's measured cost per result: the driver is busy "
            "rho = trials x cost / epoch of the time (past 1 the trials wait for it):\n\n"
            + projection + "\n")


def _bookkeeping_section(result: dict) -> str:
    rows = result["rows"]
    first = rows[0]
    doc = ("Ray Tune's release test `bookkeeping_overhead` (10 000 one-second trials, one "
           "result each, on 16 CPUs in at most 800 s against the ideal 625 s: 1.28x) scaled to "
           "this machine (`benchmarks.scaling.bookkeeping`): each trial trains one epoch of "
           f"{first['interval_s']:g} s and reports it with a checkpoint; each asks "
           f"2 / {first['concurrent']} CPUs. Plain Ray Tune as in the release test (default "
           "loggers, random search, FIFO; its TUNE_GLOBAL_CHECKPOINT_S tweak left out) and "
           "sweeper's driver (TPE on the journal study, ASHA, callbacks): one run each, plain "
           "Tune first. Ideal: trials x seconds / trials at once; the measured wall time "
           "includes starting the Ray workers (Ray starts as many at a time as the node has "
           "CPUs).")
    table = markdown_table(
        ["driver", "trials", "results", "wall s", "ideal s", "wall against ideal",
         "driver CPU ms a trial"],
        [[row["driver"], row["trials"], row["results"], f"{row['wall_s']:.0f}",
          f"{row['ideal_s']:g}", f"{row['wall_s'] / row['ideal_s']:.2f}x",
          f"{1000 * row['cpu_s'] / row['trials']:.1f}"] for row in rows])
    load = ", ".join(f"{value:.1f}" for value in result["load"])
    return (f"## 7. Bookkeeping: {first['trials']} trials of {first['interval_s']:g} s, "
            f"{first['concurrent']} at once\n\n{doc}\n\nLoad average at the end: {load}.\n\n"
            f"{table}\n")


def scaling_window() -> int:
    from sweeper.searcher import TPE_WINDOW

    return TPE_WINDOW


if __name__ == "__main__":
    main()
