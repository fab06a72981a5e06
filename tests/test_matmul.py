"""gemm_4bit / matmul_4bit / gemv_4bit against the reference on every device.

The reference is W dequantized in float32 and the product in float64. A kernel passes when its
relative error (Frobenius norm) is at most twice that of A's-dtype torch.matmul on the weight
dequantized to A's dtype (measured here, on the same device and inputs), with a floor of one
ulp of A's dtype for tiny products whose baseline error happens to be 0. Outputs start poisoned
(NF4KIT_POISON=1), so unwritten elements fail as NaN. On CUDA every kernel (skinny, tensor-core,
generic, dequantize + cuBLAS) is forced on odd shapes through NF4KIT_GEMM_PATH.
"""
from __future__ import annotations

import gc
import os
import weakref
from contextlib import contextmanager, nullcontext

import pytest
import torch

import nf4kit.functional as F
from nf4kit import reference as R

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUANT_TYPES = ("nf4", "fp4")
# (blocksize, nested, quant_type) the CUDA kernel tests cycle through: the smallest blocksize, the
# largest and two between, nested and plain, NF4 and FP4
MODES = ((64, True, "nf4"), (32, False, "fp4"), (4096, True, "fp4"), (128, False, "nf4"))
CUDA = torch.cuda.is_available()
ops = torch.ops.nf4kit


@contextmanager
def gemm_path(path):
    """Force one CUDA kernel (csrc/cuda/gemm_4bit.cu reads NF4KIT_GEMM_PATH on every call)."""
    old = os.environ.get("NF4KIT_GEMM_PATH")
    os.environ["NF4KIT_GEMM_PATH"] = path or ""
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("NF4KIT_GEMM_PATH", None)
        else:
            os.environ["NF4KIT_GEMM_PATH"] = old


def quantized(N, K, blocksize, quant_type, nested, device, dtype=torch.float16, seed=0):
    """A random weight quantized on the CPU (the quantize kernels have their own tests) and moved."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(N, K, generator=g) * 0.5).to(dtype)
    B, qs = F.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return B.to(device), qs.to(device)


def dequant_f32(B, qs) -> torch.Tensor:
    """The weight as the reference sees it: float32, on the CPU."""
    absmax, na, nc, off, bs, nbs, qt = qs._decode_args()
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    return R.dequantize_4bit(B.reshape(-1).cpu(), cpu(absmax), cpu(na), cpu(nc), cpu(off), bs, nbs, qt,
                             tuple(qs.shape), torch.float32)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def check_against_reference(A, B, qs, bias=None, what=""):
    """Runs matmul_4bit and compares with the float64 reference and the dtype baseline."""
    out = F.matmul_4bit(A, B.t(), qs, bias=bias)
    N = qs.shape[0]
    assert out.shape == (*A.shape[:-1], N), what
    assert out.dtype == A.dtype and out.device == A.device, what
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite (unwritten?) outputs"
    W32 = dequant_f32(B, qs)
    ref = A.double().cpu() @ W32.double().t()
    if bias is not None:
        ref = ref + bias.double().cpu()
    Wd = W32.to(A.dtype).to(A.device)
    base = A @ Wd.t()
    if bias is not None:
        base = base + bias
    err, base_err = rel_err(out, ref), rel_err(base, ref)
    # floor: one ulp of A's dtype (4 for float32, where both errors are rounding noise of ~1e-7)
    tol = max(2 * base_err, torch.finfo(A.dtype).eps * (4 if A.dtype == torch.float32 else 1))
    assert err <= tol, f"{what}: error {err:.3e} > {tol:.3e} (baseline {base_err:.3e})"
    return out


def activations(shape, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def check_repeatable(path, cases, dtype, seed, what, device="cuda"):
    """Each case (M, N, K, blocksize, nested, quant_type) through the forced path: within the
    reference bound, and a second run equal bit for bit (the split paths add partial sums in a fixed
    order). Inputs from seeds seed + i, seed + 10 + i, seed + 20 + i; a bias on every other case."""
    for i, (M, N, K, bs, nested, qt) in enumerate(cases):
        B, qs = quantized(N, K, bs, qt, nested, device, dtype, seed=seed + i)
        A = activations((M, K), dtype, device, seed=seed + 10 + i)
        bias = activations((N,), dtype, device, seed=seed + 20 + i) if i % 2 == 0 else None
        with gemm_path(path):
            ref = check_against_reference(A, B, qs, bias, f"{what} {dtype} M={M} N={N} K={K}")
            again = F.matmul_4bit(A, B.t(), qs, bias=bias)
        torch.testing.assert_close(again, ref, rtol=0, atol=0)


def check_switch_identical(monkeypatch, path, cases, dtype, seed, var, value, other, what, device="cuda", bias=False):
    """Each case, (M, N, K, nested) with NF4 blocksize 64 or (M, N, K, blocksize, nested, quant_type),
    through the forced path with the development variable var set to value (None: unset), within the
    reference bound, and bit for bit the result with var set to other. Inputs from seeds seed + i and
    seed + 1 + i; with bias, a bias on every other case (seed + 50 + i)."""
    for i, case in enumerate(cases):
        M, N, K, bs, nested, qt = case if len(case) == 6 else (*case[:3], 64, case[3], "nf4")
        B, qs = quantized(N, K, bs, qt, nested, device, dtype, seed=seed + i)
        A = activations((M, K), dtype, device, seed=seed + 1 + i)
        b = activations((N,), dtype, device, seed=seed + 50 + i) if bias and i % 2 else None
        with gemm_path(path):
            if value is not None:
                monkeypatch.setenv(var, value)
            out = check_against_reference(A, B, qs, b, f"{path} {what} {dtype} M={M} N={N} K={K} bs={bs}")
            monkeypatch.setenv(var, other)
            base = F.matmul_4bit(A, B.t(), qs, bias=b)
            monkeypatch.delenv(var)
        torch.testing.assert_close(out, base, rtol=0, atol=0, msg=lambda m: f"{what} (M={M} N={N} K={K} bs={bs}): {m}")


# ---------------------------------------------------------------------------------------------
# Every dtype x quant type x blocksize x nesting, on every device
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_4bit_matches_reference(device, dtype, quant_type, blocksize, nested):
    # (batch shape, N, K): odd K (rows start mid-byte), K not a multiple of the blocksize or of
    # 128, N not a multiple of 32, one output feature, 3-D input, K that fits the fast kernels.
    cases = [((1,), 1, 1), ((3,), 17, 33), ((5,), 65, 130), ((2, 3), 40, 96), ((1,), 33, 256),
             ((9,), 70, 160), ((4,), 1, 64), ((33,), 48, 64)]
    for i, (batch, N, K) in enumerate(cases):
        B, qs = quantized(N, K, blocksize, quant_type, nested, device, dtype, seed=i)
        A = activations((*batch, K), dtype, device, seed=100 + i)
        bias = activations((N,), dtype, device, seed=200 + i) if i % 2 else None
        check_against_reference(A, B, qs, bias, f"{dtype} {quant_type} bs={blocksize} nested={nested} "
                                                f"A{tuple(A.shape)} N={N} on {device}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_sizes(device, dtype):
    """Batch 1..4096 on the GPU (every dispatch region), fewer on the CPU."""
    batches = (1, 2, 7, 8, 9, 16, 17, 31, 32, 33, 64, 100, 128, 129, 256, 1024, 1025, 4096) if device == "cuda" \
        else (1, 2, 8, 33, 130)
    N, K = 200, 1024
    B, qs = quantized(N, K, 64, "nf4", True, device, dtype, seed=3)
    for M in batches:
        A = activations((M, K), dtype, device, seed=M)
        check_against_reference(A, B, qs, None, f"{dtype} M={M} on {device}")


def test_weight_larger_than_one_slab_cpu():
    """Many rows of A on the CPU dequantize W in slabs of 16M weights: a weight of 4099 x 4097 (odd,
    not a multiple of the blocksize) takes two slabs, the second one partial."""
    B, qs = quantized(4099, 4097, 64, "nf4", True, "cpu", torch.bfloat16, seed=11)
    A = activations((33, 4097), torch.bfloat16, "cpu", seed=12)
    bias = activations((4099,), torch.bfloat16, "cpu", seed=13)
    check_against_reference(A, B, qs, bias, "bf16 M=33 N=4099 K=4097 (two slabs)")


def test_one_output_feature_bf16(device):
    """bitsandbytes 0.50.2's CPU gemv aborts on a bf16 weight with one output row; here N=1 works."""
    for K, nested, qt in ((64, False, "nf4"), (4096, True, "nf4"), (127, True, "fp4"), (32, False, "fp4")):
        B, qs = quantized(1, K, 64, qt, nested, device, torch.bfloat16, seed=K)
        for M in (1, 3, 40):
            A = activations((M, K), torch.bfloat16, device, seed=M)
            check_against_reference(A, B, qs, None, f"N=1 K={K} M={M}")
            out = F.gemv_4bit(A, B.t(), state=qs)
            assert out.shape == (M, 1)


def test_gemv_4bit_matches_reference(device):
    """bitsandbytes 0.50.2's CPU gemv_4bit returns garbage for ordinary shapes; ours is the matmul."""
    for dtype in DTYPES:
        B, qs = quantized(64, 128, 64, "nf4", False, device, dtype)
        A = activations((1, 128), dtype, device)
        out = F.gemv_4bit(A, B.t(), state=qs)
        torch.testing.assert_close(out, F.matmul_4bit(A, B.t(), qs), rtol=0, atol=0)
        check_against_reference(A, B, qs, None, f"gemv {dtype}")


def test_non_contiguous_and_out(device):
    B, qs = quantized(48, 96, 64, "nf4", True, device)
    A = activations((96, 10), torch.float16, device).t()  # [10, 96], strides (1, 10)
    assert not A.is_contiguous()
    ref = check_against_reference(A, B, qs, None, "transposed A")
    A3 = activations((4, 5, 192), torch.float16, device)[:, :, ::2]  # last dim strided
    check_against_reference(A3, B, qs, None, "strided last dim")
    out = torch.full((10, 48), float("nan"), dtype=torch.float16, device=device)
    res = F.matmul_4bit(A, B.t(), qs, out=out)
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_empty_batch(device):
    B, qs = quantized(16, 64, 64, "nf4", False, device)
    out = F.matmul_4bit(torch.empty(0, 64, dtype=torch.float16, device=device), B.t(), qs)
    assert out.shape == (0, 16)


# ---------------------------------------------------------------------------------------------
# Every CUDA kernel forced, at odd shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", ["skinny", "tc", "wg", "wgsk", "generic", "dequant"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernels_forced(path, dtype):
    # K % 32 == 0 for the mma kernels (others fall back to auto, still checked).
    shapes = [(1, 1, 32), (3, 33, 96), (8, 31, 4128), (17, 257, 160), (32, 64, 8192), (5, 1000, 2048)]
    # whole 512-wide stages and 32-row tiles (the skinny kernel's kSkinnyWhole mode at bs >= 64)
    shapes += [(3, 96, 1024), (20, 32, 512), (9, 64, 1536)]
    # past 32 rows (skinny: the batch in slices of 32; wg: batch tiles 64, 128, 256)
    shapes += [(33, 129, 224), (64, 130, 64), (100, 200, 320), (130, 72, 320), (256, 300, 4096)]
    for i, (M, N, K) in enumerate(shapes):
        for bs, nested, qt in MODES:
            B, qs = quantized(N, K, bs, qt, nested, "cuda", dtype, seed=i)
            A = activations((M, K), dtype, "cuda", seed=i + 7)
            bias = activations((N,), dtype, "cuda", seed=i + 9) if i % 2 else None
            with gemm_path(path):
                check_against_reference(A, B, qs, bias, f"{path} {dtype} M={M} N={N} K={K} bs={bs} {qt} n={nested}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_bias_in_any_float_dtype(device, dtype):
    """The op takes the bias in any float dtype: the CUDA kernels read it in A's dtype or in float32 as
    it comes (no cast kernel a call), another dtype is cast by the host function. A bias exactly representable in all
    three gives the same output bit for bit whatever its dtype, on every CUDA path (the epilogues of
    the skinny, tensor-core, warpgroup and generic kernels, and dequantize + cuBLAS)."""
    M, N, K = 5, 72, 512
    B, qs = quantized(N, K, 64, "nf4", True, device, dtype, seed=3)
    A = activations((M, K), dtype, device, seed=4)
    exact = torch.randint(-32, 33, (N,), device=device).float() / 8  # k / 8: exact in fp16, bf16, fp32
    args = (A, B.reshape(-1), *qs._decode_args(), N)
    paths = ["skinny", "tc", "wg", "generic", "dequant"] if device == "cuda" else [None]
    for path in paths:
        with gemm_path(path):
            want = ops.gemm_4bit(*args, exact.to(dtype))
            for bias_dtype in (torch.float32, torch.float16, torch.bfloat16):
                got = ops.gemm_4bit(*args, exact.to(bias_dtype))
                assert torch.equal(got, want), f"{path} bias {bias_dtype}"
            assert not torch.equal(ops.gemm_4bit(*args, None), want), path  # the bias is added at all


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_wg_stream_k(dtype):
    """The warpgroup kernel's stream-K grid (forced by wgsk on any K % 256 == 0): shares of 4 k tiles
    cut across tiles, so a tile's sums come from many blocks (up to 32 here); the owner adds them in
    block order, so two runs agree bit for bit, and the result is within the reference bound."""
    cases = ((70, 300, 2048, 64, True, "nf4"), (1, 129, 8192, 32, False, "fp4"),
             (257, 200, 768, 128, True, "fp4"), (16, 1000, 1024, 64, False, "nf4"))
    check_repeatable("wgsk", cases, dtype, 20, "wgsk")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grid", ["3", "5", "7"])
def test_cuda_wg_dp_stream_k(dtype, grid, monkeypatch):
    """DP + SK (wgdp): whole tiles for the full waves of a grid forced small (NF4KIT_WG_GRID), then
    stream-K over the rest; tiles cross from the whole-tile phase into a share that starts mid-tile."""
    monkeypatch.setenv("NF4KIT_WG_GRID", grid)
    cases = ((70, 2600, 512, 64, True, "nf4"), (130, 1500, 768, 32, False, "fp4"), (300, 1100, 1024, 128, True, "nf4"))
    check_repeatable("wgdp", cases, dtype, 50, f"wgdp grid={grid}")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_wg_deep_ring(dtype):
    """The warpgroup kernel at batch tile 128, one block per tile, runs an 8-slot ring (5 with
    stream-K, 6 at batch tile 64): tiles of more k tiles than slots and of fewer, odd N, both absmax
    kinds."""
    for i, (M, N, K, bs, nested) in enumerate(((100, 300, 4096, 64, True), (128, 131, 384, 128, False), (65, 64, 1024, 64, False))):
        B, qs = quantized(N, K, bs, "nf4", nested, "cuda", dtype, seed=90 + i)
        A = activations((M, K), dtype, "cuda", seed=91 + i)
        bias = activations((N,), dtype, "cuda", seed=92 + i) if i % 2 == 0 else None
        with gemm_path("wg"):
            check_against_reference(A, B, qs, bias, f"wg 8 stages {dtype} M={M} N={N} K={K}")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["wg", "wgsk"])
def test_cuda_wg_packed_scales(dtype, path, monkeypatch):
    """Blocksize 64 with K % 256 == 0: the warpgroup kernel loads 4 k tiles' absmax at once. Those are
    the same values the per-tile loads give, so the outputs agree bit for bit with the per-tile mode
    (NF4KIT_WG_SCALES=step), nested and plain, batch tiles 64 / 128 / 256, odd N. With stream-K at
    batch tile 128 this also compares the packed mode's 8-slot ring with the step mode's 5 slots."""
    cases = ((40, 300, 1024, True), (100, 131, 2048, False), (300, 200, 768, True))
    check_switch_identical(monkeypatch, path, cases, dtype, 100, "NF4KIT_WG_SCALES", None, "step", "packed scales")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rows", ["16", "32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_skinny_rows(dtype, rows, monkeypatch):
    """The skinny kernel with blocks of 16 rows and 512-byte stages a row (up to batch 16; past it the
    32-row kernel takes the slice), and with blocks of 32 rows and 256-byte stages, each forced
    (NF4KIT_SKINNY_ROWS; the dispatch picks 16 only for few row tiles, so most small test shapes take
    it), against the reference and bit for bit between two runs: partial and whole stages, partial
    row tiles, every blocksize mode."""
    monkeypatch.setenv("NF4KIT_SKINNY_ROWS", rows)
    shapes = [(1, 1, 32), (3, 33, 96), (8, 31, 4128), (16, 257, 160), (5, 1000, 2048), (1, 48, 2048),
              (16, 16, 1024), (8, 80, 3072), (12, 40, 1056), (20, 64, 1024), (9, 96, 512), (2, 64, 1536)]
    cases = [(M, N, K, bs, nested, qt) for M, N, K in shapes for bs, nested, qt in MODES]
    check_repeatable("skinny", cases, dtype, 150, f"skinny rows {rows}")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rows", ["16", "32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_skinny_v2(dtype, rows, monkeypatch):
    """The skinny kernel's V2 (the prologue's loads issued before the pair table is built; the
    dispatch's choice with 32-row blocks), forced with NF4KIT_SKINNY_V=2, against the reference, and
    bit for bit equal to V1 (NF4KIT_SKINNY_V=1, the table first), which adds the same sums in the
    same order: one, two, three and odd numbers of stages (whole and partial), batch 1 to 32 (one,
    two and four n8 tiles), every blocksize mode, nested and plain, blocks of 16 and 32 rows."""
    monkeypatch.setenv("NF4KIT_SKINNY_ROWS", rows)
    shapes = [(1, 32, 512), (1, 64, 1024), (3, 33, 1536), (8, 96, 2560), (5, 31, 4128), (9, 64, 1536),
              (16, 40, 2048), (12, 32, 96), (20, 64, 1536), (32, 33, 1056), (2, 1, 64), (7, 64, 3584)]
    cases = [(M, N, K, bs, nested, qt) for i, (M, N, K) in enumerate(shapes)
             for j, (bs, nested, qt) in enumerate(MODES) if i < 4 or j == i % len(MODES)]
    check_switch_identical(monkeypatch, "skinny", cases, dtype, 170, "NF4KIT_SKINNY_V", "2", "1", f"skinny v2 rows {rows}",
                           bias=True)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_skinny_wide(dtype, monkeypatch):
    """The skinny kernel's wide pass (33..64 batch rows in one launch, eight n8 tiles; forced with
    NF4KIT_SKINNY_WIDE=1): against the reference at 33..48 rows, and at 49..64 bit for bit equal to
    two slices of 32 (NF4KIT_SKINNY_WIDE=0: both slices four n8 tiles, the same sums in the same
    order); partial and whole stages, odd N, every blocksize mode, a bias on every other case."""
    narrow = [(33, 129, 224), (40, 64, 1024), (48, 33, 4128), (35, 1, 96), (47, 4096, 512)]
    monkeypatch.setenv("NF4KIT_SKINNY_WIDE", "1")
    check_repeatable("skinny", [(M, N, K, *MODES[i % 4]) for i, (M, N, K) in enumerate(narrow)], dtype, 260,
                     "skinny wide")
    full = [(64, 130, 64), (49, 96, 2048), (64, 257, 4096), (57, 32, 1536), (64, 4096, 1024)]
    cases = [(M, N, K, *MODES[j]) for i, (M, N, K) in enumerate(full) for j in range(4) if i < 2 or j == i % 4]
    check_switch_identical(monkeypatch, "skinny", cases, dtype, 280, "NF4KIT_SKINNY_WIDE", "1", "0", "skinny wide",
                           bias=True)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rows", ["16", "32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_skinny_l2_evict_first(dtype, rows, monkeypatch):
    """The skinny kernel's packed-W copies with an L2 evict_first policy, against the reference, and
    bit for bit equal to the default policy (NF4KIT_L2_EVICT_FIRST=0): batch 1 to 64 (one, two, four
    and eight n8 tiles, the wide pass), one and many stages, every blocksize mode, partial row tiles
    (N % 32 != 0: the copies past N zero-filled without the policy)."""
    monkeypatch.setenv("NF4KIT_SKINNY_ROWS", rows)
    shapes = [(1, 32, 1024), (1, 64, 4096), (4, 96, 2048), (8, 32, 1024), (12, 64, 3072), (16, 128, 1024),
              (24, 32, 2048), (32, 64, 1024), (1, 4096, 1024), (3, 48, 2048), (40, 64, 1024), (64, 32, 2048)]
    cases = [(M, N, K, bs, nested, qt) for i, (M, N, K) in enumerate(shapes)
             for j, (bs, nested, qt) in enumerate(MODES) if i < 3 or j == i % len(MODES)]
    monkeypatch.setenv("NF4KIT_SKINNY_WIDE", "1")  # 33..64 rows in one pass
    check_switch_identical(monkeypatch, "skinny", cases, dtype, 190, "NF4KIT_L2_EVICT_FIRST", None, "0",
                           f"skinny evict_first rows {rows}", bias=True)


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["wg", "wgsk", "wgdp"])
def test_cuda_wg_l2_evict_first(dtype, path, monkeypatch):
    """The warpgroup kernel's TMA loads of W with an evict_first L2 policy (one batch tile), against the
    reference and bit for bit equal to the default policy (NF4KIT_L2_EVICT_FIRST=0): batch tiles 32 to
    256, one and several batch tiles (the policy off), partial tiles."""
    cases = [(24, 300, 512, True), (48, 129, 1024, False), (100, 300, 512, True), (200, 260, 1024, True),
             (300, 140, 512, False), (33, 1100, 2048, True)]
    if path == "wgdp":
        monkeypatch.setenv("NF4KIT_WG_GRID", "3")
    check_switch_identical(monkeypatch, path, cases, dtype, 520, "NF4KIT_L2_EVICT_FIRST", None, "0",
                           f"{path} evict_first", bias=True)


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
def test_cuda_dispatch_skinny_to_warpgroup():
    """The automatic dispatch at 8..17 rows with many row tiles (at least half a warpgroup block an
    SM), on both sides of each threshold (wg_from_m): where the warpgroup kernel's scales are packed
    (blocksize 64, K % 256 == 0), the skinny kernel up to 15 rows with whole skinny stages and row
    tiles (K % 512 == 0, N % 32 == 0: kWgFromMWhole) and up to 8 without them (kWgFromM); with
    unpacked scales (other blocksizes, K % 256 != 0) up to 16 (kWgFromMUnpacked). Each case bit for
    bit the forced kernel's result."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    N = 128 * ((sms + 1) // 2)  # wg tiles at batch tile 32: ceil(N / 128) * 2 >= sms
    for i, (M, K, bs, want) in enumerate([(15, 1024, 64, "skinny"), (16, 1024, 64, "wg"),  # packed, whole
                                          (8, 1280, 64, "skinny"), (9, 1280, 64, "wg"),  # packed, K % 512 != 0
                                          (16, 1536, 128, "skinny"), (17, 1536, 128, "wg"),  # unpacked: blocksize
                                          (16, 1024, 32, "skinny"), (17, 1024, 32, "wg"),
                                          (16, 1056, 64, "skinny"), (17, 1056, 64, "wg")]):  # unpacked: K
        B, qs = quantized(N, K, bs, "nf4", True, "cuda", seed=400 + i)
        A = activations((M, K), torch.float16, "cuda", seed=450 + i)
        with gemm_path(None):
            auto = F.matmul_4bit(A, B.t(), qs)
        with gemm_path(want):
            forced = F.matmul_4bit(A, B.t(), qs)
        torch.testing.assert_close(auto, forced, rtol=0, atol=0, msg=lambda m: f"M={M} K={K} bs={bs} ({want}): {m}")


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["wg", "wgsk", "wgdp"])
def test_cuda_wg_producer_warp(dtype, path, monkeypatch):
    """With the packed scales a producer (a ninth warp; at batch tile 256 a third warpgroup, with
    setmaxnreg) issues the copies, the whole ring ahead (the default;
    NF4KIT_WG_PRODUCER=warp names it); NF4KIT_WG_PRODUCER=thread keeps thread 0 of warp 0 producing
    between its own steps. Same sums in the same order, so bit
    for bit equal; partial tiles, nested and plain, one block per tile, stream-K and DP + SK; at batch
    tiles 32 and 64 one block per tile within one block an SM (SOLO, 112 registers) and past it (80)."""
    cases = ((100, 300, 2048, True), (128, 131, 1024, False), (65, 1000, 4096, True),
             (200, 300, 1024, True), (256, 131, 2048, False),  # these two: batch tile 256
             (24, 300, 2048, True), (17, 131, 1024, False), (48, 1000, 4096, True), (64, 131, 1024, False))  # 32, 64
    if path == "wg":  # batch tiles 32 and 64 with more tiles than SMs: two blocks an SM, not SOLO
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        cases += ((30, 128 * sms + 77, 1024, True), (50, 128 * sms + 77, 1024, False))
    check_switch_identical(monkeypatch, path, cases, dtype, 120, "NF4KIT_WG_PRODUCER", "warp", "thread", "producer warp")


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["wg", "wgsk", "wgdp"])
def test_cuda_wg_prew(dtype, path, monkeypatch):
    """NF4KIT_WG_PREW=1 (batch tile 128 with the producer and the packed scales; the default in DP + SK):
    the next k tile's packed words loaded a step ahead give the same sums in the same order as without
    it (NF4KIT_WG_PREW=0), so bit for bit equal; nested and plain, NF4 and FP4, partial tiles, one
    block per tile, stream-K and DP + SK, and a blocksize where other kernels run."""
    cases = ((100, 300, 2048, 64, True, "nf4"), (128, 131, 1024, 64, False, "fp4"), (65, 1000, 4096, 64, True, "fp4"),
             (97, 257, 1024, 64, False, "nf4"), (96, 129, 2048, 128, True, "nf4"), (120, 643, 1280, 64, True, "nf4"))
    check_switch_identical(monkeypatch, path, cases, dtype, 180, "NF4KIT_WG_PREW", "1", "0", "words a step ahead")


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wide", ["1", "0"])
def test_cuda_wg_wide_table(dtype, wide, monkeypatch):
    """Batch tiles 64 and 128 (up to 128 rows) decode through the wide pair table (256-byte rows where
    the dynamic shared memory starts, an address its lookups take as a constant once the host has
    checked it; code8 and the mbarriers in the rows' unused halves); NF4KIT_WG_WIDE=0 takes the
    fallback, batch tile 256. Both against the reference and bit for bit between two runs: every
    scale mode (blocksize 32, 128, and 64 with the packed scales), nested and plain, NF4 and FP4,
    partial tiles, one block per tile and stream-K."""
    monkeypatch.setenv("NF4KIT_WG_WIDE", wide)
    cases = [(65, 300, 1024, 64, True, "nf4"), (128, 131, 2048, 32, False, "fp4"), (100, 257, 1024, 128, True, "nf4"),
             (77, 1000, 4096, 64, False, "fp4"), (96, 129, 2048, 256, True, "fp4"), (40, 257, 2048, 64, True, "nf4"),
             (64, 131, 1024, 32, True, "fp4"), (33, 1000, 4096, 128, False, "nf4")]
    for path in ("wg", "wgsk"):
        check_repeatable(path, cases, dtype, 330, f"{path} wide table {wide}")


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_wg_tile32(dtype, monkeypatch):
    """Batch tile 32 (m64n32k16 wgmma, the wide table with code8 and the mbarriers in its holes, 6
    stages, two blocks an SM), forced with NF4KIT_WG_BN=32: one and several batch tiles, partial
    ones, every scale mode, nested and plain, NF4 and FP4, one block per tile and stream-K; against
    the reference and bit for bit between two runs."""
    monkeypatch.setenv("NF4KIT_WG_BN", "32")
    cases = [(1, 300, 1024, 64, True, "nf4"), (17, 131, 2048, 32, False, "fp4"), (32, 257, 1024, 128, True, "nf4"),
             (25, 1000, 4096, 64, False, "fp4"), (77, 129, 2048, 256, True, "fp4"), (32, 257, 2048, 64, True, "nf4"),
             (9, 131, 1024, 32, True, "fp4"), (64, 1000, 4096, 128, False, "nf4")]
    for path in ("wg", "wgsk"):
        check_repeatable(path, cases, dtype, 370, f"{path} batch tile 32")


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
def test_cuda_wg_dp_stream_k_auto_long_k():
    """Batch past 1024 on long K (the fused kernel with DP + SK, up to batch 2048): more
    tiles than SMs, not a whole number of waves, partial last batch and row tiles; two runs agree
    bit for bit."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    M, K, N = 2000, 8192, 128 * (sms // 8 + 2) - 3  # 8 batch tiles x (sms / 8 + 2) row tiles
    B, qs = quantized(N, K, 64, "nf4", True, "cuda", torch.float16, seed=90)
    A = activations((M, K), torch.float16, "cuda", seed=91)
    ref = check_against_reference(A, B, qs, None, f"auto large batch M={M} N={N} K={K}")
    torch.testing.assert_close(F.matmul_4bit(A, B.t(), qs), ref, rtol=0, atol=0)


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_wg_dp_stream_k_auto(dtype):
    """A shape the automatic dispatch sends to DP + SK on the device's own SM count (batch tile 256,
    K = 8192, tiles past one wave and not a whole number of them), partial last row tile included;
    two runs agree bit for bit."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    M, K = 257, 8192
    N = 128 * (sms // 2 + 10) - 3  # 2 batch tiles x (sms / 2 + 10) row tiles: one wave and 20 tiles
    B, qs = quantized(N, K, 64, "nf4", True, "cuda", dtype, seed=80)
    A = activations((M, K), dtype, "cuda", seed=81)
    bias = activations((N,), dtype, "cuda", seed=82)
    ref = check_against_reference(A, B, qs, bias, f"auto dp+sk {dtype} M={M} N={N} K={K}")
    torch.testing.assert_close(F.matmul_4bit(A, B.t(), qs, bias=bias), ref, rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_skinny_fp4_codes_unbiased(dtype):
    """FP4's codes 2/3, 1/3, 1/6 and 1/192 all round one way in fp16 (down) and bf16 (up). Where the
    skinny kernel scales a whole group's float32 sum by the absmax (batch <= 16, blocksize >= 64),
    that bias reached every product: this single output of a 512-long dot product came out at 1.2x
    (fp16) and 3.6x (bf16) the error bound (emulated on the CPU). The kernel now holds the codes
    times 6 (exact) and divides the absmax by 6."""
    B, qs = quantized(1, 512, 64, "fp4", False, "cuda", dtype, seed=0)
    for M in (1, 16):
        A = activations((M, 512), dtype, "cuda", seed=7)
        bias = activations((1,), dtype, "cuda", seed=9)
        with gemm_path("skinny"):
            check_against_reference(A, B, qs, bias, f"skinny fp4 {dtype} M={M}")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_matches_cpu_op():
    """The CUDA op and the CPU op agree within float32-accumulation noise."""
    for dtype in (torch.float32, torch.float16):
        B, qs = quantized(100, 320, 64, "fp4", True, "cuda", dtype)
        A = activations((12, 320), dtype, "cuda")
        out = F.matmul_4bit(A, B.t(), qs)
        cpu_args = [t.cpu() if isinstance(t, torch.Tensor) else t for t in qs._decode_args()]
        cpu = ops.gemm_4bit(A.cpu(), B.reshape(-1).cpu(), *cpu_args, 100, None)
        assert rel_err(out, cpu) < 4 * torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------
# Autograd, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd(device, dtype):
    N, K = 24, 96
    B, qs = quantized(N, K, 32, "nf4", True, device, dtype)
    A = activations((2, 3, K), dtype, device).requires_grad_()
    bias = activations((N,), dtype, device).requires_grad_()
    out = F.matmul_4bit(A, B.t(), qs, bias=bias)
    grad = activations(out.shape, dtype, device, seed=5)
    out.backward(grad)
    W = dequant_f32(B, qs).double()
    ref_A = grad.double().cpu() @ W
    tol = 4 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
    assert rel_err(A.grad, ref_A) < tol
    assert rel_err(bias.grad, grad.double().cpu().reshape(-1, N).sum(0)) < tol
    assert not B.requires_grad and B.grad is None


def test_autograd_gradcheck_style(device):
    """Directional derivative of the op (float32) against the analytic gradient."""
    N, K = 8, 64
    B, qs = quantized(N, K, 64, "fp4", False, device, torch.float32)
    A = activations((3, K), torch.float32, device).requires_grad_()
    f = lambda x: F.matmul_4bit(x, B.t(), qs)  # noqa: E731
    v = activations((3, K), torch.float32, device, seed=9)
    u = activations((3, N), torch.float32, device, seed=10)
    (g,) = torch.autograd.grad((f(A) * u).sum(), A)
    eps = 1e-2
    with torch.no_grad():
        fd = ((f(A + eps * v) - f(A - eps * v)) * u).sum() / (2 * eps)  # exact: f is linear
    assert abs(float((g * v).sum()) - float(fd)) <= 1e-3 * abs(float(fd)) + 1e-3


def test_autograd_skipped_without_grad(device, monkeypatch):
    """Where no gradient can be wanted (torch.no_grad, or no input that requires grad: a frozen
    Linear4bit's bias included), matmul_4bit goes below the Autograd key itself instead of through
    the Python autograd formula (a host-time saving); where one can, it goes through it. Both give
    the op's result bit for bit, and a no-grad result is a plain tensor that later autograd can use."""
    entered = []
    real = F._BelowAutograd

    class Counting:
        def __enter__(self):
            entered.append(1)
            self.guard = real()
            return self.guard.__enter__()

        def __exit__(self, *exc):
            return self.guard.__exit__(*exc)

    monkeypatch.setattr(F, "_BelowAutograd", Counting)
    N, K = 24, 128
    B, qs = quantized(N, K, 64, "nf4", True, device, torch.float16)
    A = activations((3, K), torch.float16, device)
    bias = activations((N,), torch.float16, device)
    want = ops.gemm_4bit(A, B.reshape(-1), *qs._decode_args(), N, bias)
    frozen = bias.clone().requires_grad_(False)
    trainable = bias.clone().requires_grad_()
    cases = [("no_grad", torch.no_grad, A, trainable, True), ("inference_mode", torch.inference_mode, A, bias, True),
             ("nothing requires grad", nullcontext, A, frozen, True),
             ("bias requires grad", nullcontext, A, trainable, False),
             ("A requires grad", nullcontext, A.clone().requires_grad_(), frozen, False)]
    for name, mode, a, b, skipped in cases:
        entered.clear()
        with mode():
            out = F.matmul_4bit(a, B.t(), qs, bias=b)
        assert bool(entered) == skipped, name
        assert torch.equal(out, want), name
        assert (out.grad_fn is None) == skipped, name
    with torch.no_grad():
        out = F.matmul_4bit(A, B.t(), qs)
    x = torch.ones_like(out, requires_grad=True)
    (x * out).sum().backward()  # the no-grad output is a normal tensor
    assert torch.equal(x.grad, out)


def _op_args(device, nested, with_bias):
    B, qs = quantized(20, 64, 32, "nf4", nested, device)
    A = activations((3, 64), torch.float16, device)
    bias = activations((20,), torch.float16, device) if with_bias else None
    return (A, B.reshape(-1), *qs._decode_args(), 20, bias)


@pytest.mark.parametrize("nested", [False, True])
def test_opcheck(device, nested):
    torch.library.opcheck(ops.gemm_4bit.default, _op_args(device, nested, True))
    torch.library.opcheck(ops.gemm_4bit.default, _op_args(device, nested, False))


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ---------------------------------------------------------------------------------------------
def test_bad_inputs(device):
    B, qs = quantized(16, 64, 64, "nf4", True, device)
    A = activations((2, 64), torch.float16, device)
    with pytest.raises(ValueError, match="in_features=64"):
        F.matmul_4bit(activations((2, 63), torch.float16, device), B.t(), qs)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        F.matmul_4bit(A.double(), B.t(), qs)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        F.matmul_4bit(A.to(torch.int32), B.t(), qs)
    B2, qs2 = quantized(32, 64, 64, "nf4", True, device)  # a quant_state of another shape
    with pytest.raises(ValueError):
        F.matmul_4bit(A, B.t(), qs2)
    with pytest.raises(ValueError):
        F.matmul_4bit(A, B2.t(), qs)
    with pytest.raises(ValueError, match="bias"):
        F.matmul_4bit(A, B.t(), qs, bias=torch.zeros(15, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="quant_state"):
        F.matmul_4bit(A, B.t(), None)
    # activations on another device than the weight: CPU activations with a CUDA weight, CUDA
    # activations with a CPU weight, or (CPU-only machine) meta activations with a CPU weight
    other = "cpu" if device == "cuda" else ("cuda" if CUDA else "meta")
    with pytest.raises(ValueError, match="device|on "):
        F.matmul_4bit(A.to(other), B.t(), qs)
    # the op itself (no Python checks): argument named in the error
    args = list(_op_args(device, False, False))
    args[2] = args[2][:-1]
    with pytest.raises((ValueError, RuntimeError), match="absmax"):
        ops.gemm_4bit(*args)
    args = list(_op_args(device, False, False))
    with pytest.raises((ValueError, RuntimeError), match="packed"):
        ops.gemm_4bit(*args[:-2], 21, None)


def test_state_checks_kept_until_a_field_changes(device, monkeypatch):
    """matmul_4bit checks a QuantState's own fields once and keeps its op arguments on it (a decode
    loop's host time), for as long as every field is the same object: replacing one (a bad absmax, a
    new shape, .to()) checks again and raises where the new value is wrong. The per-call checks (A, B
    against the state) still run every call."""
    checks = []
    real = F._check_state_fields
    monkeypatch.setattr(F, "_check_state_fields", lambda *a, **k: (checks.append(1), real(*a, **k))[1])
    N, K = 24, 128
    B, qs = quantized(N, K, 64, "nf4", True, device)
    A = activations((3, K), torch.float16, device)
    want = F.matmul_4bit(A, B.t(), qs)
    for _ in range(3):
        assert torch.equal(F.matmul_4bit(A, B.t(), qs), want)
    assert len(checks) == 1
    with pytest.raises(ValueError, match="in_features=128"):  # per call, with the state kept
        F.matmul_4bit(activations((3, K - 1), torch.float16, device), B.t(), qs)
    with pytest.raises(ValueError, match="bytes"):
        F.matmul_4bit(A, B.t()[:, :-1], qs)
    good = qs.absmax
    qs.absmax = good[:-1]  # a replaced field: checked again
    with pytest.raises(ValueError, match="quant_state.absmax has"):
        F.matmul_4bit(A, B.t(), qs)
    qs.absmax = good
    nested = qs.state2.absmax
    qs.state2.absmax = nested.half()  # the nested state's fields count too
    with pytest.raises((ValueError, TypeError, RuntimeError), match="nested_absmax"):  # the op's own check
        F.matmul_4bit(A, B.t(), qs)
    qs.state2.absmax = nested
    assert torch.equal(F.matmul_4bit(A, B.t(), qs), want)
    shape = qs.shape
    qs.shape = torch.Size((N // 2, 2 * K))
    with pytest.raises(ValueError, match="in_features=256"):
        F.matmul_4bit(A, B.t(), qs)
    qs.shape = shape
    checks.clear()
    qs.absmax = qs.absmax.clone()  # a new object with the same values: one check more
    for _ in range(2):
        assert torch.equal(F.matmul_4bit(A, B.t(), qs), want)
    assert len(checks) == 1
    # the kept arguments are the state's own tensors (the offset too): their contents are read each call
    qs.state2.absmax.mul_(0)
    qs.offset.mul_(0)
    assert torch.equal(F.matmul_4bit(A, B.t(), qs), torch.zeros_like(want))


def test_state_kept_args_let_go_by_to(device):
    """What matmul_4bit keeps on a QuantState holds its tensors; .to() drops it, so that moving a
    state away (offloading a layer) frees the old tensors as it did before anything was kept."""
    B, qs = quantized(24, 128, 64, "nf4", True, device)
    F.matmul_4bit(activations((1, 128), torch.float16, device), B.t(), qs)
    old = [weakref.ref(t) for t in (qs.absmax, qs.state2.absmax, qs.offset)]
    qs.to("meta")
    gc.collect()
    assert [r() for r in old] == [None, None, None]


# ---------------------------------------------------------------------------------------------
# bitsandbytes (the format's origin) gives the same products
# ---------------------------------------------------------------------------------------------
def _bnb_state(qs):
    from bitsandbytes.functional import QuantState as BQS
    s2 = None
    if qs.nested:
        s2 = BQS(absmax=qs.state2.absmax, code=qs.state2.code, blocksize=qs.state2.blocksize, dtype=torch.float32)
    return BQS(absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize, quant_type=qs.quant_type,
               dtype=qs.dtype, offset=qs.offset, state2=s2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_bitsandbytes(device, dtype):
    bnb = pytest.importorskip("bitsandbytes")
    if device == "cuda" and not getattr(bnb, "__version__", ""):
        pytest.skip("bitsandbytes without CUDA")
    for i, (M, N, K, nested, qt) in enumerate([(1, 64, 128, True, "nf4"), (5, 96, 256, False, "fp4"),
                                              (33, 48, 512, True, "fp4"), (3, 1, 64, False, "nf4")]):
        B, qs = quantized(N, K, 64, qt, nested, device, dtype, seed=i)
        A = activations((M, K), dtype, device, seed=i)
        ours = F.matmul_4bit(A, B.t(), qs)
        try:
            theirs = bnb.matmul_4bit(A, B.t(), _bnb_state(qs))
        except (RuntimeError, NotImplementedError) as exc:  # e.g. no bnb kernel for this device
            pytest.skip(f"bitsandbytes cannot run here: {exc}")
        ref = A.double().cpu() @ dequant_f32(B, qs).double().t()
        tol = 2 * max(rel_err(theirs, ref), torch.finfo(dtype).eps)
        assert rel_err(ours, ref) <= tol
        assert rel_err(ours, theirs) <= 2 * tol
