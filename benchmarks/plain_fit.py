"""Train the tutorial CNN with a plain `model.fit` in its own process and print images/s.

The reference for trainer throughput: no Ray, no sweeper, numpy arrays straight into fit,
TensorFlow limited to the same number of threads a trial gets.

    python -m benchmarks.plain_fit --threads 1 --samples 10000 --epochs 4 --batch-size 32
    python -m benchmarks.plain_fit --gpu --threads 4 --samples 50000 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", default=None,
                        help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    parser.add_argument("--gpu", action="store_true",
                        help="train on the GPU (default: hide GPUs, as for a CPU trial)")
    args = parser.parse_args()
    if not args.gpu:  # a CPU trial sees no GPU either (sweeper.trial.run_trial hides them)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # What Ray sets in a trial with that many CPUs; without it oneDNN's OpenMP pool takes every
    # core whatever TensorFlow's own thread settings say.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(min(2, args.threads))
    gpus = tf.config.list_physical_devices("GPU")
    if args.gpu and not gpus:  # a CPU fit would make the GPU comparison meaningless
        raise SystemExit("plain_fit --gpu: TensorFlow sees no GPU here")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)  # as in a trial
    from pathlib import Path

    from benchmarks.common import FASHION_MNIST
    from benchmarks.plain_tune import _read_idx, tutorial_cnn

    folder = Path(args.data or FASHION_MNIST)
    x = _read_idx(folder / "train-images-idx3-ubyte.gz")[: args.samples]
    y = _read_idx(folder / "train-labels-idx1-ubyte.gz")[: args.samples]
    x = (x / 255.0).astype("float32")[..., None]
    model = tutorial_cnn(tf)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    epoch_times = []

    class Timer(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_times.append(time.perf_counter() - self.started)

    model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, callbacks=[Timer()],
              verbose=0)
    # The first epoch traces and compiles; steady state is what a long trial sees.
    print(json.dumps({"images_per_s": args.samples / statistics.median(epoch_times[1:])}))


if __name__ == "__main__":
    main()
