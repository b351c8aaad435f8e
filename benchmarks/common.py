"""Shared pieces of the benchmarks: running sweeps the way `python -m sweeper` does, reading
what the trials reported, and small statistics. Every figure is a ratio or a median of runs
made side by side in one invocation; bare seconds on these machines mean little."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class PeriodicSampler:
    """Calls :meth:`sample` when entered, every ``every_s`` seconds from a thread while the
    ``with`` block runs, and once more when it leaves; subclasses say what a sample is."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def available(self) -> bool:
        """Whether this machine can be sampled (if not, nothing is sampled)."""
        return True

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self):
        if self.available():
            self.sample()
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.sample()


class CpuSampler(PeriodicSampler):
    """The machine's CPU time, busy and in all, and this process's, sampled 20 times a second
    while a sweep runs (Linux ``/proc/stat``: one file read and ``os.times`` per sample, so
    the sampling itself costs next to nothing).

    Used as a context manager; :meth:`busy_shares` then says how busy the CPUs were in a
    window of the sweep and which share of them this process (the sweep's driver) took.
    """

    PROC_STAT = "/proc/stat"

    def __init__(self) -> None:
        super().__init__(every_s=0.05)
        # (wall clock, busy CPU-seconds, all CPU-seconds, this process's CPU-seconds)
        self.samples: list[tuple[float, float, float, float]] = []
        self._ticks = os.sysconf("SC_CLK_TCK")

    def available(self) -> bool:
        return os.path.exists(self.PROC_STAT)  # elsewhere (macOS) the figures stay nan

    def sample(self) -> None:
        with open(self.PROC_STAT) as stat:
            # user nice system idle iowait irq softirq steal (guest time is inside user)
            ticks = [int(value) for value in stat.readline().split()[1:9]]
        own = os.times()
        total = sum(ticks) / self._ticks
        idle = (ticks[3] + ticks[4]) / self._ticks
        self.samples.append((time.time(), total - idle, total, own.user + own.system))

    def busy_shares(self, start: float, end: float) -> tuple[float, float]:
        """(share of all CPUs busy, share of all CPUs this process used) from start to end."""
        if not self.samples:
            return float("nan"), float("nan")
        first, last = self._nearest(start), self._nearest(end)
        total = last[2] - first[2]
        if total <= 0:
            return float("nan"), float("nan")
        return (last[1] - first[1]) / total, (last[3] - first[3]) / total

    def busy_seconds(self, start: float, end: float) -> float:
        """CPU-seconds the machine (all its processes) used from start to end."""
        if not self.samples:
            return float("nan")
        return self._nearest(end)[1] - self._nearest(start)[1]

    def _nearest(self, when: float) -> tuple[float, float, float, float]:
        return min(self.samples, key=lambda sample: abs(sample[0] - when))


@dataclass
class SweepRun:
    """What one benchmarked sweep did, read back from its trials' result rows."""

    label: str
    started_at: float  # wall clock just before the sweep was asked to run
    rows: dict[str, list[dict[str, Any]]]  # trial id -> its result rows in order
    concurrency: int
    # (all CPUs busy, the driver's share) from the sweep's start to the last worker's first
    # fit: whether the one-time start waits on something or is the workers' own CPU work.
    start_cpu: tuple[float, float] = field(default=(float("nan"), float("nan")))
    start_cpu_s: float = float("nan")  # the machine's busy CPU-seconds in that window

    @property
    def all_rows(self) -> list[dict[str, Any]]:
        return sorted((row for rows in self.rows.values() for row in rows),
                      key=lambda row: row["reported_at"])

    @property
    def wall_s(self) -> float:
        """From the request to run until the last trial's last report."""
        return max(row["reported_at"] for row in self.all_rows) - self.started_at

    @property
    def worker_s(self) -> float:
        """The workers' time: wall time x concurrent trials."""
        return self.wall_s * self.concurrency

    @property
    def train_s(self) -> float:
        return sum(row["train_time_s"] for row in self.all_rows)

    @property
    def utilization(self) -> float:
        """Share of the workers' time spent in training steps."""
        return self.train_s / self.worker_s

    @property
    def first_steps_share(self) -> float:
        """Share of the workers' time in the first step of each trial's fit (part of the
        training time: on a fresh worker it traces the training step, ~0.9 s here)."""
        return (sum(row.get("first_step_s", 0.0) for row in self.all_rows)
                / self.worker_s)

    @property
    def fit_utilization(self) -> float:
        """Share of the workers' time spent in ``fit``: training steps and validation passes,
        the model's own work that a plain Keras script with validation data does as well."""
        return (self.train_s + self.val_s) / self.worker_s

    @property
    def overhead_per_trial_s(self) -> float:
        """Worker-seconds per trial not spent in training steps."""
        return (self.worker_s - self.train_s) / len(self.rows)

    @property
    def trials_by_start(self) -> list[list[dict[str, Any]]]:
        """Each trial's rows, in the order the trials entered their trainable."""
        return sorted(self.rows.values(), key=lambda rows: rows[0]["trial_started_at"])

    @staticmethod
    def _first_step_done(rows: list[dict[str, Any]]) -> float:
        return rows[0]["fit_started_at"] + rows[0].get("first_step_s", 0.0)

    @property
    def start_to_first_step_s(self) -> float:
        """Median time from a trial's entry into its trainable to the end of its first
        training step (on a fresh worker: the model's build and the step's tracing)."""
        return statistics.median(self._first_step_done(rows) - rows[0]["trial_started_at"]
                                 for rows in self.rows.values())

    @property
    def end_to_next_first_step_s(self) -> float:
        """Median time from a trial's last report to the end of the first training step of the
        trial that took its place (nan if no trial ever took another's place).

        Every trial after the first ``concurrency`` waits for a running one to end, so the k-th
        of them to start takes the place of the k-th trial to end.
        """
        trials = self.trials_by_start
        ends = sorted(rows[-1]["reported_at"] for rows in trials)
        gaps = [self._first_step_done(rows) - end
                for rows, end in zip(trials[self.concurrency:], ends, strict=False)]
        return statistics.median(gaps) if gaps else float("nan")

    @property
    def start_ended_at(self) -> float:
        """When the last of the first ``concurrency`` trials started its fit."""
        trials = self.trials_by_start
        return max(rows[0]["fit_started_at"] for rows in trials[: self.concurrency])

    def breakdown(self) -> dict[str, float]:
        """Where the workers' time went, as shares of (wall time x concurrent trials).

        train: training steps (each fit's first step included); validation: the per-epoch
        validation pass; start: from the sweep's start to each worker's first fit (Ray workers,
        imports, data, model); reporting: within trials, between one epoch's end and the next
        one's start (report, checkpoint); switching: from one trial's end to the next trial's
        fit on a worker (for the plain way this includes the TensorFlow import, data loading and
        model building of every trial); tail: workers idle while the last trials finish.
        """
        total = self.worker_s
        trials = self.trials_by_start
        start = sum(rows[0]["fit_started_at"] - self.started_at
                    for rows in trials[: self.concurrency])
        reporting = 0.0
        for rows in trials:
            previous = rows[0]["fit_started_at"]
            for row in rows:
                reporting += (row["reported_at"] - previous - row["train_time_s"]
                              - row.get("val_time_s", 0.0))
                previous = row["reported_at"]
        ends = sorted(rows[-1]["reported_at"] for rows in trials)
        tail = sum(self.started_at + self.wall_s - end for end in ends[-self.concurrency:])
        shares = {"train": self.train_s, "validation": self.val_s, "start": start,
                  "reporting": reporting, "tail": tail}
        shares["switching"] = total - sum(shares.values())
        return {name: value / total for name, value in shares.items()}

    @property
    def val_s(self) -> float:
        return sum(row.get("val_time_s", 0.0) for row in self.all_rows)

    @property
    def epochs(self) -> int:
        return len(self.all_rows)

    def peak_rss_mb(self) -> float:
        return max(row.get("peak_rss_mb", 0.0) for row in self.all_rows)


def read_rows(experiment_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each trial's result rows (Ray Tune's result.json, one JSON object a line)."""
    rows = {}
    for result in sorted(experiment_dir.glob("*/result.json")):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines:
            rows[result.parent.name] = lines
    return rows


def sweeper_config(overrides: list[str]):
    """The validated config of `python -m sweeper OVERRIDES` (sweeper.compose: the same
    composition, the same checks)."""
    import sweeper

    return sweeper.compose(overrides)


def run_sweeper(label: str, overrides: list[str], workdir: Path, concurrency: int) -> SweepRun:
    """Run a sweep through sweeper.run, the function `python -m sweeper` calls."""
    import sweeper

    sweep_dir = workdir / label
    cfg = sweeper_config([*overrides, f"sweep_dir={sweep_dir}", f"name={label}",
                          "final.evaluate=false"])
    with CpuSampler() as cpu:
        started = time.time()
        sweeper.run(cfg)
    return measured_run(label, started, read_rows(sweep_dir / "trials"), concurrency, cpu)


def measured_run(label: str, started: float, rows: dict[str, list[dict[str, Any]]],
                 concurrency: int, cpu: CpuSampler) -> SweepRun:
    """A :class:`SweepRun` with the CPUs' business during its start filled in."""
    run = SweepRun(label, started, rows, concurrency)
    if rows:
        run.start_cpu = cpu.busy_shares(started, run.start_ended_at)
        run.start_cpu_s = cpu.busy_seconds(started, run.start_ended_at)
    return run


def median(values) -> float:
    return statistics.median(list(values))


def ray_session(num_cpus: int = 2):
    """One in-process Ray for all benchmarks, on loopback, so every run pays the same."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from sweeper.compat import init_local_ray

    if not ray.is_initialized():
        init_local_ray(num_cpus=num_cpus, include_dashboard=False,  # as sweeper starts its Ray
                       logging_level="ERROR", log_to_driver=False)
    return ray


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def recorded_section(path: Path, heading: str) -> str:
    """The section under ``heading`` of the results file at ``path`` ("" if it has none), so
    that ``python -m benchmarks``, which writes the file anew, keeps it."""
    content = path.read_text() if path.is_file() else ""
    if heading not in content:
        return ""
    section = heading + content.partition(heading)[2].split("\n## ", 1)[0]
    return section.rstrip("\n") + "\n"


def record_section(path: Path, heading: str, text: str) -> None:
    """Put ``text`` as the section under ``heading`` of ``path`` (replacing an earlier one)."""
    content = path.read_text() if path.is_file() else "# Benchmark results\n"
    if heading in content:
        before, _, after = content.partition(heading)
        rest = after.split("\n## ", 1)
        content = before + text + ("\n## " + rest[1] if len(rest) > 1 else "")
    else:
        content = content.rstrip("\n") + "\n\n" + text
    path.write_text(content.rstrip("\n") + "\n")


def section_opening(heading: str, module: str) -> str:
    """A measured section's heading and first words: the command that ran it, on how many
    cores, when (then the section says what was measured)."""
    import sys

    command = f"python -m {module} " + " ".join(sys.argv[1:])
    cores = len(os.sched_getaffinity(0))
    return (f"{heading}\n\n`{command.strip()}` on {cores} cores, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; ")
