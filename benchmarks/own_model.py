"""Benchmark: what a model of the user's own costs against the built-in CNN (issue 23).

Side by side in one run, each figure in a fresh process:

- the driver's checks before Ray starts (``sweeper.sweep.validate``, as ``python -m sweeper``
  runs it), and for a model of one's own the one build that checks its output
  (``sweeper.model.check_network``): the CNN's checks import no TensorFlow, a user's module
  imports Keras itself;
- per trial: four trials of a learning-rate search in one worker process (``WarmModel.get``
  and one epoch on 2 000 Fashion-MNIST images, as ``sweeper.trial.run_trial`` does), for the
  built-in CNN and for the very same network written as the user's builder. A worker
  reuses either compiled model between such trials (``WarmModel``), as long as its layers
  draw their random numbers from Keras seed generators, or none.

    python -m benchmarks.own_model            # prints a markdown table
    python -m benchmarks.own_model --write    # and records it in benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import FASHION_MNIST

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## A model of the user's own against the built-in CNN (issue 23)"
TRIALS = 4
# The classic CNN once more, as a user's builder: the same network through the user's path.
USER_MODULE = textwrap.dedent('''
    from sweeper.model import cnn


    def my_cnn(input_shape, num_classes, **settings):
        return cnn(input_shape, num_classes, **settings)
''')
MODELS = {"built-in CNN": [],
          "the same CNN as the user's builder": ["model._target_=my_bench_models.my_cnn"]}
DATA = ["data=fashion_mnist", f"data.path={FASHION_MNIST}", "data.max_train_samples=2000",
        "train.batch_size=64"]


def child_preflight(model: str) -> dict:
    import sweeper

    started = time.perf_counter()
    cfg = sweeper.compose([*DATA, *MODELS[model]])
    checks = time.perf_counter() - started
    tensorflow = "tensorflow" in sys.modules
    build = 0.0
    if isinstance(cfg.model, dict):
        from sweeper.model import check_network

        started = time.perf_counter()
        check_network(cfg.model, (28, 28), 10)
        build = time.perf_counter() - started
    return {"checks_s": checks, "build_s": build, "tensorflow": tensorflow}


def child_trials(model: str) -> dict:
    import sweeper
    from sweeper.config import apply_params
    from sweeper.data import load_splits
    from sweeper.trainer import WarmModel, configure_tensorflow, train

    configure_tensorflow(num_cpus=1, use_gpu=False)
    cfg = sweeper.compose([*DATA, *MODELS[model], "train.epochs=1"])
    splits = load_splits(cfg.data, cfg.train.validation_fraction, cfg.train.seed)
    warm, seconds = WarmModel(), []
    for trial in range(TRIALS):
        started = time.perf_counter()
        trial_cfg = apply_params(cfg, {"train.lr": 1e-3 * (trial + 1)})
        model_ = warm.get(trial_cfg, splits.input_shape, splits.num_classes)
        train(trial_cfg, splits, model=model_)
        seconds.append(time.perf_counter() - started)
    return {"trial_s": seconds, "params": model_.count_params()}


def measure(kind: str, model: str, folder: Path) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "benchmarks.own_model", "--child", kind, model],
                            capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: dict[str, dict]) -> str:
    header = ["model", "parameters", "driver checks s (TensorFlow imported)",
              "driver's build s", "first trial s", f"trials 2-{TRIALS}, each s"]
    lines = []
    for name, row in rows.items():
        later = row["trial_s"][1:]
        lines.append([name, row["params"],
                      f"{row['checks_s']:.2f} ({'yes' if row['tensorflow'] else 'no'})",
                      f"{row['build_s']:.2f}", f"{row['trial_s'][0]:.2f}",
                      f"{sum(later) / len(later):.2f}"])
    first, second = rows.values()
    ratio = ["user's / built-in", f"{second['params'] / first['params']:.2f}",
             f"{second['checks_s'] / first['checks_s']:.2f}", "",
             f"{second['trial_s'][0] / first['trial_s'][0]:.2f}",
             f"{sum(second['trial_s'][1:]) / sum(first['trial_s'][1:]):.2f}"]
    return common.markdown_table(header, [*lines, ratio])


def recorded_section(path: Path = RESULTS) -> str:
    """This benchmark's section of the results file ("" if it has none), for
    ``python -m benchmarks``, which writes the file anew."""
    return common.recorded_section(path, SECTION)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.own_model",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help="record in benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.child:
        kind, model = args.child
        print(json.dumps(child_preflight(model) if kind == "preflight" else child_trials(model)))
        return
    rows: dict[str, dict] = {name: {} for name in MODELS}
    with tempfile.TemporaryDirectory(prefix="sweeper-own-model-") as tmp:
        (Path(tmp) / "my_bench_models.py").write_text(USER_MODULE)
        for name in MODELS:  # side by side: each kind for both models before the next kind
            rows[name].update(measure("preflight", name, Path(tmp)))
        for name in MODELS:
            rows[name].update(measure("trials", name, Path(tmp)))
    text = (common.section_opening(SECTION, "benchmarks.own_model") + "each column in a fresh "
            "process. Driver checks = `sweeper.sweep.validate` (compose excluded); the user's "
            "module imports Keras and so TensorFlow there, the CNN's checks do not. Driver's "
            "build = `sweeper.model.check_network`, once per sweep. Trials: a learning-rate "
            f"search of {TRIALS} trials in one worker, one epoch on 2 000 Fashion-MNIST "
            "images each; both compiled models are reused from trial 2 on (neither has a "
            "layer that draws random numbers while training). Trial workers of a user's "
            "model that is not an installed package also start through Ray's runtime-env "
            "shim (py_modules): 1.05x the start time, see 'Start of fresh trial workers' "
            "above.\n\n"
            f"{table(rows)}\n")
    print(text)
    if args.write:
        common.record_section(RESULTS, SECTION, text)


if __name__ == "__main__":
    main()
