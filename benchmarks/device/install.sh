# Unpacks the staged parts into /tmp/site, puts Fashion-MNIST where Debian's package would, and
# links the image's CUDA 13 libraries under the CUDA 12 names TensorFlow 2.21 loads (env.sh).
set -uo pipefail
started=$(date +%s)
mkdir -p /tmp/site
cat /root/stage/site.tar.xz.part* | xz -d -T0 | tar -x -C /tmp/site || { echo "unpack failed"; exit 1; }
mkdir -p /usr/share/datasets/fashion-mnist && cp /root/stage/*-ubyte.gz /usr/share/datasets/fashion-mnist/
mkdir -p /tmp/cuda12shim
link() {
  local found
  found=$(find /opt /usr -xdev -name "$2" 2>/dev/null | grep -v /tmp/site | head -1)
  if [ -n "$found" ]; then ln -sf "$found" "/tmp/cuda12shim/$1"; echo "$1 -> $found"; else echo "MISSING $2"; fi
}
link libcublas.so.12 libcublas.so.13
link libcublasLt.so.12 libcublasLt.so.13
link libcufft.so.11 libcufft.so.12
link libcusolver.so.11 libcusolver.so.12
link libcusparse.so.12 libcusparse.so.12
link libcudnn.so.9 libcudnn.so.9
echo "installed in $(( $(date +%s) - started )) s: $(du -sh /tmp/site | cut -f1)"
