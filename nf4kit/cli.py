"""The ``nf4kit`` command: ``nf4kit demo`` (quantize a real transformer and report memory, agreement,
speed) and ``nf4kit info`` (torch, CUDA, the GPU, which kernels this build holds)."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import Optional, Sequence

OPS = ("quantize_4bit", "dequantize_4bit", "gemm_4bit", "quantize_blockwise", "dequantize_blockwise",
       "int8_vectorwise_quant", "int8_linear_matmul", "int8_mm_dequant")


def info() -> dict:
    import torch

    import nf4kit
    from nf4kit import _ops

    out = {
        "nf4kit": nf4kit.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)", "backends compiled": ",".join(_ops.BACKENDS) or "none",
    }
    if _ops.LOAD_ERROR is not None:
        out["load error"] = str(_ops.LOAD_ERROR)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            out[f"GPU {i}"] = f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})"
        out["torch CUDA archs"] = " ".join(torch.cuda.get_arch_list())
    else:
        out["GPU"] = "none visible"
    for key in ("CPU", "CUDA"):
        have = [op for op in OPS if _has_kernel(op, key)]
        out[f"{key} kernels"] = ", ".join(have) if have else "none"
    return out


def _has_kernel(op: str, key: str) -> bool:
    import torch

    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"nf4kit::{op}", key)
    except RuntimeError:  # op not defined in this build
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nf4kit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize all-MiniLM-L6-v2 with nf4kit: memory, agreement, speed")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"))
    demo.add_argument("--repeats", type=int, default=5, help="timed encodes (median reported)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    sub.add_parser("info", help="torch and CUDA versions, the GPU, the kernels compiled")
    args = parser.parse_args(argv)
    if args.command == "info":
        for key, value in info().items():
            print(f"{key:18s} {value}")
        return 0
    from .demo import run

    try:
        run(device=args.device, quant_type=args.quant_type, repeats=args.repeats, as_json=args.json)
    except RuntimeError as exc:
        print(f"nf4kit demo: {exc}", file=sys.stderr)
        return 1
    return 0
