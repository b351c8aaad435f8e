"""Benchmark 2: images/s of one trial inside Ray vs the same model in a plain `model.fit`.

Both train the tutorial CNN at batch 32 with one TensorFlow thread on the same Fashion-MNIST
images; each side runs twice, alternating, and the medians are compared.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import run_sweeper

SAMPLES = 10000  # images per trial: train and validation
VALIDATION_FRACTION = 0.1
EPOCHS = 4
REPEATS = 2


def train_images(samples: int) -> int:
    """The images a throughput trial of ``samples`` trains on (the rest validates)."""
    return round(samples * (1 - VALIDATION_FRACTION))


TRAIN_IMAGES = train_images(SAMPLES)


def sweeper_images_per_s(workdir: Path, repeat: int, *extra: str, samples: int = SAMPLES,
                         batch_size: int = 32) -> float:
    """Images/s of one trial's training epochs after its first, trained on
    ``train_images(samples)``."""
    overrides = [*extra, "+experiment=smoke", "data=fashion_mnist",
                 f"data.max_train_samples={samples}",
                 f"train.validation_fraction={VALIDATION_FRACTION}", f"train.epochs={EPOCHS}",
                 f"train.batch_size={batch_size}", "scheduler=none", "search.num_trials=1",
                 "search.space.train.lr=choice(0.001)"]
    label = (f"throughput-{repeat}-b{batch_size}-n{samples}"
             + "".join(f"-{item.split('=')[-1]}" for item in extra))
    run = run_sweeper(label, overrides, workdir, concurrency=1)
    times = [row["train_time_s"] for row in run.all_rows][1:]  # the first epoch compiles
    return train_images(samples) / statistics.median(times)


def _last_json_line(module: str, *args: str) -> dict:
    output = subprocess.run([sys.executable, "-m", module, *args], check=True,
                            capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent).stdout
    return json.loads(output.strip().splitlines()[-1])


def plain_images_per_s(threads: int = 1, samples: int = TRAIN_IMAGES, batch_size: int = 32,
                       gpu: bool = False, data: str | None = None) -> float:
    return _last_json_line("benchmarks.plain_fit", "--threads", str(threads), "--samples",
                           str(samples), "--epochs", str(EPOCHS), "--batch-size",
                           str(batch_size), *(["--gpu"] if gpu else []),
                           *(["--data", data] if data else []))["images_per_s"]


# Levers that change the numerics, measured on the same trial (options, not defaults).
LEVERS = {"bfloat16 mixed precision": "train.precision=mixed_bfloat16",
          "XLA": "train.jit_compile=true"}


def measure(workdir: Path) -> dict:
    ours, plain = [], []
    levers: dict[str, list[float]] = {name: [] for name in LEVERS}
    for repeat in range(REPEATS):
        ours.append(sweeper_images_per_s(workdir, repeat))
        plain.append(plain_images_per_s())
        for name, override in LEVERS.items():
            levers[name].append(sweeper_images_per_s(workdir, repeat, override))
    float32 = statistics.median(ours)
    return {"sweeper_images_per_s": float32,
            "plain_images_per_s": statistics.median(plain),
            "ratio": float32 / statistics.median(plain),
            "levers": {name: statistics.median(values) / float32
                       for name, values in levers.items()},
            "fixed_costs": _last_json_line("benchmarks.fixed_costs")}
