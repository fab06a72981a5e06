#!/bin/bash
# Probe (device): per-instruction warp-stall samples of one kernel (ncu source counters), for the
# hot spots of its loop. PROF="wg,128" (bench_matmul.py --profile PATH,M on 8192x28672 fp16),
# KNAME=gemm4_wg. Writes $OUT/ncu_source_<path>_<M>.csv (SASS, one row per instruction with its
# stall-reason samples) and prints the 40 instructions with the most samples.
source benchmarks/gpu_env.sh
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
PROF=${PROF:-wg,128}
KNAME=${KNAME:-gemm4_wg}
tag=${PROF/,/_}
rep=/tmp/ncu_src_$tag
timeout 120 "$NCU" --clock-control none --kernel-name regex:$KNAME --launch-skip 1 --launch-count 1 \
  --section SourceCounters --section WarpStateStats -f -o $rep python3 benchmarks/bench_matmul.py --profile $PROF > /dev/null 2>&1
echo "ncu rc=$?"
"$NCU" -i $rep.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_source_$tag.csv" 2> "$OUT/ncu_source_$tag.err"
echo "source page rc=$? lines=$(wc -l < "$OUT/ncu_source_$tag.csv")"
python3 - "$OUT/ncu_source_$tag.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
if len(rows) < 2:
    print("no rows"); sys.exit()
head = rows[0]
def col(name):
    for i, h in enumerate(head):
        if h.strip().lower() == name.lower():
            return i
    return None
src = col("Source")
samp = col("Warp Stall Sampling (All Samples)") or col("Warp Stall Sampling (All Cycles)")
print("columns:", [h for h in head][:40])
if src is None or samp is None:
    sys.exit()
def num(v):
    try: return float(v.replace(",", ""))
    except ValueError: return 0.0
body = [r for r in rows[1:] if len(r) > samp]
tot = sum(num(r[samp]) for r in body) or 1
stall_cols = [i for i, h in enumerate(head) if h.startswith("stall_") or "Stall" in h and i != samp]
for r in sorted(body, key=lambda r: -num(r[samp]))[:40]:
    print(f"{100 * num(r[samp]) / tot:5.1f}%  {r[0] if src != 0 else ''} {r[src][:70]}")
PY
