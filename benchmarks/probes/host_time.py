"""Probe (device): host time against GPU time of one 4-bit matmul call. For each LAYER in LAYERS
(4096x4096,8192x28672), batch in MS (1,128) and path in PATHS (auto,dequant,wg; NF4KIT_GEMM_PATH
values, "PATH:VAR=VALUE" as in ab_paths.py), and for cuBLAS (F.linear) in the same dtype:
  host   microseconds of CPU per call: 200 calls queued behind a long GPU sleep, so that the CPU never
         waits for the GPU (what a Python loop of layers pays per call without CUDA graphs);
  graph  the call captured in a CUDA graph, replayed (median ms, L2 flushed): GPU time alone;
  call   bench_matmul.bench of the plain call (median ms, L2 flushed), the table's number.
With PROFILE=1, last, the CPU ops with the most self time in 50 calls of the first path at the first
layer and batch. DTYPE=float16 (or bfloat16); GRAD=inference (torch.inference_mode, the default), no_grad
(torch.no_grad, as transformers' generate) or on (autograd on; no input requires grad)."""
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_matmul import bench, env, env_ints, env_list, path_env, quantize  # noqa: E402

import nf4kit.functional as F  # noqa: E402
import torch.nn.functional as TF  # noqa: E402


def host_us(fn, calls=200, sleep_cycles=2_000_000_000):
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(sleep_cycles)  # ~1 s of GPU spin: the queue never drains while the CPU runs
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def interleaved(cands: dict, modes, rounds: int, calls: int, sleep_cycles: int = 100_000_000) -> None:
    """For each (name, context manager) in modes, rounds of host_us over the candidates (name -> call)
    in an order rotated every round, so that the host's drift falls on all alike; prints the median
    (min) microseconds per call. The default ~50 ms of GPU sleep covers 300 calls of up to 60 us."""
    for grad, mode in modes:
        times = {k: [] for k in cands}
        with mode():
            for r in range(rounds):
                names = list(cands)
                for k in names[r % len(names):] + names[:r % len(names)]:
                    times[k].append(host_us(cands[k], calls, sleep_cycles))
        print(f"{grad:9s} " + " | ".join(f"{k} {statistics.median(v):.1f} ({min(v):.1f})" for k, v in times.items()),
              flush=True)


def graph_ms(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(g.replay, 40)


def main():
    layers = env_list("LAYERS", "4096x4096,8192x28672")
    Ms = env_ints("MS", "1,128")
    paths = env_list("PATHS", "auto,dequant,wg")
    dtype = getattr(torch, os.environ.get("DTYPE", "float16"))
    print(f"# host_time {dtype} on {torch.cuda.get_device_name()}, torch {torch.__version__}: host us per call | "
          "graph replay ms | plain call ms (both medians, L2 flushed)")
    first = None
    grad = os.environ.get("GRAD", "inference")
    mode = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "on": contextlib.nullcontext}[grad]
    print(f"# grad mode: {grad}")
    with mode():
        for layer in layers:
            K, N = (int(v) for v in layer.split("x"))
            g = torch.Generator(device="cuda").manual_seed(K + N)
            W = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) * 0.02
            Bq, qs = quantize(W)
            for M in Ms:
                A = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
                cands = {"cublas": (lambda A=A, W=W: TF.linear(A, W), {})}
                for p in paths:
                    cands[p] = (lambda A=A, Bq=Bq, qs=qs: F.matmul_4bit(A, Bq.t(), qs), path_env(p))
                for name, (fn, vars_) in cands.items():
                    with env(**vars_):
                        h = host_us(fn)
                        try:
                            gr = f"{graph_ms(fn):.4f}"
                        except Exception as e:  # noqa: BLE001 - report and go on
                            gr = f"n/a ({type(e).__name__}: {str(e)[:60]})"
                        c = bench(fn, 40)
                    print(f"{layer} M={M:4d} {name:8s} host {h:6.1f} us | graph {gr} | call {c:.4f}", flush=True)
                if first is None:
                    first = cands[paths[0]]
        # last: calls timed after a torch.profiler session came out slow (kernel_split.py's note)
        if os.environ.get("PROFILE") == "1" and first is not None:
            from torch.profiler import ProfilerActivity, profile
            fn, vars_ = first
            with env(**vars_):
                fn()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(50):
                        fn()
                torch.cuda.synchronize()
            print(f"# CPU ops of 50 calls of {paths[0]} at {layers[0]}, M={Ms[0]}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)


if __name__ == "__main__":
    main()
