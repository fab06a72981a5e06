"""Quantize / dequantize speed on the GPU, beside bitsandbytes' CUDA build and the card's own copy speed.

The case: an fp16 8192 x 28672 weight (a 70B-class MLP matrix) to NF4, blocksize 64, nested absmax
(compress_statistics=True), and back, through the public API (functional.quantize_4bit /
dequantize_4bit: everything a user's call does, the nested statistics and the finite check
included). Bytes counted are what the call must read and write at least (input once, outputs
once); each time is the median of triton's do_bench, which flushes L2 before every run. The copy
reference is a device-to-device copy of the 470 MB fp16 weight (bytes read + written).

    python benchmarks/bench_quantize.py --out benchmarks/results/h100     # writes quantize.md / .json
    python benchmarks/bench_quantize.py --sanitize                         # small odd shapes, for compute-sanitizer
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

os.environ.setdefault("NF4KIT_POISON", "0")  # timing: no poison fill of the outputs

import torch  # noqa: E402

import nf4kit.functional as F  # noqa: E402
from nf4kit import reference as R  # noqa: E402

ops = torch.ops.nf4kit
ROWS, COLS, BLOCKSIZE = 8192, 28672, 64


def gpu_tag() -> str:
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4", "b200"):
        if tag in name:
            return tag
    return name.replace(" ", "_")


def bench(fn) -> float:
    """Median milliseconds, L2 flushed before every run (triton.testing.do_bench)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def load_bnb():
    try:
        import bitsandbytes.functional as BF
        probe = torch.randn(64, device="cuda", dtype=torch.float16)
        BF.quantize_4bit(probe, blocksize=64, quant_type="nf4")
        return BF
    except Exception as exc:
        print(f"bitsandbytes CUDA not usable: {exc!r}")
        return None


def run(out_dir: str | None) -> None:
    torch.manual_seed(0)
    dev = "cuda"
    W = torch.randn(ROWS, COLS, device=dev, dtype=torch.float16)
    n = W.numel()
    nblocks = n // BLOCKSIZE
    b_in = n * 2
    b_packed = n // 2
    b_absmax_q = nblocks  # uint8 codes
    b_nested = -(-nblocks // 256) * 4
    q_bytes = b_in + b_packed + b_absmax_q + b_nested
    dq_bytes = b_packed + b_absmax_q + b_nested + b_in

    dst = torch.empty_like(W)
    copy_ms = bench(lambda: dst.copy_(W))
    copy_bw = 2 * b_in / copy_ms / 1e6  # GB/s

    rows = []

    meta = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "case": f"fp16 {ROWS}x{COLS} -> NF4 blocksize {BLOCKSIZE}, nested absmax",
        "copy_ms": round(copy_ms, 4), "copy_GBps": round(copy_bw, 1),
        "bytes": {"quantize": q_bytes, "dequantize": dq_bytes},
        "timing": "triton.testing.do_bench median, L2 flushed before every run",
    }

    def add(name, ms, nbytes, note=""):
        bw = nbytes / ms / 1e6
        rows.append({"op": name, "ms": round(ms, 4), "GB/s": round(bw, 1), "of_copy_bw": round(bw / copy_bw, 3),
                     "note": note})
        print(f"{name}: {ms:.4f} ms, {bw:.0f} GB/s, {100 * bw / copy_bw:.1f}% of copy", flush=True)
        write(out_dir, meta, rows, b_in, q_bytes, dq_bytes, copy_ms, copy_bw)

    def q_nested():
        return F.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")

    # Exactness on this data too: a slice against the reference, bit for bit.
    small = W[:40]
    ref_q = R.quantize_4bit(small.cpu(), BLOCKSIZE, "nf4")
    ps, am = ops.quantize_4bit(small, BLOCKSIZE, "nf4")
    meta["slice_equals_reference"] = bool(torch.equal(ps.cpu(), ref_q[0]) and
                                          torch.equal(am.cpu().view(torch.int32), ref_q[1].view(torch.int32)))
    print(f"40-row slice == reference: {meta['slice_equals_reference']}", flush=True)

    packed, state = q_nested()
    add("nf4kit quantize_4bit (functional, nested)", bench(q_nested), q_bytes, "whole call: kernel + mean + nested + check")
    add("nf4kit quantize_4bit (functional, nested, check_finite=False)",
        bench(lambda: F.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4",
                                      check_finite=False)),
        q_bytes, "the same GPU work, no host wait for the NaN/Inf check")
    add("nf4kit ops.quantize_4bit (kernel only)", bench(lambda: ops.quantize_4bit(W, BLOCKSIZE, "nf4")),
        b_in + b_packed + nblocks * 4, "writes float32 absmax")
    add("nf4kit dequantize_4bit (functional, nested)", bench(lambda: F.dequantize_4bit(packed, state)), dq_bytes,
        "nested absmax decoded in the kernel")
    add("nf4kit dequantize_4bit to bf16 (ops)",
        bench(lambda: ops.dequantize_4bit(packed.reshape(-1), *state._decode_args()[:-1], state.quant_type,
                                          [ROWS, COLS], torch.bfloat16)), dq_bytes)
    absmax = ops.quantize_4bit(W, BLOCKSIZE, "nf4")[1]
    add("torch mean of the float32 absmax (functional's offset)", bench(lambda: absmax.mean()), nblocks * 4,
        "part of the nested call")
    offset = absmax.mean().reshape(1)
    code8 = R.create_dynamic_map().to(dev)
    add("nf4kit ops.quantize_nested_absmax", bench(lambda: ops.quantize_nested_absmax(absmax, offset, code8, 256)),
        nblocks * 4 + nblocks + b_nested, "incl. the 64 KB nearest-code table build")
    q8_bytes = b_in + n + -(-n // 4096) * 4
    add("nf4kit quantize_blockwise 8-bit bs4096 (functional)", bench(lambda: F.quantize_blockwise(W, blocksize=4096)),
        q8_bytes)

    BF = load_bnb()
    if BF is not None:
        def bnb_q():
            return BF.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        bp, bs = bnb_q()
        add("bitsandbytes quantize_4bit (nested)", bench(bnb_q), q_bytes)
        add("bitsandbytes dequantize_4bit (nested)", bench(lambda: BF.dequantize_4bit(bp, bs)), dq_bytes)
        add("bitsandbytes quantize_blockwise 8-bit bs4096", bench(lambda: BF.quantize_blockwise(W, blocksize=4096)),
            q8_bytes)
        bq8, bs8 = BF.quantize_blockwise(W, blocksize=4096)
        add("bitsandbytes dequantize_blockwise 8-bit bs4096", bench(lambda: BF.dequantize_blockwise(bq8, bs8)),
            q8_bytes)
        del bp, bs, bq8, bs8

    q8, s8 = F.quantize_blockwise(W, blocksize=4096)
    add("nf4kit dequantize_blockwise 8-bit bs4096 (functional)", bench(lambda: F.dequantize_blockwise(q8, s8)),
        q8_bytes)

    print(write(out_dir, meta, rows, b_in, q_bytes, dq_bytes, copy_ms, copy_bw))


def write(out_dir, meta, rows, b_in, q_bytes, dq_bytes, copy_ms, copy_bw) -> str:
    lines = [f"# Quantize / dequantize speed: {meta['card']}", "",
             f"{meta['case']}; torch {meta['torch']} (CUDA {meta['cuda']}); {meta['date']}.", "",
             f"Device-to-device copy of the {b_in / 1e6:.0f} MB weight: {copy_ms:.4f} ms = {copy_bw:.0f} GB/s "
             "(read + write). Bytes per op: inputs read once + outputs written once "
             f"(quantize {q_bytes / 1e6:.1f} MB, dequantize {dq_bytes / 1e6:.1f} MB). {meta['timing']}.", "",
             "| op | ms | GB/s | of copy bandwidth | note |", "| --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['op']} | {r['ms']:.4f} | {r['GB/s']:.0f} | {100 * r['of_copy_bw']:.1f}% | {r['note']} |" for r in rows]
    md = "\n".join(lines) + "\n"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "quantize.md"), "w") as f:
            f.write(md)
        with open(os.path.join(out_dir, "quantize.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return md


def sanitize() -> None:
    """Every kernel once on small odd shapes, for compute-sanitizer memcheck (out-of-bounds reads or
    writes show there); also checks the results against the CPU op."""
    os.environ["NF4KIT_POISON"] = "1"
    torch.manual_seed(1)
    code8 = R.create_dynamic_map().cuda()
    cases = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for n in (1, 33, 4097, 64 * 1000 + 31):
            x = torch.randn(n, device="cuda", dtype=dtype)
            xm = torch.randn(n + 1, device="cuda", dtype=dtype)[1:]  # misaligned view
            for bs in (32, 64, 4096):
                for qt in ("nf4", "fp4"):
                    for inp in (x, xm):
                        p, a = ops.quantize_4bit(inp, bs, qt)
                        off = a.mean().reshape(1)
                        q8, na = ops.quantize_nested_absmax(a, off, code8, 256)
                        assert torch.equal(p.cpu(), ops.quantize_4bit(inp.cpu(), bs, qt)[0])
                        cases.append((p, a, q8, na, off, bs, qt, n, dtype))
            # the NaN/Inf flag, on the device and in pinned host memory, with a NaN in a partial block
            y = x.clone()
            y[-1] = float("nan")
            for flag in (torch.zeros(1, dtype=torch.int32, device="cuda"),
                         torch.zeros(1, dtype=torch.int32).pin_memory()):
                for bs in (64, 4096):
                    ops.quantize_4bit(y, bs, "nf4", flag)
                    torch.cuda.synchronize()
                    assert int(flag[0]) == 1, "the NaN did not set the flag"
                    flag.zero_()
            for bs in (7, 256, 4096):
                q, a = ops.quantize_blockwise(x, code8, bs)
                assert torch.equal(q.cpu(), ops.quantize_blockwise(x.cpu(), code8.cpu(), bs)[0])
                cases.append((q, a, bs, dtype))
    torch.cuda.synchronize()
    print("sanitize run: quantize kernels done", flush=True)
    for c in cases:
        if len(c) == 4:
            q, a, bs, dtype = c
            assert not torch.isnan(ops.dequantize_blockwise(q, a, code8, bs, dtype)).any()
            continue
        p, a, q8, na, off, bs, qt, n, dtype = c
        out = ops.dequantize_4bit(p, q8, na, code8, off, bs, 256, qt, [n], dtype)
        out2 = ops.dequantize_4bit(p[: (n + 1) // 2], a, None, None, None, bs, 256, qt, [n], dtype)
        assert not torch.isnan(out).any() and not torch.isnan(out2).any()
    torch.cuda.synchronize()
    print("sanitize run: all kernels ran on odd shapes, results equal the CPU op")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for quantize.md and quantize.json")
    ap.add_argument("--sanitize", action="store_true", help="small odd shapes for compute-sanitizer")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    sanitize() if args.sanitize else run(args.out)
