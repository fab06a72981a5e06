#!/bin/bash
# Probe helper (device): build the working tree and variants of it at once, for ab_builds.py.
#   bash benchmarks/probes/build_variants.sh NAME=PATCH[+PATCH...][-FILE...] ...
# Each variant is a copy of the tree in /tmp/NAME (setup.py, csrc, nf4kit, benchmarks, tests) with
# each PATCH reversed (git apply -R) and each FILE (a csrc path) removed; the tree itself and every
# variant build in parallel (MAX_JOBS split between them) with the CUDA sources gpu_matmul.sh builds.
# Each build's extension also goes to $OUT/NAME.so.xz (the tree's to $OUT/tree.so.xz), so that a
# later call can restore it without building (xz -dc X.so.xz > nf4kit/_C*.so). Logs: $OUT/build_NAME.log.
set -o pipefail
source benchmarks/gpu_env.sh
export NF4KIT_CUDA_SOURCES=${NF4KIT_CUDA_SOURCES:-gemm_4bit.cu,dequantize_4bit.cu}
so=nf4kit/_C.cpython-$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')-x86_64-linux-gnu.so
n=$(( $# + 1 ))
export MAX_JOBS=$(( $(nproc) / n > 2 ? $(nproc) / n : 2 ))
t0=$(date +%s)
build() {  # dir name
  (cd "$1" && python3 setup.py build_ext --inplace > "$OUT/build_$2.log" 2>&1) &&
    xz -T2 -3 -c "$1/$so" > "$OUT/$2.so.xz" && echo "[$(( $(date +%s) - t0 )) s] built $2" ||
    { echo "build $2 failed"; tail -20 "$OUT/build_$2.log"; return 1; }
}
pids=()
for spec in "$@"; do
  name=${spec%%=*}; rest=${spec#*=}
  dir=/tmp/$name; rm -rf "$dir"; mkdir -p "$dir"
  cp -r setup.py pyproject.toml csrc nf4kit benchmarks tests "$dir"/
  rm -f "$dir"/nf4kit/_C*.so
  IFS='-' read -ra parts <<< "$rest"
  IFS='+' read -ra patches <<< "${parts[0]}"
  for pt in "${patches[@]}"; do
    [ -n "$pt" ] && { (cd "$dir" && git apply -R "$OLDPWD/$pt") || { echo "variant $name: $pt does not reverse"; exit 1; }; }
  done
  for f in "${parts[@]:1}"; do rm -f "$dir/$f"; done
  build "$dir" "$name" & pids+=($!)
done
build "$PWD" tree & pids+=($!)
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
