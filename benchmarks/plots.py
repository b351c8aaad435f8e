"""The benchmark figures people would rather look at than read: where the workers' time goes,
and how fast each search finds a good model. Drawn with matplotlib's object API (no pyplot
state, no display), next to RESULTS.md."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

UTILIZATION_PNG = "utilization.png"
SEARCH_PNG = "search_efficiency.png"

# The order of the stacked shares, and their colours: training first, then the model's own
# validation work, then the overheads.
SHARES = (("train", "#2e7d32"), ("validation", "#81c784"), ("start", "#ef6c00"),
          ("reporting", "#6a1b9a"), ("switching", "#c62828"), ("tail", "#9e9e9e"))


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots()


def plot_utilization(rows: list[dict[str, Any]], path: Path) -> Path:
    """One stacked bar per benchmarked sweep: shares of the workers' time, training first."""
    figure, axes = _figure(9.0, 0.55 * len(rows) + 1.6)
    labels = [f"{row['experiment']}\n{row['sweep']}" for row in rows]
    positions = list(range(len(rows)))[::-1]
    left = [0.0] * len(rows)
    for part, colour in SHARES:
        widths = [row["breakdown"][part] for row in rows]
        axes.barh(positions, widths, left=left, color=colour, label=part, height=0.7)
        left = [start + width for start, width in zip(left, widths, strict=True)]
    for position, row in zip(positions, rows, strict=True):
        axes.text(0.01, position, f"{row['utilization']:.2f}", va="center", color="white",
                  fontsize=8, fontweight="bold")
    axes.axvline(0.9, color="black", linestyle="--", linewidth=1, label="0.9")
    axes.set_yticks(positions, labels, fontsize=7)
    axes.set_xlim(0, 1)
    axes.set_xlabel("share of the workers' time (wall time x concurrent trials)")
    axes.set_title("Where the workers' time goes (bar label: utilization, training steps only)")
    figure.legend(ncols=len(SHARES) + 1, loc="outside lower center", fontsize=7,
                  frameon=False)
    figure.savefig(path, dpi=110)
    return path


def median_curve(curves: list[list[list[float]]], epochs: int) -> list[float]:
    """The median over runs of the best value found within 1..``epochs`` epochs.

    Each curve lists ``[epochs trained, best so far]`` at the reports where the best improved;
    before its first point a run has found nothing (0), after its last it keeps its best.
    """
    def best_within(curve: list[list[float]], budget: int) -> float:
        return max((best for trained, best in curve if trained <= budget), default=0.0)

    return [statistics.median(best_within(curve, budget) for curve in curves)
            for budget in range(1, epochs + 1)]


def plot_search(result: dict[str, Any], path: Path) -> Path:
    """Best validation accuracy so far against epochs trained: each search's median over
    seeds (thick) and every seed (thin), with the target."""
    figure, axes = _figure(7.5, 4.5)
    colours = ("#1565c0", "#ef6c00", "#616161", "#8e24aa")
    styles = ("-", "-", "-", "--")
    drawn = list(zip(result["methods"].items(), colours, styles, strict=False))
    # The first search (TPE + ASHA) is drawn last, so that it is on top where lines overlap.
    for (name, method), colour, style in reversed(drawn):
        runs = [row for row in method["per_seed"] if row.get("curve")]
        if not runs:
            continue
        for row in runs:  # each seed's run, drawn to the epoch it ended at
            curve = row["curve"]
            xs = [trained for trained, _ in curve] + [row["epochs_trained"]]
            ys = [best for _, best in curve] + [curve[-1][1]]
            axes.step(xs, ys, where="post", color=colour, alpha=0.2, linewidth=0.8)
        longest = int(max(row["epochs_trained"] for row in runs))
        axes.step(range(1, longest + 1), median_curve([row["curve"] for row in runs], longest),
                  where="post", color=colour, linestyle=style, linewidth=2.2,
                  label=f"{name} (median)")
    axes.axhline(result["target"], color="black", linestyle="--", linewidth=1,
                 label=f"target {result['target']}")
    handles, labels = axes.get_legend_handles_labels()
    # Legend in the searches' own order, the target last.
    axes.legend([*handles[-2::-1], handles[-1]], [*labels[-2::-1], labels[-1]], fontsize=7,
                loc="lower right")
    axes.set_ylim(result["target"] - 0.12, None)
    axes.set_xlabel("epochs trained (all trials of the sweep)")
    axes.set_ylabel("best val_accuracy so far")
    axes.set_title("Search efficiency: the same seeds, trial counts and data")
    figure.savefig(path, dpi=110)
    return path
