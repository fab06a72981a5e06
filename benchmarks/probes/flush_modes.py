"""Probe (device): does the batch-1 ratio depend on how L2 is flushed? The benchmark flushes as triton's
do_bench does, by writing 256 MB, which leaves L2 full of dirty lines that the timed read must write
back; a flush that only reads 256 MB leaves it clean. Times cuBLAS (F.linear, fp16 weight) and
matmul_4bit (NF4, blocksize 64, nested) at batch 1 on LAYER (8192x28672) after each kind of flush,
CUDA events around the call alone, median of CALLS (200) per round, ROUNDS (7) interleaved rounds.
The bare read of the packed weight after each flush is benchmarks/probes/l2_policy.cu's.
  python3 benchmarks/probes/flush_modes.py"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_matmul import env_int, env_layer, quantize  # noqa: E402

import nf4kit.functional as F  # noqa: E402


def timed(fn, flush, calls):
    start = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    for i in range(calls):
        flush()
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end))


def main():
    K, N = env_layer("8192x28672")
    rounds, calls = env_int("ROUNDS", 7), env_int("CALLS", 200)
    W = torch.randn(N, K, device="cuda", dtype=torch.float16) / K ** 0.5
    B, qs = quantize(W)
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    buf = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    words = buf.view(torch.int64)
    flushes = {"write flush": lambda: buf.zero_(), "read flush": lambda: words.sum()}
    fns = {"cuBLAS": lambda: torch.nn.functional.linear(x, W), "nf4kit": lambda: F.matmul_4bit(x, B.t(), qs)}
    for f in flushes.values():  # warm up
        for fn in fns.values():
            timed(fn, f, 10)
    times = {(fl, fn): [] for fl in flushes for fn in fns}
    for r in range(rounds):
        for fl, flush in flushes.items():
            for fn, call in fns.items():
                times[(fl, fn)].append(timed(call, flush, calls))
    print(f"# flush_modes on {torch.cuda.get_device_name()}, {K}x{N} fp16 batch 1, {rounds} rounds x {calls} calls; "
          "ms, median of round medians")
    for fl in flushes:
        cb, q = (statistics.median(times[(fl, fn)]) for fn in fns)
        print(f"{fl:12s} cuBLAS {cb:.4f}  nf4kit {q:.4f}  speed-up {cb / q:.2f}x  (3.5x would be {cb / 3.5:.4f})")


if __name__ == "__main__":
    main()
