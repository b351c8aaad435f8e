#!/usr/bin/env bash
# Packs what a lent GPU machine lacks into parts that travel one per `device` call: sweeper's
# pinned packages (this checkout's .venv, as CI installs it) for that machine's Python 3.12,
# less those its image already has, as one xz stream in 62 MiB parts .gpu/p0, .gpu/p1, ...,
# with the Fashion-MNIST files in the last. README.md beside this says how they are used.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=.venv/bin/python
work=$(mktemp -d /tmp/sweeper-gpu-pack.XXXXXX)
trap 'rm -rf "$work"' EXIT

# On the image already (KINDS.md's package list); its versions do for these.
present="pip py-spy ruff setuptools wheel pytest pluggy iniconfig pyarrow matplotlib contourpy
cycler fonttools kiwisolver pillow pyparsing grpcio libclang tzdata python-dateutil six certifi
charset-normalizer idna urllib3 requests attrs click filelock fsspec MarkupSafe Markdown
markdown-it-py mdurl Pygments rich tqdm packaging PyYAML msgpack Werkzeug absl-py opt_einsum
pandas wrapt"
$python -m pip freeze --exclude-editable \
  | grep -v -i -E "^($(echo $present | tr ' ' '|'))==" > "$work/pinned.txt"
grep -i "^antlr4-python3-runtime==" "$work/pinned.txt" > "$work/sdists.txt" || true
grep -v -i "^antlr4-python3-runtime==" "$work/pinned.txt" > "$work/wheels.txt"
# TensorFlow's CUDA 12 runtime and ptxas; the rest of its CUDA libraries are the image's (env.sh).
printf 'nvidia-cuda-runtime-cu12==12.9.79\nnvidia-cuda-nvcc-cu12==12.9.86\n' >> "$work/wheels.txt"

platforms=""
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux2010 manylinux_2_12; do
  platforms="$platforms --platform ${p}_x86_64"
done
$python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp $platforms -d "$work/wheels" -r "$work/wheels.txt"
[ -s "$work/sdists.txt" ] && $python -m pip wheel -q --no-deps -w "$work/wheels" -r "$work/sdists.txt"
$python -m pip install -q --no-deps --no-compile --target "$work/site" --python-version 3.12 \
  --implementation cp --only-binary=:all: $platforms --platform any "$work"/wheels/*.whl

# Not needed to run: headers, static libraries, Ray's Java jars.
rm -rf "$work/site/tensorflow/include" "$work/site/ray/jars" "$work"/site/nvidia/*/include
find "$work/site" -name '*.a' -delete
tar -cf - -C "$work/site" . | xz -T0 -6 > "$work/site.tar.xz"

rm -rf .gpu/p[0-9]*
split -b 62M -d -a 1 "$work/site.tar.xz" "$work/site.tar.xz.part"
parts=("$work"/site.tar.xz.part*)
for i in "${!parts[@]}"; do mkdir -p ".gpu/p$i" && mv "${parts[$i]}" ".gpu/p$i/"; done
last=$(( ${#parts[@]} - 1 ))
data=/usr/share/datasets/fashion-mnist
if (( $(du -cb "$data"/*.gz ".gpu/p$last"/* | tail -1 | cut -f1) > 63 * 2**20 )); then
  last=$(( last + 1 )); mkdir -p ".gpu/p$last"
fi
cp "$data"/*-ubyte.gz ".gpu/p$last/"
du -sh .gpu/p*
echo "parts p0..p$last: one device call each (README.md)"
