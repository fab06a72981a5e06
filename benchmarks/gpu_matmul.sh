#!/bin/bash
# One device call for the 4-bit matmul kernels (csrc/cuda/gemm_4bit.cu): build them (with the
# dequantize kernel the fallback path uses), the matmul tests, compute-sanitizer memcheck and
# racecheck on every kernel at odd shapes, the dispatch tuning sweep and the benchmark.
# Everything lands in $OUT: build.log, tests.log, sanitizer_matmul.log, tune.log, bench.log,
# matmul.{md,json}. Run from the repository root with .bnb (bitsandbytes 0.50.2 + CUDA library)
# and .whl (pytest wheels, installed only if the device lacks pytest) carried.
#   STEPS="build tests sanitize probe tune bench ncu" (default: build tests tune bench sanitize),
#   BENCH_ARGS="--layers 8192x28672", PROBE="python3 benchmarks/probes/wg_tiles.py"
set -o pipefail
source benchmarks/gpu_env.sh
export NF4KIT_CUDA_SOURCES=${NF4KIT_CUDA_SOURCES:-gemm_4bit.cu,dequantize_4bit.cu}
STEPS=${STEPS:-build tests tune bench sanitize}
has() { [[ " $STEPS " == *" $1 "* ]]; }
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader

if has build; then
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || {
    stamp "build with $NF4KIT_CUDA_SOURCES failed, retrying gemm_4bit.cu alone"; tail -20 "$OUT/build.log"
    NF4KIT_CUDA_SOURCES=gemm_4bit.cu python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  }
  stamp "built"
fi

if has tests; then
  # The other op the matmul code relies on (autograd's backward): its CUDA kernel alone, in a subprocess.
  python3 - > "$OUT/tests.log" 2>&1 <<'PY'
import subprocess, sys
code = """
import torch, nf4kit
p = torch.randint(0, 256, (4096,), dtype=torch.uint8, device='cuda'); a = torch.rand(128, device='cuda')
for dt in (torch.float16, torch.float32):
    o = torch.ops.nf4kit.dequantize_4bit(p, a, None, None, None, 64, 256, 'nf4', [64, 128], dt); torch.cuda.synchronize()
print('dequantize_4bit CUDA ok')
"""
r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
print(f"dequantize_4bit probe rc={r.returncode}", r.stdout.strip(), r.stderr.strip()[-400:])
PY
  # groups in separate processes, so that a crash in one leaves the others' results
  for group in "reference or batch or one_output or gemv or non_contiguous or empty or bias_in_any" "forced or cpu_op or skinny_fp4 or wg_stream_k or wg_dp or wg_deep or wg_packed or wg_producer or skinny_rows or skinny_v2 or skinny_wide or skinny_l2 or wg_l2 or dispatch_skinny or wg_wide_table or wg_tile32" \
               "bad_inputs or state_checks or bitsandbytes or wg_prew" "opcheck" "autograd"; do
    echo "=== -k '$group' ===" >> "$OUT/tests.log"
    timeout ${TEST_TIMEOUT:-240} python3 -m pytest tests/test_matmul.py -q -rs --maxfail=20 -p no:cacheprovider \
      -k "$group" ${TEST_ARGS:-} >> "$OUT/tests.log" 2>&1
    stamp "tests [$group] rc=$?"
  done
  grep -E "probe|passed|failed|error" "$OUT/tests.log" | tail -6
  grep -E "^(FAILED|ERROR)|Error:|Fatal|assert " "$OUT/tests.log" | head -30
fi

if has probe; then  # PROBE: any command (a benchmarks/probes/ script); its output to probe.log
  timeout ${PROBE_TIMEOUT:-200} bash -c "$PROBE" 2>&1 | tee "$OUT/probe.log"
  stamp "probe done"
fi

if has tune; then
  timeout ${TUNE_TIMEOUT:-120} python3 benchmarks/bench_matmul.py --tune 2>&1 | tee "$OUT/tune.log"
  stamp "tune done"
fi

if has bench; then
  timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_matmul.py --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  stamp "bench rc=$?"
  [ -f "$OUT/matmul.md" ] && grep -E "^\| (8192x28672|4096x4096) " "$OUT/matmul.md" | cut -d'|' -f2-7
fi

if has ncu; then
  NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  for prof in ${PROFILES:-skinny,1 skinny,8 tc,64}; do
    kname=${KNAME:-$([[ $prof == tc* ]] && echo gemm4_tc || echo gemm4_${prof%%,*})}
    echo "=== ncu $prof ===" >> "$OUT/ncu.log"
    timeout 90 "$NCU" --clock-control none --kernel-name regex:$kname --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
      --section SchedulerStats --section LaunchStats ${NCU_EXTRA:-} python3 benchmarks/bench_matmul.py --profile $prof >> "$OUT/ncu.log" 2>&1
    stamp "ncu $prof rc=$?"
  done
  grep -E "^=== ncu|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|L1/TEX Hit|L2 Hit|Achieved Occupancy|Issued Warp|No Eligible|Stall" "$OUT/ncu.log" | head -60
fi

if has sanitize; then
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck; do
    echo "=== compute-sanitizer --tool $tool ===" >> "$OUT/sanitizer_matmul.log"
    timeout ${SAN_TIMEOUT:-150} "$SAN" --tool $tool --error-exitcode 9 python3 benchmarks/bench_matmul.py --sanitize \
      >> "$OUT/sanitizer_matmul.log" 2>&1
    stamp "sanitizer $tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|worst" "$OUT/sanitizer_matmul.log" | tail -2
  done
fi
