"""Probe (device): the warpgroup kernel at each batch tile (NF4KIT_WG_BN) against cuBLAS and the
other paths, 8192x28672 fp16 NF4 bs64 nested; medians, L2 flushed, inference mode."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_matmul import bench, env, env_ints, env_layer, env_list, quantize  # noqa: E402

import nf4kit.functional as F  # noqa: E402
import torch.nn.functional as TF  # noqa: E402


def main():
    K, N = env_layer("8192x28672")
    dtype = torch.float16
    W = torch.randn(N, K, device="cuda", dtype=dtype) * 0.02
    Bq, qs = quantize(W)
    Ms = env_ints("MS", "16,32,64,128,256,512,1024,4096")
    with torch.inference_mode():
        for M in Ms:
            A = torch.randn(M, K, device="cuda", dtype=dtype)
            rep = 40 if M >= 1024 else 100
            t_c = bench(lambda: TF.linear(A, W), rep)
            row = [f"M={M:5d} cublas {t_c:.4f}"]
            for bn in env_ints("BNS", "64,128,256"):
                with env(NF4KIT_GEMM_PATH="wg", NF4KIT_WG_BN=str(bn)):
                    t = bench(lambda: F.matmul_4bit(A, Bq.t(), qs), rep)
                row.append(f"wg{bn}:{t:.4f}({t_c / t:.2f}x)")
            for path in env_list("PATHS", "skinny,dequant" if M <= 32 else "dequant"):
                with env(NF4KIT_GEMM_PATH=path):
                    t = bench(lambda: F.matmul_4bit(A, Bq.t(), qs), rep)
                row.append(f"{path}:{t:.4f}({t_c / t:.2f}x)")
            print(" ".join(row), flush=True)


if __name__ == "__main__":
    main()
