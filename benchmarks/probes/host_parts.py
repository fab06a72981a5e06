"""Probe (device): where a matmul_4bit call's host time goes. One process, ROUNDS (15) interleaved rounds
of CALLS (300) calls each, queued behind a GPU sleep (host_time.host_us), under torch.inference_mode and
torch.no_grad, 4096x4096 batch 1 fp16: F.linear; the op called directly with prepared arguments (the
packet and the .default overload); matmul_4bit; matmul_4bit with the op replaced by a stub (Python alone);
torch.empty of the output (an allocation's floor). Median (min) microseconds per call."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_matmul import env_int, quantize  # noqa: E402
from host_time import interleaved  # noqa: E402

import nf4kit.functional as F  # noqa: E402
import torch.nn.functional as TF  # noqa: E402


class _Stub:
    """Stands in for nf4kit's op namespace: returns A, runs nothing."""
    @staticmethod
    def gemm_4bit(A, *args):
        return A


def main():
    K, N = (int(v) for v in os.environ.get("LAYER", "4096x4096").split("x"))
    rounds, calls = env_int("ROUNDS", 15), env_int("CALLS", 300)
    W = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
    A = torch.randn(1, K, device="cuda", dtype=torch.float16)
    Bq, qs = quantize(W)
    args = (A, Bq, *qs._decode_args(), N, None)
    real = F.ops
    stub = _Stub()

    def python_only():
        F.ops = stub
        try:
            return F.matmul_4bit(A, Bq.t(), qs)
        finally:
            F.ops = real

    cands = {"linear": lambda: TF.linear(A, W), "op": lambda: torch.ops.nf4kit.gemm_4bit(*args),
             "op.default": lambda: torch.ops.nf4kit.gemm_4bit.default(*args),
             "matmul_4bit": lambda: F.matmul_4bit(A, Bq.t(), qs), "python": python_only,
             "empty": lambda: torch.empty((1, N), device="cuda", dtype=torch.float16)}
    print(f"# host_parts on {torch.cuda.get_device_name()}, torch {torch.__version__}: {K}x{N} batch 1, "
          f"{rounds} rounds x {calls} calls; us per call, median (min)")
    interleaved(cands, (("inference", torch.inference_mode), ("no_grad", torch.no_grad)), rounds, calls)


if __name__ == "__main__":
    main()
