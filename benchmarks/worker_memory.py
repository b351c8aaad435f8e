"""Benchmark: does a reused trial worker's memory grow as it rebuilds models?

A worker that Tune reuses runs trial after trial in one process. Trials of a new architecture
(another dropout rate included) build a new Keras model there (``WarmModel``). Issue
20 saw +3.9 MB of resident memory per rebuilt trial over 40 trials. This runs the trial path
(``WarmModel.get`` then ``train``, one short epoch on 800 Fashion-MNIST images) N times in a
fresh process per variant and reports the resident set size after each trial, and its growth
per trial after the first quarter (allocator warm-up and TensorFlow's one-time caches).

    python -m benchmarks.worker_memory --trials 100 --rebuild dropout
    python -m benchmarks memory   # both kinds, with and without the workaround: RESULTS.md

The workaround (sweeper.compat.forget_custom_gradients, tensorflow/tensorflow#97697) is
measured against the same trials without it (``--without-workaround``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import FASHION_MNIST

# What makes each trial rebuild its model: another dropout rate every trial, or another
# architecture every trial.
REBUILDS = ("dropout", "architecture")


def rss_mb() -> float:
    """This process's resident set size now, in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_trials(trials: int, rebuild: str, workaround: bool = True) -> list[float]:
    """Resident MiB after each of ``trials`` trials run the way a reused worker runs them;
    ``workaround=False`` leaves TensorFlow's gradient registry as TensorFlow does."""
    import sweeper.trainer
    from sweeper.config import DataConfig, SweepConfig, apply_params
    from sweeper.data import load_splits
    from sweeper.trainer import WarmModel, configure_tensorflow, train

    if not workaround:
        sweeper.trainer.forget_custom_gradients = lambda keep: 0

    configure_tensorflow(1, use_gpu=False)
    data = DataConfig(name="fashion_mnist", path=FASHION_MNIST, max_train_samples=1000,
                      max_test_samples=100)
    splits = load_splits(data, validation_fraction=0.2, seed=0)
    base = SweepConfig()
    base.train.epochs, base.train.batch_size = 1, 64
    warm, sizes = WarmModel(), []
    for index in range(trials):
        params = ({"model.dropout": 0.1 + 0.1 * (index % 3)} if rebuild == "dropout"
                  else {"model.filters": 8 + 4 * (index % 4), "model.dense_units": 32 + index})
        cfg = apply_params(base, params)
        train(cfg, splits, model=warm.get(cfg, splits.input_shape, splits.num_classes))
        sizes.append(rss_mb())
    return sizes


def growth_per_trial(sizes: list[float]) -> float:
    """MiB per trial after the first quarter (least squares slope)."""
    tail = sizes[len(sizes) // 4:]
    if len(tail) < 2:
        return 0.0
    count = len(tail)
    mean_x, mean_y = (count - 1) / 2, sum(tail) / count
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(tail))
    variance = sum((x - mean_x) ** 2 for x in range(count))
    return covariance / variance


def measure(trials: int = 100) -> dict:
    """Each rebuild kind, with and without the workaround, each in a fresh process, side by
    side: RSS after each trial and its growth per trial."""
    figures = {}
    for rebuild in REBUILDS:
        for workaround in (True, False):
            command = [sys.executable, "-m", "benchmarks.worker_memory", "--trials",
                       str(trials), "--rebuild", rebuild, "--json"]
            if not workaround:
                command.append("--without-workaround")
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            sizes = json.loads(done.stdout.strip().splitlines()[-1])
            label = rebuild if workaround else f"{rebuild}, without workaround"
            figures[label] = {"trials": trials, "rss_mb": [round(s, 1) for s in sizes],
                              "growth_mb_per_trial": round(growth_per_trial(sizes), 3),
                              "first_mb": round(sizes[0], 1), "last_mb": round(sizes[-1], 1)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--rebuild", choices=REBUILDS, default=None,
                        help="one kind in this process (default: each in a fresh process)")
    parser.add_argument("--json", action="store_true", help="print the sizes as JSON only")
    parser.add_argument("--without-workaround", action="store_true",
                        help="leave TensorFlow's gradient registry as it is (the leak)")
    args = parser.parse_args()
    if args.rebuild is None:
        print(json.dumps({k: {key: v for key, v in f.items() if key != "rss_mb"}
                          for k, f in measure(args.trials).items()}, indent=2))
        return
    sizes = run_trials(args.trials, args.rebuild, workaround=not args.without_workaround)
    if args.json:
        print(json.dumps(sizes))
    else:
        print(f"{args.rebuild}: {sizes[0]:.1f} -> {sizes[-1]:.1f} MiB, "
              f"{growth_per_trial(sizes):.3f} MiB per trial")


if __name__ == "__main__":
    main()
