"""Probe (device): the SM clock and the board power while one candidate runs back to back, to tell
whether a row is power-bound (the clock falls under the work) rather than bound by issue slots,
shared memory or DRAM. LAYER=KxN (8192x28672), MS=1,32,128,1024,4096, PATHS=auto (NF4KIT_GEMM_PATH
specs as in ab_paths.py; cuBLAS fp16 always), SECONDS=1.5 a candidate. nvidia-smi samples
clocks.sm and power.draw every 20 ms while the candidate runs; the time a call comes from CUDA
events over the whole loop (no L2 flush: the weight, 117 MB packed or 470 MB fp16, does not fit
in L2 anyway). Prints, per batch and candidate: ms a call, median SM clock (MHz), median power (W),
and the card's power limit once. Run 1 (twentieth session, H200, main,
benchmarks/results/h200/experiments/power_clock_s20_run4.log): 8192x28672 at batch 1 / 32 / 128 / 256 /
1024 / 4096, nf4kit 1980 / 1875 / 1695 / 1575 / 1500 / 1455 MHz at 471-566 W, cuBLAS 1980 / 1980 / 1440 /
1485 / 1440 / 1425 MHz at 326-600 W (limit 700 W): the large batches run at ~1450-1500 MHz under 600 W,
nf4kit's no lower than cuBLAS's.
"""
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_matmul import env, env_ints, env_layer, env_list, path_env, quantize  # noqa: E402

import nf4kit.functional as F  # noqa: E402
import torch.nn.functional as TF  # noqa: E402


def smi(query: str) -> str:
    return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True).stdout.strip()


def sampled(fn, seconds: float):
    """Runs fn back to back for about `seconds` while nvidia-smi samples; (ms a call, MHz, W)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t, 1e-5)
    n = max(10, int(seconds / one))
    proc = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                             "-lms", "20"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)  # nvidia-smi's start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    proc.terminate()
    out = proc.communicate()[0]
    clocks, watts = [], []
    for line in out.splitlines()[3:]:  # the first samples may predate the loop
        try:
            c, w = (float(v) for v in line.split(","))
        except ValueError:
            continue
        clocks.append(c)
        watts.append(w)
    med = (lambda v: statistics.median(v) if v else float("nan"))
    return start.elapsed_time(end) / n, med(clocks), med(watts)


def main():
    K, N = env_layer("8192x28672")
    Ms = env_ints("MS", "1,32,128,1024,4096")
    paths = env_list("PATHS", "auto")
    seconds = float(os.environ.get("SECONDS", "1.5"))
    dtype = torch.float16
    print(f"# power_clock {K}x{N} fp16 on {torch.cuda.get_device_name()}; power limit, max SM clock: "
          f"{smi('power.limit,clocks.max.sm')}; idle: clock, power {smi('clocks.sm,power.draw')}", flush=True)
    g = torch.Generator(device="cuda").manual_seed(K + N)
    W = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) * 0.02
    Bq, qs = quantize(W)
    with torch.inference_mode():
        for M in Ms:
            A = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
            line = f"M={M:5d}"
            ms, mhz, w = sampled(lambda: TF.linear(A, W), seconds)
            line += f" | cublas {ms:.4f} ms {mhz:.0f} MHz {w:.0f} W"
            for p in paths:
                with env(**path_env(p)):
                    ms, mhz, w = sampled(lambda: F.matmul_4bit(A, Bq.t(), qs), seconds)
                line += f" | {p} {ms:.4f} ms {mhz:.0f} MHz {w:.0f} W"
            print(line, flush=True)


if __name__ == "__main__":
    main()
