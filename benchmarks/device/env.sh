# Sourced before each run there. The image has CUDA 13, PyTorch and JAX, and no TensorFlow or
# Ray: sweeper's packages are in /tmp/site; TensorFlow's CUDA 12 runtime and ptxas come from
# NVIDIA's cu12 wheels, and its cuBLAS, cuFFT, cuSOLVER, cuSPARSE and cuDNN 9 are the image's
# CUDA 13 builds under the CUDA 12 names (/tmp/cuda12shim): the cu12 wheels (2.3 GB) would not
# travel. Figures taken this way say so (README.md).
cu13_dirs=$(for l in /tmp/cuda12shim/*; do dirname "$(readlink -f "$l")"; done | sort -u | paste -sd:)
export PYTHONPATH=/tmp/site:$PWD
export LD_LIBRARY_PATH=/tmp/cuda12shim:$cu13_dirs:/tmp/site/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export XLA_FLAGS=--xla_gpu_cuda_data_dir=/tmp/site/nvidia/cuda_nvcc
export PATH=/tmp/site/nvidia/cuda_nvcc/bin:/tmp/site/bin:$PATH
# TensorFlow 2.21 has no sm_90 machine code: each new process compiles its kernels from PTX at
# first use; a cache large enough to keep them spares the later trials that.
export CUDA_CACHE_MAXSIZE=4294967296 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
