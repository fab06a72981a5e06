#!/bin/bash
# One device call for the quantize / dequantize CUDA kernels: build them, run their GPU tests,
# compute-sanitizer memcheck on odd shapes, and the benchmark. Everything lands in $OUT:
# build.log, tests.log, sanitizer.log, bnb_cuda_diff.json, bench.log, quantize.md, quantize.json.
# Run from the repository root with .bnb carried (bitsandbytes 0.50.2 with its CUDA library).
set -o pipefail
OUT=${OUT:-/tmp/nf4kit_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.bnb${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
export NF4KIT_CUDA_SOURCES=${NF4KIT_CUDA_SOURCES:-quantize_4bit.cu,dequantize_4bit.cu,blockwise8.cu}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee "$OUT/bench.log"
start=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/bench.log"

NF4KIT_RESULTS_DIR=$OUT timeout ${TEST_TIMEOUT:-330} python3 -m pytest ${TESTS:-tests/test_cuda_kernels.py tests/test_quantize_ops.py} \
  -q -rs --maxfail=15 -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20

SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
timeout 120 "$SAN" --tool memcheck --error-exitcode 9 python3 benchmarks/bench_quantize.py --sanitize > "$OUT/sanitizer.log" 2>&1
echo "sanitizer rc=$?"; tail -3 "$OUT/sanitizer.log"

timeout 150 python3 benchmarks/bench_quantize.py --out "$OUT" 2>&1 | tee -a "$OUT/bench.log" | tail -25
