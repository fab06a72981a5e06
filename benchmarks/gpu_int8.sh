#!/bin/bash
# One device call for the LLM.int8 CUDA kernels: build csrc/cuda/int8.cu, run tests/test_int8.py
# (CPU and CUDA), compute-sanitizer memcheck + racecheck on every kernel path, and the benchmark.
# Everything lands in $OUT: build.log, tests.log, memcheck.log, racecheck.log, bench.log, int8.md,
# int8.json. Run from the repository root with .bnb carried (bitsandbytes 0.50.2 with its CUDA library).
set -o pipefail
source benchmarks/gpu_env.sh
export NF4KIT_CUDA_SOURCES=int8.cu

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee "$OUT/bench.log"
start=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/bench.log"

timeout ${TEST_TIMEOUT:-150} python3 -m pytest tests/test_int8.py -q -rs --maxfail=20 -p no:cacheprovider -p no:logging \
  $EXTRA_PYTEST > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20

SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
timeout 90 "$SAN" --tool memcheck --error-exitcode 9 python3 benchmarks/bench_int8.py --sanitize > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?"; tail -4 "$OUT/memcheck.log"
timeout 90 "$SAN" --tool racecheck --racecheck-report hazard --error-exitcode 9 python3 benchmarks/bench_int8.py --sanitize \
  > "$OUT/racecheck.log" 2>&1
echo "racecheck rc=$?"; tail -4 "$OUT/racecheck.log"

timeout 200 python3 benchmarks/bench_int8.py --out "$OUT" 2>&1 | tee -a "$OUT/bench.log" | tail -32
