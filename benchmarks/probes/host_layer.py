"""Probe (device): host time per forward call of one Linear4bit layer (NF4, nested, compute dtype fp16)
against torch.nn.Linear in fp16, without a bias, with an fp16 bias and with an fp32 one (a bias the
layer's dtype left at float32: cast every call), in the nf4kit found on the path, ROUNDS (15)
interleaved rounds of CALLS (300) calls queued behind a GPU sleep (host_time.host_us), under torch.inference_mode, torch.no_grad
and autograd on (nothing requiring grad: a frozen layer); LAYER (4096x4096), batch 1. Run it in two
trees, alternating, to compare two versions of the Python code. Median (min) microseconds per call."""
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_matmul import env_int  # noqa: E402
from host_time import interleaved  # noqa: E402

import nf4kit  # noqa: E402
from nf4kit.nn import Linear4bit  # noqa: E402


def main():
    K, N = (int(v) for v in os.environ.get("LAYER", "4096x4096").split("x"))
    rounds, calls = env_int("ROUNDS", 15), env_int("CALLS", 300)
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    cands = {}
    for bias, bias_dtype in (("none", None), ("fp16", torch.float16), ("fp32", torch.float32)):
        dense = torch.nn.Linear(K, N, bias=bias_dtype is not None, dtype=torch.float16, device="cuda")
        q = Linear4bit(K, N, bias=bias_dtype is not None, compute_dtype=torch.float16, quant_type="nf4",
                       compress_statistics=True, device="cpu")
        q.load_state_dict(dense.state_dict())
        if bias_dtype is not None:
            q.bias.data = q.bias.data.to(bias_dtype)
        q = q.to("cuda").requires_grad_(False)  # moving to the GPU quantizes
        assert q.weight.bnb_quantized
        dense.requires_grad_(False)
        cands[f"nn.Linear/{bias}"] = lambda dense=dense: dense(x)
        cands[f"Linear4bit/{bias}"] = lambda q=q: q(x)
    print(f"# host_layer {os.path.dirname(os.path.abspath(nf4kit.__file__))} on {torch.cuda.get_device_name()}, "
          f"{K}x{N} batch 1 fp16, {rounds} x {calls} calls; us per call, median (min)")
    modes = (("inference", torch.inference_mode), ("no_grad", torch.no_grad), ("on", contextlib.nullcontext))
    interleaved(cands, modes, rounds, calls)


if __name__ == "__main__":
    main()
