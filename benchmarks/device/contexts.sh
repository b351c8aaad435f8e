# Can CONTEXTS (default 4) TensorFlow processes work on one GPU at once, with neither Ray nor
# sweeper? On the first lease, packed trials failed as they started ("cudaSetDevice() on GPU:0
# failed. Status: out of memory") beside two running ones with ~140 GB free; this tells the
# machine and its libraries apart from sweeper, in ~30 s. It also prints the limits that make
# a process's CUDA context fail to start although the GPU has memory to spare: strict memory
# overcommit, address-space and locked-memory limits, a cgroup's memory limit, an exclusive
# compute mode, MIG. JIT=1 runs each process's step under XLA, as sweeper's GPU trials do.
. benchmarks/device/env.sh
echo "vm.overcommit_memory $(cat /proc/sys/vm/overcommit_memory) (2: strict)," \
  "ratio $(cat /proc/sys/vm/overcommit_ratio);" \
  "$(grep -E '^(MemTotal|CommitLimit|Committed_AS)' /proc/meminfo | tr -s ' ' | tr '\n' ';')"
echo "ulimit -v $(ulimit -v) -l $(ulimit -l) -u $(ulimit -u);" \
  "cgroup memory.max $(cat /sys/fs/cgroup/memory.max 2>/dev/null || echo n/a)"
nvidia-smi --query-gpu=name,compute_mode,mig.mode.current,memory.used,memory.total --format=csv
count=${CONTEXTS:-4}
hold_s=${HOLD_S:-25}  # each process keeps its context this long, so all of them overlap
rm -f /tmp/context*.log
for number in $(seq 1 "$count"); do
  python3 - "$number" "$hold_s" "${JIT:-0}" > "/tmp/context$number.log" 2>&1 <<'PY' &
import os
import sys
import time

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
number, hold_s, jit = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
started = time.time()
import tensorflow as tf

def status(key):
    with open("/proc/self/status") as lines:
        return next(line.split()[1] for line in lines if line.startswith(key))

try:
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)  # as sweeper's trials do
    images = tf.random.uniform((32, 28, 28, 1))
    kernel = tf.random.uniform((3, 3, 1, 32))

    @tf.function(jit_compile=jit)
    def step(images):
        return tf.reduce_sum(tf.matmul(tf.reshape(tf.nn.conv2d(images, kernel, 1, "VALID"),
                                                  (32, -1)), tf.ones((21632, 64))))

    step(images).numpy()
    ready = time.time() - started
    time.sleep(max(0.0, hold_s - ready))  # hold the context while the others start
    step(images).numpy()
    peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20 if gpus else 0.0
    print(f"context {number}: ok on {len(gpus)} GPU(s) after {ready:.1f} s; TF peak {peak:.0f} MB;"
          f" VmPeak {int(status('VmPeak')) >> 20} GB, VmRSS {int(status('VmRSS')) >> 10} MB")
except Exception as error:  # the point is to see it, one line a process
    message = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
    print(f"context {number}: FAILED after {time.time() - started:.1f} s:"
          f" {type(error).__name__}: {message}")
PY
done
sleep $(( hold_s / 2 ))
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
grep -E '^Committed_AS' /proc/meminfo
wait
grep -h "^context " /tmp/context*.log || tail -5 /tmp/context*.log
