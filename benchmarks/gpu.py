"""The GPU path, checked and measured on a machine with an NVIDIA GPU; writes RESULTS_GPU.md.

    python -m benchmarks.gpu                       # Fashion-MNIST from Debian's package
    python -m benchmarks.gpu --data DIR            # or from DIR (the four IDX .gz files)
    python -m benchmarks.gpu --cpu-rehearsal       # the same steps on CPUs, to try the script

1. Trainer throughput on the GPU: one trial with a whole GPU against plain ``model.fit`` on the
   same GPU in its own process, at batch 32 (the model's default) and 256; medians of
   alternating runs, as benchmark 2 does on the CPU.
2. Packing: the same 8-trial sweep (cnn_lr's learning-rate space, 3 epochs on all of
   Fashion-MNIST, no early stopping) with ``resources.gpu_per_trial=0.25`` (four trials share
   the GPU) and with ``gpu_per_trial=1`` (one at a time). Checked: every report names the GPU
   Ray gave the trial; four trials trained at once; each trial's TensorFlow allocated a small
   part of the GPU's memory (memory growth: TensorFlow's default reserves nearly all of it, so a
   second trial could not start), as TensorFlow and ``nvidia-smi`` count it. Measured: images/s
   of the whole sweep packed against one at a time, and the utilization of benchmark 1.

The packing runs first, then the throughput; the results files are written after each, so a
run cut short (a lent machine's time is short) keeps what it measured. A failed check exits 1
after writing what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PeriodicSampler, SweepRun, markdown_table, run_sweeper
from benchmarks.throughput import plain_images_per_s, sweeper_images_per_s, train_images

RESULTS = Path(__file__).resolve().parent / "RESULTS_GPU.md"
REPEATS = 2
PARTS = ("packing", "throughput")  # run in this order: the checks first
PACKED = 4  # trials sharing one GPU
TRIALS = 8


def nvidia_smi(*query: str) -> list[list[str]]:
    """Rows of an ``nvidia-smi --query-...`` call ([] where there is no nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return []
    output = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                            capture_output=True, text=True, check=False).stdout
    return [[cell.strip() for cell in line.split(",")] for line in output.splitlines()
            if line.strip()]


class GPUMemorySampler(PeriodicSampler):
    """Samples the GPU memory each process holds and the GPU's memory in use, as nvidia-smi
    reports them, while a sweep runs. What a process holds is what it reserved: TensorFlow's
    own peak counts only the bytes its allocator handed out of what it reserved."""

    def __init__(self, every_s: float = 0.5) -> None:
        super().__init__(every_s)
        self.peak_per_process_mb: dict[str, float] = {}
        self.peak_total_mb = 0.0
        self.peak_used_mb = 0.0  # the whole GPU (first one), all processes and contexts

    def sample(self) -> None:
        rows = nvidia_smi("--query-compute-apps=pid,used_memory")
        for pid, used in rows:
            self.peak_per_process_mb[pid] = max(self.peak_per_process_mb.get(pid, 0.0),
                                                float(used))
        self.peak_total_mb = max(self.peak_total_mb, sum(float(used) for _, used in rows))
        for (used,) in nvidia_smi("--query-gpu=memory.used")[:1]:
            self.peak_used_mb = max(self.peak_used_mb, float(used))


def most_at_once(run: SweepRun) -> int:
    """The most trials that were training at the same moment (entry to last report)."""
    events = sorted([(rows[0]["trial_started_at"], 1) for rows in run.rows.values()]
                    + [(rows[-1]["reported_at"], -1) for rows in run.rows.values()])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def failed_attempts(trials_dir: Path) -> tuple[int, list[str]]:
    """How many trial attempts failed in a sweep, retried ones included, as Tune's newest saved
    experiment state counts them, and the distinct errors they ended with (the last line of
    each trial's error.txt). A retried trial that then finished leaves no other trace."""
    from sweeper.compat import newest_experiment_state

    saved_state = newest_experiment_state(trials_dir)
    failures = 0
    if saved_state is not None:
        state = json.loads(saved_state.read_text())
        failures = sum(json.loads(metadata).get("num_failures", 0)
                       for _, metadata in state["trial_data"])
    errors = set()
    for error_file in trials_dir.glob("*/error.txt"):
        lines = [line.strip() for line in error_file.read_text(errors="replace").splitlines()
                 if line.strip()]
        errors.update(lines[-1:])
    return failures, sorted(errors)


def throughput(workdir: Path, cpus: int, gpu: bool, data: list[str], data_dir: str | None,
               sizes: tuple[tuple[int, int], ...]) -> list[dict[str, Any]]:
    """Trial against plain fit, for each (batch size, images) of ``sizes``."""
    resources = [f"resources.cpu_per_trial={cpus}", f"resources.gpu_per_trial={int(gpu)}",
                 f"cluster.num_cpus={cpus}"]
    rows = []
    for batch_size, samples in sizes:
        ours, plain = [], []
        for repeat in range(REPEATS):
            ours.append(sweeper_images_per_s(workdir, repeat, *resources, *data,
                                             samples=samples, batch_size=batch_size))
            plain.append(plain_images_per_s(threads=cpus, samples=train_images(samples),
                                            batch_size=batch_size, gpu=gpu, data=data_dir))
        rows.append({"batch_size": batch_size, "sweeper_images_per_s": statistics.median(ours),
                     "plain_images_per_s": statistics.median(plain),
                     "ratio": statistics.median(ours) / statistics.median(plain)})
    return rows


def packing(workdir: Path, cpus: int, gpu: bool, data: list[str]) -> dict[str, Any]:
    """The packed and the one-at-a-time sweep on a machine of ``cpus`` CPUs (shared out)."""
    sweep = ["+experiment=cnn_lr", "scheduler=none", "train.epochs=3",
             f"search.num_trials={TRIALS}", f"cluster.num_cpus={cpus}", *data]
    runs, sampled = {}, {}
    for label, share, concurrency in (("packed", 1 / PACKED, PACKED), ("one at a time", 1, 1)):
        overrides = [*sweep, f"resources.max_concurrent_trials={concurrency}",
                     f"resources.cpu_per_trial={max(1, cpus // concurrency)}",
                     f"resources.gpu_per_trial={share if gpu else 0}"]
        with GPUMemorySampler() as sampler:
            runs[label] = run_sweeper(f"gpu-{label.replace(' ', '-')}", overrides, workdir,
                                      concurrency)
        sampled[label] = sampler
    total_mb = [float(row[0]) for row in nvidia_smi("--query-gpu=memory.total")]
    figures = {}
    for label, run in runs.items():
        rows = run.all_rows
        failures, errors = failed_attempts(workdir / run.label / "trials")
        figures[label] = {
            "failed_attempts": failures, "errors": errors,
            "trials": len(run.rows), "epochs": run.epochs, "wall_s": run.wall_s,
            "most_at_once": most_at_once(run), "utilization": run.utilization,
            "gpu_ids": sorted({row.get("gpu_ids", "") for row in rows}),
            "tf_gpu_peak_mb": max((row.get("gpu_peak_mb", 0.0) for row in rows), default=0.0),
            "smi_peak_per_process_mb": max(sampled[label].peak_per_process_mb.values(),
                                           default=0.0),
            "smi_peak_total_mb": sampled[label].peak_total_mb,
            "smi_peak_gpu_used_mb": sampled[label].peak_used_mb,
        }
    packed, single = figures["packed"], figures["one at a time"]
    return {"runs": figures, "gpu_memory_total_mb": total_mb[0] if total_mb else None,
            # Same trials, same epochs: the wall-time ratio is the images/s ratio.
            "packed_speedup": single["wall_s"] / packed["wall_s"]}


def checks(result: dict[str, Any], gpu: bool) -> list[str]:
    """What the GPU path must do, as failures (empty: all passed)."""
    failures = []
    if "packing" not in result:
        return failures
    for label, run in result["packing"]["runs"].items():
        if run["failed_attempts"]:
            failures.append(f"{run['failed_attempts']} trial attempts failed in the {label} "
                            f"sweep ({'; '.join(run['errors']) or 'no error file'})")
    packed = result["packing"]["runs"]["packed"]
    if packed["most_at_once"] < PACKED:
        failures.append(f"only {packed['most_at_once']} trials trained at once, not {PACKED}")
    if not gpu:
        return failures
    if "" in packed["gpu_ids"]:
        failures.append("a report named no GPU: a trial ran without one")
    total = result["packing"]["gpu_memory_total_mb"]
    limit = (total or 0.0) / PACKED
    for what in ("tf_gpu_peak_mb", "smi_peak_per_process_mb"):
        if not 0 < packed[what] < limit:
            failures.append(f"{what} {packed[what]:.0f} MB is not within (0, {limit:.0f}) MB: "
                            f"a trial held more than 1/{PACKED} of the GPU")
    # All the packed trials together: had one reserved the GPU, the others could not start.
    if not packed["smi_peak_gpu_used_mb"] < (total or 0.0) / 2:
        failures.append(f"the packed sweep used {packed['smi_peak_gpu_used_mb']:.0f} MB of the "
                        f"GPU's {total} MB at its peak, not under half")
    return failures


def render(result: dict[str, Any]) -> str:
    lines = [f"# GPU benchmark results\n\n`python -m benchmarks.gpu` on {result['device']}, "
             f"{result['measured']}.\n"]
    if "packing" in result:
        packing_result = result["packing"]
        extra = " ".join(result.get("packing_overrides", []))
        lines.append(f"## {PACKED} trials on one GPU against one at a time ({TRIALS} trials, "
                     "3 epochs each, all of Fashion-MNIST" + (f"; {extra}" if extra else "")
                     + ")\n")
        lines.append(markdown_table(
            ["sweep", "trials", "failed attempts", "most at once", "GPU ids reported",
             "utilization", "TF peak GPU MB per trial", "nvidia-smi peak MB per process",
             "nvidia-smi peak MB all processes", "nvidia-smi peak MB GPU used"],
            [[label, run["trials"], run["failed_attempts"], run["most_at_once"],
              " ".join(run["gpu_ids"]) or "-", run["utilization"], run["tf_gpu_peak_mb"],
              run["smi_peak_per_process_mb"], run["smi_peak_total_mb"],
              run["smi_peak_gpu_used_mb"]]
             for label, run in packing_result["runs"].items()]))
        lines.append(f"\nGPU memory: {packing_result['gpu_memory_total_mb']} MB. Packed sweep "
                     f"{packing_result['packed_speedup']:.2f}x the images/s of one trial at a "
                     "time.\n")
    if "throughput" in result:
        lines.append("## Trainer throughput on the GPU (median of alternating runs)\n")
        lines.append(markdown_table(
            ["batch", "sweeper trial images/s", "plain model.fit images/s", "ratio"],
            [[row["batch_size"], row["sweeper_images_per_s"], row["plain_images_per_s"],
              row["ratio"]] for row in result["throughput"]]))
    if result["unfinished"]:
        lines.append(f"\nNot measured yet: {', '.join(result['unfinished'])}.\n")
    lines.append("\nChecks: " + ("all passed" if not result["failures"]
                                  else "; ".join(result["failures"])) + "\n")
    return "\n".join(lines)


def save(result: dict[str, Any], gpu: bool, out: Path) -> str:
    """Check and write what is measured so far (RESULTS_GPU.md and its .json); returns the
    table written."""
    result["failures"] = checks(result, gpu)
    text = render(result)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder of the Fashion-MNIST IDX .gz files")
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="run every step on CPUs only (small), to try the script")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to run, in this order (a lent machine's call may not fit both)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="a sweeper override for the packing sweeps, "
                        "e.g. train.jit_compile=false to see whether XLA is in a failure")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    gpu = not args.cpu_rehearsal
    # A rehearsal declares enough CPUs for the packed trials to run at once on a small machine.
    ray.init(address="local", num_cpus=None if gpu else PACKED, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if gpu and gpus < 1:
        sys.exit("benchmarks.gpu: Ray sees no GPU on this machine; run it where one is, "
                 "or try the steps with --cpu-rehearsal")
    data = ["data=fashion_mnist", *([f"data.path={args.data}"] if args.data else [])]
    # A rehearsal is small and quick: it checks the script, not the machine.
    sizes = ((32, 2000), (256, 4000)) if args.cpu_rehearsal else ((32, 20000), (256, 60000))
    sweep_data = [*data, "data.max_train_samples=2000"] if args.cpu_rehearsal else data
    sweep_data = [*sweep_data, *args.overrides]
    names = [row[0] for row in nvidia_smi("--query-gpu=name")]
    result: dict[str, Any] = {
        "device": (f"{names[0]} x{gpus}" if gpu and names else f"{cpus} CPUs (rehearsal)"),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "packing_overrides": args.overrides,
        "unfinished": list(args.parts)}
    with tempfile.TemporaryDirectory(prefix="sweeper-gpu-") as tmp:
        workdir = Path(tmp)
        for part in PARTS:
            if part not in args.parts:
                continue
            if part == "packing":  # trials share the GPU, each taking a small part of its memory
                result["packing"] = packing(workdir, cpus, gpu, sweep_data)
            else:  # the throughput trial gets one GPU and its share of the machine's CPUs
                result["throughput"] = throughput(workdir, max(1, cpus // max(1, gpus)), gpu,
                                                  data, args.data, sizes)
            result["unfinished"].remove(part)
            print(save(result, gpu, args.out), flush=True)
    print(f"\nWritten to {args.out}; every figure in {args.out.with_suffix('.json')}")
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
