"""Probe (device): an interleaved A/B of the 4-bit matmul's paths, for differences smaller than the
card's drift (power and clocks move cuBLAS and every kernel by up to ~10% between back-to-back
timings of the same call). LAYER=KxN (8192x28672), MS=256,512,1024, PATHS=wg,wgdp (NF4KIT_GEMM_PATH
values; "auto" = the dispatch's own choice; "PATH:VAR=VALUE[:VAR=VALUE...]" also sets development variables, e.g.
wg:NF4KIT_WG_STAGES=8), ROUNDS=7, DTYPE=float16, BLOCKSIZE=64 (NF4, nested). Each round times cuBLAS and
every path once (median of a short L2-flushed run), in an order rotated every round; the report is
the median over rounds per candidate and its ratio to cuBLAS."""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_matmul import bench, env, env_int, env_ints, env_layer, env_list, path_env, quantize  # noqa: E402

import nf4kit.functional as F  # noqa: E402
import torch.nn.functional as TF  # noqa: E402


def main():
    K, N = env_layer("8192x28672")
    dtype = getattr(torch, os.environ.get("DTYPE", "float16"))
    Ms = env_ints("MS", "256,512,1024")
    paths = env_list("PATHS", "wg,wgdp")
    rounds = env_int("ROUNDS", 7)
    g = torch.Generator(device="cuda").manual_seed(K + N)
    W = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) * 0.02
    Bq, qs = quantize(W, env_int("BLOCKSIZE", 64))
    print(f"# ab_paths {K}x{N} {dtype} on {torch.cuda.get_device_name()}: median over {rounds} interleaved rounds, ms")
    with torch.inference_mode():
        for M in Ms:
            A = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
            rep = 15 if M >= 1024 else 40
            cands = {"cublas": lambda: TF.linear(A, W)}
            for p in paths:
                cands[p] = path_env(p)
            names = list(cands)
            times = {n: [] for n in names}
            for r in range(rounds):
                order = names[r % len(names):] + names[: r % len(names)]
                for n in order:
                    c = cands[n]
                    if callable(c):
                        times[n].append(bench(c, rep))
                    else:
                        with env(**c):
                            times[n].append(bench(lambda: F.matmul_4bit(A, Bq.t(), qs), rep))
            med = {n: statistics.median(v) for n, v in times.items()}
            spread = {n: (max(v) - min(v)) / med[n] for n, v in times.items()}
            print(f"M={M:5d} " + " ".join(f"{n} {med[n]:.4f} ({med['cublas'] / med[n]:.2f}x, spread {100 * spread[n]:.0f}%)"
                                          for n in names), flush=True)


if __name__ == "__main__":
    main()
