"""Probe (device): 8192x28672 at batch 4096, NF4 bs64 nested, five interleaved rounds of cuBLAS on
the dense weight, nf4kit's matmul_4bit, nf4kit's dequantize + F.linear, and bitsandbytes'
matmul_4bit; medians (L2 flushed) per round, to tell a real gap from the GEMM's run-to-run spread."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_matmul  # noqa: E402
from bench_matmul import bench, load_bnb, quantize  # noqa: E402

bench_matmul.torch = torch  # bench_matmul imports torch in its main()

import nf4kit.functional as F  # noqa: E402
import torch.nn.functional as TF  # noqa: E402


def main():
    K, N, M = 8192, 28672, int(os.environ.get("M", "4096"))
    bnb, BF = load_bnb()
    for dtype in (torch.float16, torch.bfloat16):
        g = torch.Generator(device="cuda").manual_seed(K + N)
        W = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) * 0.02
        Bq, qs = quantize(W)
        Bb, qsb = BF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
        A = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
        with torch.inference_mode():
            for r in range(5):
                t = {
                    "cublas": bench(lambda: TF.linear(A, W), 30),
                    "nf4kit": bench(lambda: F.matmul_4bit(A, Bq.t(), qs), 30),
                    "nf4kit_deq+linear": bench(lambda: TF.linear(A, F.dequantize_4bit(Bq, qs)), 30),
                    "nf4kit_deq_only": bench(lambda: F.dequantize_4bit(Bq, qs), 30),
                    "bnb": bench(lambda: bnb.matmul_4bit(A, Bb.t(), qsb), 30),
                    "bnb_deq_only": bench(lambda: BF.dequantize_4bit(Bb, qsb), 30),
                }
                print(str(dtype).replace("torch.", ""), f"M={M} round {r}: " + " ".join(f"{k} {v:.4f}" for k, v in t.items()), flush=True)


if __name__ == "__main__":
    main()
