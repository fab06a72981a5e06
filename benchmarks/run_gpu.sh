#!/bin/bash
# The one device run: build every kernel for sm_90a, run every CUDA test of the suite, then the
# benchmarks. Run from the repository root on the GPU machine with .bnb (bitsandbytes 0.50.2 with
# its CUDA 13.0 library) and .whl (pytest wheels, used only if pytest is missing) carried:
#   bash benchmarks/run_gpu.sh            STEPS="build tests bench sanitize" by default
# (bench = benchq + benchmm: quantize, matmul; one call may not fit all of it in 10 minutes, so a
# second call on the still-warm machine can take STEPS="benchmm sanitize" without rebuilding).
# Logs and results land in $OUT (tests.log with bnb_cuda_diff.json, build.log, each benchmark's
# md/json, sanitizer_matmul.log).
set -o pipefail
source benchmarks/gpu_env.sh
STEPS=${STEPS:-build tests bench sanitize}
has() { [[ " $STEPS " == *" $1 "* ]]; }
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if has build; then
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  stamp built; python3 -m nf4kit info
fi
if has tests; then
  NF4KIT_RESULTS_DIR="$OUT" timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -x --maxfail=30 -k "cuda or gpu or GPU" \
    tests/ ${TEST_ARGS:-} > "$OUT/tests.log" 2>&1
  stamp "tests rc=$?"; tail -3 "$OUT/tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
fi
if has bench || has benchq; then
  timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_quantize.py --out "$OUT" > "$OUT/bench_quantize.log" 2>&1; stamp "bench_quantize rc=$?"
fi
if has bench || has benchmm; then
  timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_matmul.py --out "$OUT" ${MATMUL_ARGS:-} > "$OUT/bench_matmul.log" 2>&1; stamp "bench_matmul rc=$?"
fi
if has sanitize; then  # compute-sanitizer memcheck + racecheck on every matmul kernel at odd shapes
  STEPS=sanitize bash benchmarks/gpu_matmul.sh | grep -E "sanitizer|SUMMARY|worst"
fi
ls "$OUT"
