# TensorFlow sees the GPU and trains the tutorial CNN on it (cuDNN conv, cuBLAS dense, XLA);
# then the whole path: a 2-trial sweep, two trials sharing the GPU.
. benchmarks/device/env.sh
timeout 150 python3 - <<'PY' 2>&1 | grep -v -E "^(WARNING: All log|I0000|E0000 00:00)" | tail -40
import os, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
t = time.time()
import numpy as np
import tensorflow as tf
info = tf.sysconfig.get_build_info()
print("tf", tf.__version__, "import", round(time.time() - t, 1), "s; built for CUDA",
      info.get("cuda_version"), "cuDNN", info.get("cudnn_version"), info.get("cuda_compute_capabilities"))
gpus = tf.config.list_physical_devices("GPU")
print("GPUs:", gpus)
if gpus:
    tf.config.experimental.set_memory_growth(gpus[0], True)
    from sweeper.config import ModelConfig, TrainConfig
    from sweeper.model import build_cnn, compile_model
    x = np.random.default_rng(0).integers(0, 255, (8192, 28, 28, 1), dtype=np.uint8)
    y = np.random.default_rng(1).integers(0, 10, 8192)
    for jit in ("auto", "false"):
        model = compile_model(build_cnn(ModelConfig(), (28, 28, 1), 10),
                              TrainConfig(jit_compile=jit))
        for epoch in range(3):
            t = time.time()
            model.fit(x, y, batch_size=32, epochs=1, verbose=0)
            print(f"jit_compile={jit} epoch {epoch}: {8192 / (time.time() - t):.0f} img/s")
    print("peak MB", tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20)
PY
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
t0=$(date +%s)
timeout 200 python3 -m sweeper +experiment=smoke data=fashion_mnist search.num_trials=2 train.epochs=2 \
  resources.gpu_per_trial=0.5 resources.cpu_per_trial=4 sweep_dir=/tmp/pre > /tmp/pre.log 2>&1
echo "smoke sweep exit $? in $(( $(date +%s) - t0 )) s"; grep -v "^I0000\|^E0000\|^WARNING: All" /tmp/pre.log | tail -25
grep -h -o '"gpu_ids": "[^"]*"\|"gpu_peak_mb": [0-9.]*' /tmp/pre/trials/*/*/result.json 2>/dev/null | sort | uniq -c | head
