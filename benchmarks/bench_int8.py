"""LLM.int8 on the GPU: nf4kit's Linear8bitLt beside an fp16 nn.Linear (cuBLAS) and bitsandbytes'
Linear8bitLt, plus the bare int8 matmul beside cuBLASLt's (torch._int_mm, bitsandbytes' igemmlt).

Weights [out, in] = 4096 x 4096 and 28672 x 8192 (a 70B-class MLP matrix), fp16 inputs of 1, 16,
256 and 4096 rows, no bias; thresholds 0 and 6.0 (LLM.int8's outlier threshold). Each time is the
median of triton's do_bench, which flushes L2 before every run; layer times are a whole forward
(input quantization, matmul, epilogue, outlier columns). Before timing, every case checks the
int32 product against an exact float64 product and the layer against the fp16 layer.

    python benchmarks/bench_int8.py --out benchmarks/results/h100   # writes int8.md / int8.json
    python benchmarks/bench_int8.py --sanitize                        # small odd shapes, for compute-sanitizer
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

os.environ.setdefault("NF4KIT_POISON", "0")  # timing: no poison fill of the outputs

import torch  # noqa: E402

from nf4kit import reference as R  # noqa: E402
from nf4kit.nn.linear8bit import Int8Params, Linear8bitLt, quantize_weight  # noqa: E402

ops = torch.ops.nf4kit
SHAPES = [(4096, 4096), (8192, 28672)]  # (in_features K, out_features N)
BATCHES = [1, 16, 256, 4096]
THRESHOLDS = [0.0, 6.0]


def bench(fn) -> float:
    """Median milliseconds, L2 flushed before every run (triton.testing.do_bench)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def load_bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as BF
        BF.int8_vectorwise_quant(torch.randn(4, 64, device="cuda", dtype=torch.float16))
        return bnb
    except Exception as exc:  # noqa: BLE001
        print(f"bitsandbytes CUDA not usable: {exc!r}")
        return None


def our_layer(CB, SCB, K, N, threshold):
    layer = Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=threshold, device="meta")
    layer.weight = Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
    return layer.eval()


def bnb_layer(bnb, CB, SCB, K, N, threshold):
    layer = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=threshold, device="meta")
    layer.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
    return layer.eval()


def exact_product(CA, CB):
    return (CA.double() @ CB.double().t()).to(torch.int64).to(torch.int32)


def run(out_dir: str | None) -> None:
    torch.manual_seed(0)
    bnb = load_bnb()
    rows, checks = [], []
    with torch.inference_mode():
        for K, N in SHAPES:
            W = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
            CB, SCB = quantize_weight(W)
            layers = {t: our_layer(CB, SCB, K, N, t) for t in THRESHOLDS}
            blayers = {t: bnb_layer(bnb, CB.clone(), SCB.clone(), K, N, t) for t in THRESHOLDS} if bnb else {}
            for M in BATCHES:
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                CA, SCA, _ = ops.int8_vectorwise_quant(x, 0.0)
                # correctness first, on these very operands
                prod = ops.int8_linear_matmul(CA, CB)
                exact = torch.equal(prod, exact_product(CA, CB))
                ref16 = torch.nn.functional.linear(x, W).float()
                out = layers[0.0](x).float()
                rel = float((out - ref16).norm() / ref16.norm())
                check = {"K": K, "N": N, "M": M, "int32_exact": exact, "rel_err_vs_fp16": rel}
                if bnb:
                    check["max_abs_diff_vs_bnb"] = float((out - blayers[0.0](x).float()).abs().max())
                checks.append(check)
                print(f"check K={K} N={N} M={M}: int32 exact={exact} rel_err_vs_fp16={rel:.2e}"
                      + (f" max|ours-bnb|={check['max_abs_diff_vs_bnb']:.3g}" if bnb else ""), flush=True)

                row = {"K": K, "N": N, "M": M}
                row["fp16_cublas_ms"] = bench(lambda: torch.nn.functional.linear(x, W))
                for t in THRESHOLDS:
                    row[f"nf4kit_t{t:g}_ms"] = bench(lambda t=t: layers[t](x))
                    if bnb:
                        row[f"bnb_t{t:g}_ms"] = bench(lambda t=t: blayers[t](x))
                row["nf4kit_int8_scaled_mm_ms"] = bench(lambda: ops.int8_scaled_mm(CA, CB, SCA, SCB, torch.float16, None))
                row["nf4kit_int8_matmul_ms"] = bench(lambda: ops.int8_linear_matmul(CA, CB))
                try:
                    row["torch_int_mm_ms"] = bench(lambda: torch._int_mm(CA, CB.t()))
                except RuntimeError:
                    row["torch_int_mm_ms"] = None  # cuBLASLt's int8 path needs M > 16
                if bnb:
                    row["bnb_int8_matmul_ms"] = bench(lambda: torch.ops.bitsandbytes.int8_linear_matmul(CA, CB))
                row["int8_tops"] = 2.0 * M * N * K / (row["nf4kit_int8_matmul_ms"] * 1e-3) / 1e12
                rows.append(row)
                print(json.dumps(row), flush=True)
            del W, CB, SCB, layers, blayers
            torch.cuda.empty_cache()
    report(rows, checks, bnb, out_dir)


def report(rows, checks, bnb, out_dir) -> None:
    meta = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "bitsandbytes": getattr(bnb, "__version__", None) if bnb else None,
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "method": "triton.testing.do_bench median, L2 flushed before every run; fp16 inputs, no bias",
    }
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"# LLM.int8 on {meta['gpu']}", "",
             f"torch {meta['torch']}, bitsandbytes {meta['bitsandbytes']}, nf4kit {meta['commit']}, {meta['date']}. "
             + meta["method"] + ". Times in ms; tX = outlier threshold X.", "",
             "| in x out | batch | fp16 cuBLAS | nf4kit t0 | bnb t0 | nf4kit t6 | bnb t6 | nf4kit int8 mm | "
             "torch._int_mm | bnb int8 mm | nf4kit TOPS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['K']} x {r['N']} | {r['M']} | {fmt(r['fp16_cublas_ms'])} | {fmt(r['nf4kit_t0_ms'])} | "
            f"{fmt(r.get('bnb_t0_ms'))} | {fmt(r['nf4kit_t6_ms'])} | {fmt(r.get('bnb_t6_ms'))} | "
            f"{fmt(r['nf4kit_int8_matmul_ms'])} | {fmt(r['torch_int_mm_ms'])} | {fmt(r.get('bnb_int8_matmul_ms'))} | "
            f"{r['int8_tops']:.0f} |")
    lines += ["", "Checks (before timing): int32 product vs an exact float64 product, layer output vs the fp16 layer.", "",
              "| in x out | batch | int32 exact | rel. error vs fp16 | max abs diff vs bnb |", "|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['K']} x {c['N']} | {c['M']} | {c['int32_exact']} | {c['rel_err_vs_fp16']:.2e} | "
                     f"{c.get('max_abs_diff_vs_bnb', '-')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "int8.md"), "w") as f:
            f.write(text)
        with open(os.path.join(out_dir, "int8.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows, "checks": checks}, f, indent=1)


def sanitize() -> int:
    """Every kernel path once on small odd shapes (vector / scalar quantize loads, thresholds, the
    small and large tiles, split-K, K padding, every output dtype, bias), checked against the
    reference. Meant to run under compute-sanitizer."""
    os.environ["NF4KIT_POISON"] = "1"
    bad = 0
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for shape in [(3, 40), (5, 37), (1, 1)]:
            A = (torch.randn(shape, generator=g) * 3).to(dtype)
            for t in (0.0, 2.0):
                q, rs, cols = ops.int8_vectorwise_quant(A.cuda(), t)
                rq, rrs, rcols = R.int8_vectorwise_quant(A, t)
                bad += not (torch.equal(q.cpu(), rq) and torch.equal(rs.cpu(), rrs) and torch.equal(cols.cpu(), rcols))
    for M, N, K in [(1, 256, 1024), (5, 70, 33), (16, 64, 16), (40, 256, 2048), (300, 200, 64), (129, 7, 200)]:
        A = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
        B = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
        prod = R.int8_linear_matmul(A, B)
        bad += not torch.equal(ops.int8_linear_matmul(A.cuda(), B.cuda()).cpu(), prod)
        rs, cs = torch.rand(M) + 0.1, torch.rand(N) + 0.1
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            bias = torch.randn(N).half()
            ref = R.int8_mm_dequant(prod, rs, cs, dtype, bias)
            out = ops.int8_scaled_mm(A.cuda(), B.cuda(), rs.cuda(), cs.cuda(), dtype, bias.cuda())
            out2 = ops.int8_mm_dequant(prod.cuda(), rs.cuda(), cs.cuda(), dtype, bias.cuda())
            bad += not (torch.equal(out.cpu(), ref) and torch.equal(out2.cpu(), ref))
    torch.cuda.synchronize()
    print(f"sanitize run: {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--sanitize", action="store_true")
    args = p.parse_args()
    if args.sanitize:
        sys.exit(sanitize())
    run(args.out)
