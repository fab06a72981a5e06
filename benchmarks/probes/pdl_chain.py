"""Probe (device): programmatic dependent launch (launch_pdl, the skinny kernel; needs
benchmarks/probes/skinny_pdl.patch applied: main launches without it, so "on" and "off" then time the
same thing) on chains of matmul_4bit calls replayed from CUDA graphs, as a decode step runs them.
Twenty-sixth session, call 3: experiments/pdl_chain_s26_run3.txt (not kept: slower back to back on the
4096-wide layers, level elsewhere). Each chain is captured twice, with
NF4KIT_PDL=1 and =0 (launch_pdl reads it at launch, so at capture), and cuBLAS's F.linear on the fp16
weights is captured alike. Two forms of each chain:
  * back to back: the calls follow each other (q, k, v or gate, up in a layer that does not fuse them);
  * between: a PyTorch elementwise kernel (out.mul_(1)) after every call, as a norm or an activation
    sits between most of a decode step's matmuls (a kernel launched without PDL before each call).
Times: triton do_bench medians (L2 flushed before every replay) over ROUNDS (7) interleaved rounds, ms
per chain; BATCHES (1,8); fp16.
  python3 benchmarks/probes/pdl_chain.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_matmul import env_int, env_ints, interleaved, quantize  # noqa: E402

import nf4kit.functional as F  # noqa: E402

CHAINS = {  # name: layers (in x out); Llama-3-8B's decode-step shapes, and the benchmark's largest
    "qkvo 4 x 4096x4096": [(4096, 4096)] * 4,
    "gate, up 2 x 4096x14336 + down 14336x4096": [(4096, 14336)] * 2 + [(14336, 4096)],
    "2 x 8192x28672": [(8192, 28672)] * 2,
}


def graph_of(fn):
    fn()  # allocations before capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def main():
    rounds, dtype = env_int("ROUNDS", 7), torch.float16
    print(f"# pdl_chain on {torch.cuda.get_device_name()}, torch {torch.__version__}, fp16, {rounds} rounds; "
          "ms per chain (median, L2 flushed before each replay)")
    for name, layers in CHAINS.items():
        mats = []
        for K, N in layers:
            W = torch.randn(N, K, device="cuda", dtype=dtype) / K ** 0.5
            B, qs = quantize(W)
            mats.append((K, W, B, qs))
        for M in env_ints("BATCHES", "1,8"):
            xs = {K: torch.randn(M, K, device="cuda", dtype=dtype) for K, *_ in mats}
            for between in (False, True):
                def q4(between=between, xs=xs, mats=mats):
                    for K, _, B, qs in mats:
                        y = F.matmul_4bit(xs[K], B.t(), qs)
                        if between:
                            y.mul_(1.0)

                def dense(between=between, xs=xs, mats=mats):
                    for K, W, *_ in mats:
                        y = torch.nn.functional.linear(xs[K], W)
                        if between:
                            y.mul_(1.0)
                graphs = {}
                for pdl in ("0", "1"):
                    os.environ["NF4KIT_PDL"] = pdl
                    graphs[f"nf4kit PDL={pdl}"] = graph_of(q4)
                os.environ.pop("NF4KIT_PDL")
                graphs["cuBLAS"] = graph_of(dense)
                t = interleaved({n: g.replay for n, g in graphs.items()}, 200, rounds)
                off, on = t["nf4kit PDL=0"], t["nf4kit PDL=1"]
                print(f"{name:44s} M={M} {'between' if between else 'back to back':12s} "
                      f"off {off:.4f}  on {on:.4f}  ({1e3 * (off - on) / len(layers):+.2f} us a call)  "
                      f"cuBLAS {t['cuBLAS']:.4f}  speed-up off/on {t['cuBLAS'] / off:.2f}x / {t['cuBLAS'] / on:.2f}x")
        del mats
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
