"""Probe (device): where a 4-bit matmul call's time goes, kernel by kernel. For LAYER=KxN (4096x4096)
at each batch in MS (96,128,256) and each path in PATHS (auto,dequant,wgsk,wg; NF4KIT_GEMM_PATH
values, "PATH:VAR=VALUE" as in ab_paths.py), and for fp16 cuBLAS: the call's median time (L2 flushed,
bench_matmul.bench) beside the GPU time of each kernel it launched (torch.profiler over REPS calls,
an L2 flush before each, mean microseconds per call). A call much slower than its kernels' sum
spends the rest between them or on the host."""
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_matmul import bench, env, env_ints, env_layer, env_list, path_env, quantize  # noqa: E402

import nf4kit.functional as F  # noqa: E402
import torch.nn.functional as TF  # noqa: E402


def kernels(fn, reps, flush):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and "zero" not in e.name and "fill" not in e.name.lower():
            per[e.name[:70]] += e.device_time / reps
    return per


def main():
    K, N = env_layer("4096x4096")
    Ms = env_ints("MS", "96,128,256")
    paths = env_list("PATHS", "auto,dequant,wgsk,wg")
    reps = int(os.environ.get("REPS", "20"))
    dtype = torch.float16
    g = torch.Generator(device="cuda").manual_seed(K + N)
    W = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) * 0.02
    Bq, qs = quantize(W)
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    print(f"# kernel_split {K}x{N} fp16 on {torch.cuda.get_device_name()}: call median (ms) | kernels (us per call)")
    with torch.inference_mode():
        rows = []
        for M in Ms:
            A = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
            rows.append((M, "cublas", lambda A=A: TF.linear(A, W), {}))
            for p in paths:
                rows.append((M, p, lambda A=A: F.matmul_4bit(A, Bq.t(), qs), path_env(p)))
        calls = []
        # every call timed before the first profiler session: in run 1 of the fifteenth session each
        # call timed after one came out slow (most likely CUPTI left attached)
        for M, name, fn, vars_ in rows:
            with env(**vars_):
                calls.append(bench(fn, 40))
        for (M, name, fn, vars_), t in zip(rows, calls):
            with env(**vars_):
                ks = kernels(fn, reps, flush)
            total = sum(ks.values())
            print(f"M={M:4d} {name:8s} call {t:.4f} ms | kernels {total:6.1f} us: "
                  + "; ".join(f"{k} {v:.1f}" for k, v in sorted(ks.items(), key=lambda kv: -kv[1])), flush=True)


if __name__ == "__main__":
    main()
