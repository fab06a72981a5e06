"""Probe (device): does dequantize + cuBLAS at large batch gain from overlapping the dequantize of
one slice of W's rows with the GEMM of the previous slice? 8192x28672 (LAYER), NF4 bs64 nested,
batch MS (1024,4096), ROUNDS interleaved rounds, medians (L2 flushed), ms.

  cublas      F.linear on the fp16 weight (the ratio's denominator)
  seq         dequantize all of W, then one GEMM (what the dispatch runs at 4096)
  cC / cCp    W in C slices of rows: slice 0 dequantized first; then the GEMM of slice i on the
              current stream while slice i + 1 is dequantized on a side stream (p: the side stream
              at high priority, so its blocks take SM slots as the GEMM's retire), each GEMM
              writing its columns of one output (ldc = N)
  deq_only    the dequantize alone
Only torch ops: nf4kit.dequantize_4bit on slices of the packed weight and its nested absmax (a
slice starts on a nested block, 256 quantization blocks) and at::mm."""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_matmul import bench, env_int, env_ints, env_layer, quantize  # noqa: E402

import nf4kit.functional as F  # noqa: E402
import torch.nn.functional as TF  # noqa: E402


def sliced(Bq, qs, chunks):
    """Per slice of rows: (row0, row1, a function returning the slice's dequantized rows)."""
    N, K = qs.shape
    absmax, nabs, ncode, off, bs, nbs, qt = qs._decode_args()
    per_row = K // bs
    assert K % bs == 0
    step = -(-N // chunks)
    unit = nbs // per_row if per_row < nbs else 1  # rows per nested block
    step = -(-step // unit) * unit
    packed = Bq.reshape(-1)
    out = []
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        b0, b1 = r0 * per_row, r1 * per_row
        assert b0 % nbs == 0

        def f(r0=r0, r1=r1, b0=b0, b1=b1):
            return torch.ops.nf4kit.dequantize_4bit(
                packed[r0 * K // 2: r1 * K // 2], absmax[b0:b1], nabs[b0 // nbs: -(-b1 // nbs)], ncode, off,
                bs, nbs, qt, [r1 - r0, K], qs.dtype)
        out.append((r0, r1, f))
    return out


def overlapped(A, pieces, side, out):
    main = torch.cuda.current_stream()
    ready = []
    ws = [None] * len(pieces)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        ws[0] = pieces[0][2]()
        e = torch.cuda.Event(); e.record(side); ready.append(e)
    for i, (r0, r1, _) in enumerate(pieces):
        if i + 1 < len(pieces):
            with torch.cuda.stream(side):
                ws[i + 1] = pieces[i + 1][2]()
                e = torch.cuda.Event(); e.record(side); ready.append(e)
        main.wait_event(ready[i])
        torch.mm(A, ws[i].t(), out=out[:, r0:r1])
        ws[i].record_stream(main)
    return out


def main():
    K, N = env_layer("8192x28672")
    Ms = env_ints("MS", "1024,4096")
    Cs = env_ints("CHUNKS", "2,4,8")
    rounds = env_int("ROUNDS", 5)
    dtype = torch.float16
    g = torch.Generator(device="cuda").manual_seed(K + N)
    W = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) * 0.02
    Bq, qs = quantize(W)
    Wd = F.dequantize_4bit(Bq, qs)
    side_lo = torch.cuda.Stream()
    side_hi = torch.cuda.Stream(priority=-1)
    print(f"# overlap_dequant {K}x{N} fp16 on {torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"medians of {rounds} interleaved rounds, ms", flush=True)
    for M in Ms:
        A = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
        out = torch.empty(M, N, device="cuda", dtype=dtype)
        ref = A @ Wd.t()
        fns = {"cublas": lambda: TF.linear(A, W), "seq": lambda: TF.linear(A, F.dequantize_4bit(Bq, qs)),
               "deq_only": lambda: F.dequantize_4bit(Bq, qs)}
        for C in Cs:
            pieces = sliced(Bq, qs, C)
            for tag, s in (("", side_lo), ("p", side_hi)):
                fn = (lambda pieces=pieces, s=s: overlapped(A, pieces, s, out))
                out.fill_(float("nan"))
                fn(); torch.cuda.synchronize()
                err = (out.float() - ref.float()).abs().max().item()
                assert err < 0.05, f"c{C}{tag} differs from A @ W^T by {err}"
                fns[f"c{C}{tag}"] = fn
        times = {n: [] for n in fns}
        names = list(fns)
        for r in range(rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                times[n].append(bench(fns[n], 30))
        med = {n: statistics.median(v) for n, v in times.items()}
        print(f"M={M} " + " ".join(f"{n} {v:.4f} ({med['cublas'] / v:.3f}x, spread "
                                   f"{(max(times[n]) - min(times[n])) / v:.0%})" for n, v in med.items()), flush=True)


if __name__ == "__main__":
    main()
