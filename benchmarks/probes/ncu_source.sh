#!/bin/bash
# Probe (device): per-instruction warp-stall samples of one kernel (ncu source counters), for the
# hot spots of its loop. PROF="wg,128" (bench_matmul.py --profile PATH,M[,KxN], 8192x28672 fp16 by default),
# KNAME=gemm4_wg. Writes $OUT/ncu_source_<path>_<M>.csv (SASS, one row per instruction with its
# stall-reason samples) and prints the samples by stall reason and by opcode, and the 40 instructions
# with the most samples (benchmarks/results/h100/ncu_source_*.txt).
source benchmarks/gpu_env.sh
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
PROF=${PROF:-wg,128}
KNAME=${KNAME:-gemm4_wg}
tag=${PROF//,/_}
rep=/tmp/ncu_src_$tag
timeout 120 "$NCU" --clock-control none --kernel-name regex:$KNAME --launch-skip 1 --launch-count 1 \
  --section SourceCounters --section WarpStateStats -f -o $rep python3 benchmarks/bench_matmul.py --profile $PROF > /dev/null 2>&1
echo "ncu rc=$?"
"$NCU" -i $rep.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_source_$tag.csv" 2> "$OUT/ncu_source_$tag.err"
echo "source page rc=$? lines=$(wc -l < "$OUT/ncu_source_$tag.csv")"
python3 - "$OUT/ncu_source_$tag.csv" 40 <<'PY'
import csv, sys, collections
rows = list(csv.reader(open(sys.argv[1])))
if rows and rows[0] and rows[0][0] == "Kernel Name": rows = rows[1:]
head = rows[0]; ix = {h: i for i, h in enumerate(head)}
body = [r for r in rows[1:] if len(r) == len(head)]
num = lambda v: float(v.replace(",", "")) if v not in ("", "-") else 0.0
S = ix["Warp Stall Sampling (All Samples)"]
tot = sum(num(r[S]) for r in body)
stalls = [h for h in head if h.startswith("stall_") and "Not Issued" not in h]
agg = collections.Counter()
for r in body:
    for h in stalls: agg[h] += num(r[ix[h]])
print("total samples", tot, "instructions executed", sum(num(r[ix["Instructions Executed"]]) for r in body))
print("by reason:", ", ".join(f"{h[6:]} {100*v/tot:.1f}%" for h, v in agg.most_common(10)))
# by opcode
op = collections.Counter(); opx = collections.Counter()
for r in body:
    o = r[ix["Source"]].strip().split()
    o = o[1] if o and o[0].startswith("@") else (o[0] if o else "")
    op[o.split(".")[0]] += num(r[S]); opx[o.split(".")[0]] += num(r[ix["Instructions Executed"]])
print("samples by opcode:", ", ".join(f"{k} {100*v/tot:.1f}%" for k, v in op.most_common(12)))
print("executed by opcode:", ", ".join(f"{k} {v:.0f}" for k, v in opx.most_common(14)))
print("top instructions:")
for r in sorted(body, key=lambda r: -num(r[S]))[:int(sys.argv[2]) if len(sys.argv) > 2 else 25]:
    top = sorted(((num(r[ix[h]]), h[6:]) for h in stalls), reverse=True)[:2]
    print(f"{100*num(r[S])/tot:5.1f}%  exec {num(r[ix['Instructions Executed']]):9.0f}  {r[ix['Source']].strip()[:64]:64s} {top[0][1]} {top[1][1]}")
PY
