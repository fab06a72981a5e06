"""4-bit matmul speed on the GPU: fp16/bf16 cuBLAS (F.linear with the dense weight) vs nf4kit's
matmul_4bit vs bitsandbytes' matmul_4bit, NF4, blocksize 64, nested absmax (compress_statistics).

Layers (in_features x out_features): 4096x4096, 4096x14336, 14336x4096, 8192x28672; batches 1..4096;
fp16 and bf16. Each time is the median of triton's do_bench, which zeroes a 256 MB buffer (flushing
L2) before every run; cuBLAS, nf4kit and bitsandbytes are timed in 3 interleaved rounds (--rounds;
at least 7 for the compute-bound rows, 2 M N K > 2e11, where the card's clocks move cuBLAS by 5-10%
between runs) and each reports the median over them. Bytes are the fewest a call must move (packed weight + absmax + activations +
output); FLOPs are 2 M N K. The card's two ceilings are measured in the same run: a 1 GiB
device-to-device copy (bytes read + written) and an 8192^3 fp16 matmul.

    python benchmarks/bench_matmul.py                 # all layers -> benchmarks/results/<gpu>/matmul.{md,json,png}
    python benchmarks/bench_matmul.py --tune          # skinny kernel and path crossovers (8192x28672)
    python benchmarks/bench_matmul.py --sanitize      # every kernel once at odd shapes (for compute-sanitizer;
                                                      #   SANITIZE_ONLY=PREW,wgdp: the cases whose path names these)
    python benchmarks/bench_matmul.py --plot results/h100/matmul.json   # PNG from a saved JSON (no GPU)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from contextlib import contextmanager

os.environ.setdefault("NF4KIT_POISON", "0")  # timing: outputs not pre-filled

LAYERS = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672))  # (K = in, N = out)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root (nf4kit built in place)


@contextmanager
def env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: str(v) for k, v in kv.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def path_env(spec: str) -> dict:
    """The development variables of a path spec "PATH[:VAR=VALUE...]" (PATH an NF4KIT_GEMM_PATH
    value, or "auto" for the dispatch's own choice), for env(): the probes' way to name candidates."""
    path, *extra = spec.split(":")
    return dict(NF4KIT_GEMM_PATH="" if path == "auto" else path, **dict(v.split("=", 1) for v in extra))


def env_list(name: str, default: str) -> list:
    """A probe's comma-separated setting from the environment (PATHS, LAYERS), empty items dropped."""
    return [v for v in os.environ.get(name, default).split(",") if v]


def env_ints(name: str, default: str) -> list:
    """The same as integers (MS, CHUNKS, BNS)."""
    return [int(v) for v in env_list(name, default)]


def env_int(name: str, default: int) -> int:
    """One integer setting (ROUNDS)."""
    return int(os.environ.get(name, str(default)))


def env_layer(default: str) -> tuple:
    """LAYER, "KxN" (in x out), as (K, N)."""
    K, N = (int(v) for v in os.environ.get("LAYER", default).split("x"))
    return K, N


def gpu_tag(name: str) -> str:
    low = name.lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4", "b200"):
        if tag in low:
            return tag
    return "".join(ch if ch.isalnum() else "_" for ch in low)


def bench(fn, rep: int = 100) -> float:
    """Median milliseconds, L2 flushed before every run."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=max(10, rep // 4), rep=rep, return_mode="median"))


BIG_ROUNDS = 7  # interleaved rounds at least, for the compute-bound rows (their ratios drift most)


def interleaved(fns: dict, rep: int, rounds: int = 3) -> dict:
    """Median over rounds of each function's bench(), the order rotated every round: the card's
    clocks drift with power and heat (up to ~10% between back-to-back timings of one call on the
    H200), and timing the candidates one after another inside each round keeps that drift out of
    their ratios."""
    names = [n for n, f in fns.items() if f is not None]
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n].append(bench(fns[n], rep))
    return {n: (float(statistics.median(times[n])) if n in times else None) for n in fns}


def weight_bytes_nf4(N: int, K: int, blocksize: int = 64) -> int:
    nblocks = -(-N * K // blocksize)
    return (N * K + 1) // 2 + nblocks + 4 * (-(-nblocks // 256)) + 4 * 256


def quantize(W, blocksize: int = 64):
    """NF4, nested, blocksize 64 (the benchmark's; the probes may ask for others); on the GPU when
    nf4kit's quantize kernels are built, else on the CPU."""
    import nf4kit.functional as F
    try:
        return F.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    except (RuntimeError, NotImplementedError):
        Bq, qs = F.quantize_4bit(W.cpu(), blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        return Bq.to(W.device), qs.to(W.device)


def dequantize(Bq, qs):
    import nf4kit.functional as F
    try:
        return F.dequantize_4bit(Bq, qs)
    except (RuntimeError, NotImplementedError):
        return F.dequantize_4bit(Bq.cpu(), F.QuantState.from_dict(qs.as_dict(), "cpu")).to(Bq.device)


def load_bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as BF
        probe = torch.randn(64, 64, device="cuda", dtype=torch.float16)
        q, s = BF.quantize_4bit(probe, blocksize=64, quant_type="nf4", compress_statistics=True)
        bnb.matmul_4bit(probe[:1], q.t(), s)
        return bnb, BF
    except Exception as exc:  # noqa: BLE001
        print(f"bitsandbytes CUDA not usable: {exc!r}")
        return None, None


def ceilings() -> dict:
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), rep=200)
    copy_gbs = 2 * x.numel() * 4 / t / 1e6
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    t = bench(lambda: a @ b, rep=200)
    tflops = 2 * 8192 ** 3 / t / 1e9
    return {"copy_GBps": copy_gbs, "fp16_gemm_TFLOPs": tflops}


def run(layers, batches, dtypes, out_dir, with_bnb=True, rounds=3):
    import torch.nn.functional as TF

    import nf4kit.functional as F
    caps = ceilings()
    big_rounds = max(rounds, BIG_ROUNDS)
    print(f"{torch.cuda.get_device_name()}: copy {caps['copy_GBps']:.0f} GB/s, fp16 GEMM {caps['fp16_gemm_TFLOPs']:.0f} TFLOP/s")
    bnb, BF = load_bnb() if with_bnb else (None, None)
    rows = []
    for dtype in dtypes:
        for K, N in layers:
            g = torch.Generator(device="cuda").manual_seed(K + N)
            W = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) * 0.02
            Bq, qs = quantize(W)
            Wdq = dequantize(Bq, qs)
            if bnb is not None:
                Bb, qsb = BF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
            for M in batches:
                A = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
                big = 2 * M * N * K > 2e11
                rep = 30 if big else 60
                with torch.inference_mode():
                    ours = F.matmul_4bit(A, Bq.t(), qs)
                    ref = TF.linear(A.float(), Wdq.float())
                    err = float((ours.float() - ref).norm() / ref.norm())
                    base_err = float((TF.linear(A, Wdq).float() - ref).norm() / ref.norm())
                    t = interleaved({"cublas": lambda: TF.linear(A, W), "ours": lambda: F.matmul_4bit(A, Bq.t(), qs),
                                     "bnb": (lambda: bnb.matmul_4bit(A, Bb.t(), qsb)) if bnb is not None else None},
                                    rep // 2, big_rounds if big else rounds)
                    t_cublas, t_ours, t_bnb = t["cublas"], t["ours"], t["bnb"]
                flops = 2 * M * N * K
                act = 2 * (M * K + M * N)
                bytes_ours = weight_bytes_nf4(N, K) + act
                bytes_dense = 2 * N * K + act
                floor_ours = max(bytes_ours / caps["copy_GBps"] / 1e6, flops / caps["fp16_gemm_TFLOPs"] / 1e9)
                row = dict(dtype=str(dtype).replace("torch.", ""), K=K, N=N, M=M, ms_cublas=t_cublas, ms_nf4kit=t_ours,
                           ms_bnb=t_bnb, speedup=t_cublas / t_ours, speedup_bnb=(t_cublas / t_bnb) if t_bnb else None,
                           GBps=bytes_ours / t_ours / 1e6, TFLOPs=flops / t_ours / 1e9,
                           floor_ms=floor_ours, of_floor=floor_ours / t_ours,
                           cublas_GBps=bytes_dense / t_cublas / 1e6, err=err, base_err=base_err)
                rows.append(row)
                bnb_s = f"{row['speedup_bnb']:.2f}x" if t_bnb else "-"
                print(f"{row['dtype']:8s} {K:5d}x{N:<5d} M={M:<4d} cublas {t_cublas:8.4f} ms  nf4kit {t_ours:8.4f} ms "
                      f"{row['speedup']:5.2f}x  bnb {bnb_s:>6s}  {row['GBps']:6.0f} GB/s {row['TFLOPs']:6.1f} TF/s "
                      f"floor {100 * row['of_floor']:3.0f}%  err {err:.1e} (base {base_err:.1e})", flush=True)
                del A
            del W, Bq, qs, Wdq
            if bnb is not None:
                del Bb, qsb
            torch.cuda.empty_cache()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                bnb=getattr(bnb, "__version__", None), rounds=rounds, big_rounds=big_rounds, **caps)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "matmul.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(out_dir, "matmul.md"), "w") as f:
            f.write(markdown(meta, rows))
        try:
            plot(os.path.join(out_dir, "matmul.json"))
        except ImportError:
            print("matplotlib missing: make the PNG later with --plot")
    return meta, rows


def markdown(meta, rows) -> str:
    lines = [f"# 4-bit matmul: nf4kit vs cuBLAS fp16/bf16 vs bitsandbytes {meta.get('bnb') or '(not run)'}", "",
             f"{meta['gpu']}, torch {meta['torch']} (CUDA {meta['cuda']}), {meta['date']}. "
             f"Measured ceilings: copy {meta['copy_GBps']:.0f} GB/s (read + write), fp16 GEMM "
             f"{meta['fp16_gemm_TFLOPs']:.0f} TFLOP/s (8192^3).", "",
             "NF4, blocksize 64, nested absmax (4.13 bits per weight). Times: median ms, L2 flushed; cuBLAS, "
             f"nf4kit and bitsandbytes interleaved, {meta.get('rounds', 1)} rounds"
             + (f" ({meta['big_rounds']} where 2 M N K > 2e11)" if meta.get("big_rounds") not in (None, meta.get("rounds")) else "")
             + ", median over them. "
             "speed-up = cuBLAS time / nf4kit time (bnb: cuBLAS time / bitsandbytes time). "
             "floor = max(bytes / copy rate, FLOPs / fp16 GEMM rate) for nf4kit's bytes (packed weight + "
             "absmax + activations + output); '% floor' = floor / measured time.", ""]
    for dtype in sorted({r["dtype"] for r in rows}):
        lines += [f"## {dtype}", "",
                  "| layer (in x out) | batch | cuBLAS ms | nf4kit ms | speed-up | bnb speed-up | nf4kit GB/s | "
                  "nf4kit TFLOP/s | % floor | rel. err (cuBLAS on dequant W) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["dtype"] != dtype:
                continue
            bnb = f"{r['speedup_bnb']:.2f}x" if r["speedup_bnb"] else "-"
            lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['ms_cublas']:.4f} | {r['ms_nf4kit']:.4f} | "
                         f"**{r['speedup']:.2f}x** | {bnb} | {r['GBps']:.0f} | {r['TFLOPs']:.1f} | "
                         f"{100 * r['of_floor']:.0f}% | {r['err']:.1e} ({r['base_err']:.1e}) |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(json_path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(json_path) as f:
        data = json.load(f)
    meta, rows = data["meta"], data["rows"]
    dtypes = sorted({r["dtype"] for r in rows})
    layers = sorted({(r["K"], r["N"]) for r in rows}, key=lambda kn: kn[0] * kn[1])
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for i, (K, N) in enumerate(layers):
            rs = sorted((r for r in rows if r["dtype"] == dtype and r["K"] == K and r["N"] == N), key=lambda r: r["M"])
            color = f"C{i}"
            ax.plot([r["M"] for r in rs], [r["speedup"] for r in rs], "o-", color=color, label=f"nf4kit {K}x{N}")
            if any(r["speedup_bnb"] for r in rs):
                ax.plot([r["M"] for r in rs if r["speedup_bnb"]], [r["speedup_bnb"] for r in rs if r["speedup_bnb"]],
                        "x--", color=color, alpha=0.6, label=f"bnb {K}x{N}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (rows of A)")
        ax.set_ylabel(f"speed-up over cuBLAS {dtype}")
        ax.set_title(f"{meta['gpu']} - {dtype}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(os.path.dirname(json_path), "matmul.png"), dpi=110)


def tune(K=8192, N=28672, dtype_name="float16", sweep_paths=True):
    """The skinny kernel at small batches and the time of every path, to set the dispatch thresholds."""
    import nf4kit.functional as F
    dtype = getattr(torch, dtype_name)
    W = torch.randn(N, K, device="cuda", dtype=dtype) * 0.02
    Bq, qs = quantize(W)
    import torch.nn.functional as TF
    print(f"tune {K}x{N} {dtype_name}")
    for M in (1, 8, 16, 32):
        A = torch.randn(M, K, device="cuda", dtype=dtype)
        t_c = bench(lambda: TF.linear(A, W))
        res = []
        with env(NF4KIT_GEMM_PATH="skinny"):
            res.append(("skinny", bench(lambda: F.matmul_4bit(A, Bq.t(), qs))))
        print(f"  M={M:3d} cublas {t_c:.4f} | " + " ".join(f"{c}:{t:.4f}({t_c / t:.2f}x)" for c, t in res), flush=True)
    for M in ((16, 32, 48, 64, 96, 128, 256, 512, 1024, 4096) if sweep_paths else ()):
        A = torch.randn(M, K, device="cuda", dtype=dtype)
        rep = 40 if M >= 1024 else 100
        t_c = bench(lambda: TF.linear(A, W), rep)
        res = []
        for path in ("skinny", "tc", "wg", "wgsk", "dequant"):
            if path in ("skinny", "tc") and M > 256:
                continue
            with env(NF4KIT_GEMM_PATH=path):
                res.append((path, bench(lambda: F.matmul_4bit(A, Bq.t(), qs), rep)))
        print(f"  M={M:4d} cublas {t_c:.4f} | " + " ".join(f"{p}:{t:.4f}({t_c / t:.2f}x)" for p, t in res), flush=True)


def profile(path: str, M: int, K=8192, N=28672, reps=3):
    """A few calls of one kernel (the big layer unless given), for ncu (--launch-skip / --launch-count)."""
    dtype = torch.float16
    W = torch.randn(N, K, device="cuda", dtype=dtype) * 0.02
    Bq, qs = quantize(W)
    import nf4kit.functional as F
    A = torch.randn(M, K, device="cuda", dtype=dtype)
    with env(NF4KIT_GEMM_PATH=path):
        for _ in range(reps):
            F.matmul_4bit(A, Bq.t(), qs)
    torch.cuda.synchronize()


def sanitize():
    """Each kernel once at odd shapes, small enough for compute-sanitizer; checks the results too."""
    import nf4kit.functional as F
    torch.manual_seed(0)
    worst = 0.0
    # (path spec, M, N, K): an NF4KIT_GEMM_PATH value and development variables, as path_env reads them
    skinny_rows32, thread = "skinny:NF4KIT_SKINNY_ROWS=32", "NF4KIT_WG_PRODUCER=thread"
    cases = [("skinny", 1, 33, 96), ("skinny", 5, 70, 4128), ("skinny", 17, 31, 160), ("skinny", 32, 129, 64),
             ("skinny", 12, 95, 256), ("skinny", 45, 64, 192), ("skinny", 64, 130, 4128), ("skinny", 57, 33, 1056),  # 33..64: the wide pass
             ("skinny:NF4KIT_SKINNY_WIDE=0", 45, 64, 192),  # ... and in slices of 32
             (skinny_rows32, 1, 33, 96), (skinny_rows32, 5, 70, 4128), (skinny_rows32, 12, 95, 1024),
             (skinny_rows32, 16, 64, 1024),  # blocks of 32 rows forced (small N takes 16 rows), partial and whole stages
             (skinny_rows32, 1, 64, 512), (skinny_rows32, 3, 64, 1536), (skinny_rows32, 9, 64, 2560),  # 1, 3, 5 stages (V2's prologue)
             ("skinny", 1, 48, 2048), ("skinny", 40, 64, 2048),  # whole stages and row tiles (fp16 rows): evict_first copies
             ("tc", 33, 129, 224), ("tc", 130, 72, 320), ("tc", 7, 300, 96),
             ("wg", 33, 129, 224), ("wg", 130, 72, 320), ("wg", 7, 300, 96), ("wg", 100, 200, 320), ("wg", 300, 140, 128),
             ("wg", 65, 300, 512),  # K % 256 == 0: the packed scale loads (fp16 nf4 bs64 rows)
             ("wgsk", 33, 129, 512), ("wgsk", 100, 300, 512), ("wgsk", 130, 300, 1024), ("wgsk", 7, 64, 256),
             ("wg", 24, 300, 512), ("wg:NF4KIT_WG_BN=32", 45, 129, 512), ("wgsk:NF4KIT_WG_BN=32", 33, 300, 512),  # batch tile 32
             ("wg:NF4KIT_WG_BN=64", 7, 300, 96),  # batch tile 64 below 33 rows
             ("wg:" + thread, 24, 300, 512), ("wg", 48, 300, 512), ("wg:" + thread, 48, 300, 512),  # 32, 64: producer warp / thread 0
             ("wg", 24, 17100, 256), ("wg", 48, 17100, 256),  # ... past one block an SM (not SOLO; HALVES)
             ("wgsk", 40, 300, 1024), ("wgsk:" + thread, 40, 300, 1024),
             ("wgdp:NF4KIT_WG_GRID=3", 70, 2500, 512), ("wgdp:NF4KIT_WG_GRID=5", 300, 1100, 1024),  # DP + SK on 3 / 5 blocks
             ("wg:" + thread, 100, 300, 512), ("wgsk:" + thread, 128, 300, 1024),  # batch tile 128: thread 0 producing
             ("wgdp:NF4KIT_WG_GRID=3", 100, 1200, 512),  # DP + SK at batch tile 128 with the producer warp
             # batch tile 256: the producer warpgroup, and thread 0
             ("wg", 200, 300, 512), ("wgdp:NF4KIT_WG_GRID=3", 260, 900, 512), ("wg:" + thread, 200, 300, 512),
             ("wg:NF4KIT_WG_PREW=1", 100, 300, 512), ("wgsk:NF4KIT_WG_PREW=1", 100, 300, 512),  # PREW
             ("generic", 3, 17, 33), ("generic", 9, 5, 127), ("dequant", 40, 33, 99)]
    unset = dict.fromkeys(("NF4KIT_WG_GRID", "NF4KIT_WG_PRODUCER", "NF4KIT_WG_BN", "NF4KIT_SKINNY_ROWS",
                           "NF4KIT_SKINNY_WIDE", "NF4KIT_WG_PREW"), "")
    only = env_list("SANITIZE_ONLY", "")  # e.g. PREW,wgdp: those cases alone
    for spec, M, N, K in cases:
        if only and not any(w in spec for w in only):
            continue
        variables = {**unset, **path_env(spec)}
        for dtype, nested, qt, bs in ((torch.float16, True, "nf4", 64), (torch.bfloat16, False, "fp4", 32)):
            W = torch.randn(N, K, dtype=dtype)
            Bq, qs = F.quantize_4bit(W, blocksize=bs, quant_type=qt, compress_statistics=nested)
            Bq, qs = Bq.cuda(), qs.to("cuda")
            A = torch.randn(M, K, device="cuda", dtype=dtype)
            # the fp16 case goes through matmul_4bit (bias in A's dtype), the bf16 one calls the op with
            # a float32 bias, which the CUDA epilogues read as it comes (GemmParams.bias_t)
            bias = torch.randn(N, device="cuda", dtype=dtype if nested else torch.float32)
            with env(**variables):
                if nested:
                    out = F.matmul_4bit(A, Bq.t(), qs, bias=bias)
                else:
                    out = torch.ops.nf4kit.gemm_4bit(A, Bq, *qs._decode_args(), N, bias)
            torch.cuda.synchronize()
            Wd = dequantize(Bq, qs).double()
            ref = A.double() @ Wd.t() + bias.double()
            err = float((out.double() - ref).norm() / ref.norm())
            worst = max(worst, err)
            print(f"{spec:8s} M={M} N={N} K={K} {dtype} {qt} bs={bs} nested={nested}: rel err {err:.2e}")
    print(f"sanitize run done, worst rel err {worst:.2e}")
    assert worst < 2e-2, worst


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu>)")
    ap.add_argument("--layers", default=None, help="e.g. 8192x28672,4096x4096 (in x out)")
    ap.add_argument("--batches", default=None)
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per row")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("--plot", default=None, help="make the PNG from a saved matmul.json and exit")
    ap.add_argument("--profile", default=None, help="PATH,M[,KxN]: a few calls of one kernel (for ncu; 8192x28672)")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot)
        sys.exit(0)
    import torch
    if args.profile:
        path, m, *layer = args.profile.split(",")
        k, n = (int(v) for v in (layer[0] if layer else "8192x28672").split("x"))
        profile(path, int(m), k, n)
    elif args.sanitize:
        sanitize()
    elif args.tune:
        with torch.inference_mode():  # no autograd bookkeeping in the timed calls
            tune(sweep_paths=os.environ.get("TUNE_PATHS", "1") == "1")
            tune(4096, 4096, sweep_paths=False)
    else:
        layers = LAYERS if not args.layers else tuple(tuple(int(v) for v in s.split("x")) for s in args.layers.split(","))
        batches = BATCHES if not args.batches else tuple(int(b) for b in args.batches.split(","))
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
        out = args.out or os.path.join(HERE, "results", gpu_tag(torch.cuda.get_device_name()))
        run(layers, batches, dtypes, out, with_bnb=not args.no_bnb, rounds=args.rounds)
