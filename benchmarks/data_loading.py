"""Benchmark: what loading a dataset costs the driver, in time and peak memory (issue 22).

The driver loads a sweep's data once (``sweeper.data.load_splits``, as ``python -m sweeper``
does) and puts the splits in Ray's object store. Measured here, each in a fresh process:

- a folder of 20 000 PNGs in 10 class folders, written from real Fashion-MNIST images (28x28
  grayscale, or enlarged to 64x64 and tinted to RGB with ``--folder-side 64``), decoded with
  the default thread pool and with one thread;
- CIFAR-shaped arrays, 60 000 x 32x32x3 uint8 in an uncompressed .npz.

Peak memory is the process's peak resident set (``ru_maxrss``); the data's own share is the
peak minus the resident set after the imports, shown against the size of the loaded arrays.

    python -m benchmarks.data_loading               # prints a markdown table
    python -m benchmarks.data_loading --write       # and records it in benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import FASHION_MNIST

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Data loading on the driver (issue 22)"
NUM_IMAGES = 20_000
ARRAY_SHAPE = (60_000, 32, 32, 3)


def rss_mb() -> float:
    """This process's resident set size now, in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_png_folder(root: Path, count: int, side: int) -> Path:
    """``count`` real Fashion-MNIST training images as PNGs in ROOT/<label>/; at ``side`` 28
    they stay 28x28 grayscale, otherwise they are enlarged (bilinear) and tinted to RGB."""
    import numpy as np
    from PIL import Image

    from sweeper.data import load_idx_folder

    arrays = load_idx_folder(Path(FASHION_MNIST))
    for index in range(count):
        pixels, label = arrays["x_train"][index], int(arrays["y_train"][index])
        image = Image.fromarray(pixels)
        if side != 28:
            big = np.asarray(image.resize((side, side), Image.Resampling.BILINEAR))
            image = Image.fromarray(np.stack([big, big // 2, 255 - big], axis=-1))
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:05d}.png")
    return root


def write_arrays(path: Path) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, ARRAY_SHAPE, dtype=np.uint8)
    y = rng.integers(0, 10, ARRAY_SHAPE[0])
    np.savez(path, x_train=x[:50_000], y_train=y[:50_000], x_test=x[50_000:],
             y_test=y[50_000:])
    return path


def child(kind: str, path: str) -> dict:
    """Load once the way the driver does and report time and memory (runs in a fresh process)."""
    from sweeper.config import DataConfig
    from sweeper.data import load_splits, make_splits
    from sweeper.image_folder import load_image_folder

    baseline = rss_mb()
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    if kind == "folder-1-thread":
        cfg = DataConfig(name="image_folder", path=path)
        splits = make_splits(load_image_folder(cfg, workers=1), 0.1, 0, name="image_folder")
    else:
        name = "npz" if kind == "arrays" else "image_folder"
        splits = load_splits(DataConfig(name=name, path=path), 0.1, 0)
    seconds, cpu_seconds = time.perf_counter() - started, _cpu_seconds() - cpu_started
    data_mb = sum(a.nbytes for a in (splits.x_train, splits.x_val, splits.x_test)) / 2**20
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": peak_mb,
            "baseline_mb": baseline, "data_mb": data_mb, "shape": list(splits.input_shape),
            "images": sum(splits.sizes().values())}


def _cpu_seconds() -> float:
    """CPU time of this process and of the children it waited for (user + system)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def measure(kind: str, path: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "benchmarks.data_loading", "--child", kind,
                             str(path)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: dict[str, dict]) -> str:
    lines = ["| data | images | shape | load s | CPU s / load s | peak RSS MiB | "
             "after imports MiB | loading's share MiB | arrays MiB | share / arrays |",
             "|---" * 10 + "|"]
    for name, row in rows.items():
        share = row["peak_mb"] - row["baseline_mb"]
        lines.append(f"| {name} | {row['images']} | {'x'.join(map(str, row['shape']))} | "
                     f"{row['seconds']:.2f} | {row['cpu_seconds'] / row['seconds']:.2f} | "
                     f"{row['peak_mb']:.0f} | {row['baseline_mb']:.0f} | "
                     f"{share:.0f} | {row['data_mb']:.0f} | {share / row['data_mb']:.2f} |")
    return "\n".join(lines)


def recorded_section(path: Path = RESULTS) -> str:
    """The data-loading section of the results file at ``path`` ("" if it has none), so that
    ``python -m benchmarks``, which writes the file anew, keeps it."""
    return common.recorded_section(path, SECTION)


def record(text: str) -> None:
    """Put ``text`` as the data-loading section of RESULTS.md (replacing an earlier one)."""
    common.record_section(RESULTS, SECTION, text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_loading",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--folder-side", type=int, nargs="+", default=[28], metavar="PIXELS",
                        help="side of the PNGs in pixels; 28 keeps Fashion-MNIST's grayscale, "
                        "others are enlarged to RGB (default: 28)")
    parser.add_argument("--write", action="store_true", help="record in benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="sweeper-data-") as tmp:
        for side in args.folder_side:
            folder = write_png_folder(Path(tmp) / f"png{side}", NUM_IMAGES, side)
            kind = "grayscale" if side == 28 else "RGB"
            rows[f"PNG folder, {kind} (thread pool)"] = measure("folder", folder)
            rows[f"PNG folder, {kind} (1 thread)"] = measure("folder-1-thread", folder)
        rows["npz, CIFAR-shaped"] = measure("arrays", write_arrays(Path(tmp) / "cifar.npz"))
    text = (common.section_opening(SECTION, "benchmarks.data_loading") + "each load in a fresh "
            "process through `sweeper.data.load_splits` (the driver's path). Loading's share = "
            "peak RSS minus RSS after the imports; arrays = the loaded splits' images; "
            "CPU s / load s = cores kept busy while loading.\n\n"
            f"{table(rows)}\n")
    print(text)
    if args.write:
        record(text)


if __name__ == "__main__":
    main()
