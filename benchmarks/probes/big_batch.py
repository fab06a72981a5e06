"""Probe (device): 8192x28672 at batch 4096 (MS: a list), NF4 bs64 nested, ROUNDS (5) interleaved
rounds of cuBLAS on the dense weight (F.linear on W [N, K]; cublas_nn: A @ W^T stored [K, N]),
nf4kit's matmul_4bit (and each path in PATHS, forced), nf4kit's dequantize + F.linear, and
bitsandbytes' matmul_4bit; medians (L2 flushed) per round, to tell a real gap from the GEMM's
run-to-run spread."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_matmul  # noqa: E402
from bench_matmul import bench, env_int, env_ints, env_list, load_bnb, quantize  # noqa: E402

bench_matmul.torch = torch  # bench_matmul imports torch in its main()

import nf4kit.functional as F  # noqa: E402
import torch.nn.functional as TF  # noqa: E402


def main():
    K, N = 8192, 28672
    Ms = env_ints("MS", os.environ.get("M", "4096"))
    paths = env_list("PATHS", "")
    rounds = env_int("ROUNDS", 5)
    bnb, BF = load_bnb()
    for dtype in (torch.float16, torch.bfloat16):
        g = torch.Generator(device="cuda").manual_seed(K + N)
        W = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) * 0.02
        Bq, qs = quantize(W)
        Bb, qsb = BF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
        WT = W.t().contiguous()
        for M, r in ((M, r) for M in Ms for r in range(rounds)):
            A = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
            with torch.inference_mode():
                t = {
                    "cublas": bench(lambda: TF.linear(A, W), 30),
                    "cublas_nn": bench(lambda: A @ WT, 30),
                    "nf4kit": bench(lambda: F.matmul_4bit(A, Bq.t(), qs), 30),
                    "nf4kit_deq+linear": bench(lambda: TF.linear(A, F.dequantize_4bit(Bq, qs)), 30),
                    "nf4kit_deq_only": bench(lambda: F.dequantize_4bit(Bq, qs), 30),
                    "bnb": bench(lambda: bnb.matmul_4bit(A, Bb.t(), qsb), 30),
                    "bnb_deq_only": bench(lambda: BF.dequantize_4bit(Bb, qsb), 30),
                }
                for q in paths:
                    with bench_matmul.env(NF4KIT_GEMM_PATH=q):
                        t[q] = bench(lambda: F.matmul_4bit(A, Bq.t(), qs), 30)
                print(str(dtype).replace("torch.", ""), f"M={M} round {r}: " + " ".join(f"{k} {v:.4f}" for k, v in t.items()), flush=True)


if __name__ == "__main__":
    main()
