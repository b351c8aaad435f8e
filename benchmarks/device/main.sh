# The GPU checks: tests/test_gpu.py, then benchmarks.gpu (figures to $OUT/RESULTS_GPU.md/.json,
# written after each part). PARTS="packing" or "throughput" runs one part (a call is <= 600 s);
# SKIP_TEST=1 leaves the test out; BENCH_ARGS are more arguments, e.g. "--set KEY=VALUE".
. benchmarks/device/env.sh
if [ -z "${SKIP_TEST:-}" ]; then
  started=$(date +%s)
  timeout "${PYTEST_S:-170}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py > "$OUT/pytest.txt" 2>&1
  echo "pytest exit $? in $(( $(date +%s) - started )) s"; tail -15 "$OUT/pytest.txt"
fi
started=$(date +%s)
# shellcheck disable=SC2086  # PARTS and BENCH_ARGS are lists of words
timeout "${BENCH_S:-380}" python3 -m benchmarks.gpu --parts ${PARTS:-packing throughput} \
  ${BENCH_ARGS:-} --out "$OUT/RESULTS_GPU.md" > "$OUT/bench.log" 2>&1
echo "benchmarks.gpu exit $? in $(( $(date +%s) - started )) s"
grep -v "^I0000\|^E0000\|^WARNING: All" "$OUT/bench.log" | tail -45
nvidia-smi --query-gpu=memory.used --format=csv,noheader
