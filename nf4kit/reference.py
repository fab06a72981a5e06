"""The executable spec: every nf4kit op in plain PyTorch.

Each function here has the signature of the torch op of the same name (``torch.ops.nf4kit.<name>``)
and defines, bit for bit, what the CPU and CUDA kernels must return. The rules are those of
bitsandbytes 0.50.2 on the CPU (the format oracle, see ``../shared/FORMAT.md``); where a rule looks
odd, the comment says which bitsandbytes behaviour it reproduces. Nothing here is fast.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch

NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
# 1 sign bit, 2 exponent bits, 1 mantissa bit (bias 2), normalised by the largest magnitude (12).
FP4_CODE = torch.tensor(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
) / 12.0
# Code indices in ascending order of value; +0.0 (index 0) sorts before -0.0 (index 8), as
# torch.argsort orders them on the CPU, which decides where values near zero go.
FP4_ORDER = torch.tensor([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=torch.int64)
NF4_ORDER = torch.arange(16, dtype=torch.int64)

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# bitsandbytes clamps a partial last block's absmax to this before dividing (and stores it).
TINY_ABSMAX = 1e-38


def get_4bit_code(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return NF4_CODE.clone()
    if quant_type == "fp4":
        return FP4_CODE.clone()
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def decode_table_4bit(quant_type: str) -> torch.Tensor:
    """The values dequantization multiplies by: the code, with FP4's -0.0 read as +0.0."""
    code = get_4bit_code(quant_type)
    return torch.where(code == 0, torch.zeros_like(code), code)


def _order(quant_type: str) -> torch.Tensor:
    return NF4_ORDER if quant_type == "nf4" else FP4_ORDER


def midpoints_4bit(quant_type: str) -> torch.Tensor:
    """The 15 decision boundaries: float32 means of neighbouring sorted code values."""
    code = get_4bit_code(quant_type)[_order(quant_type)]
    return (code[:-1] + code[1:]) / 2


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic-exponent map (Dettmers, 8-bit approximations), 256 sorted float32 values.

    For each exponent e = 0..max_exponent_bits-1 the fraction range [0.1, 1] is cut into equal
    steps whose bucket centres are scaled by 10^(e - max_exponent_bits + 1) (and mirrored when
    signed); 0 and 1 complete the table.
    """
    values: list[float] = []
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1

    def centres(steps: int, scale: float) -> list[float]:
        edges = torch.linspace(0.1, 1, steps, dtype=torch.float32)
        mid = (edges[:-1] + edges[1:]) / 2.0
        out = (scale * mid).tolist()  # scaled in float32
        return out + ((-scale) * mid).tolist() if signed else out

    for e in range(max_exponent_bits):
        bits = e + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        values += centres(2**bits + 1, 10 ** (e - max_exponent_bits + 1))
    if extra > 0:
        values += centres(extra + 1, 10 ** 0)
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return (q[0::2] << 4) | q[1::2]


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.reshape(-1).view(torch.uint8)
    q = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)
    return q[:n].long()


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization: (packed uint8 [(n+1)//2], absmax float32 [ceil(n/blocksize)]).

    Full blocks are scaled by the float32 reciprocal of their absmax (1/max(absmax, 1e-38)) and
    keep absmax as it is (0 for an all-zero block); a partial last block is divided by
    max(absmax, 1e-38), and that clamped value is what is stored. The scaled values, clamped to
    [-1, 1], take the code index of the bucket between sorted midpoints that holds them, a value
    on a midpoint going to the lower code (torch.bucketize, right=False); NaN goes to the top.
    With an odd count, the last byte's low nibble is the code that 0.0 takes.
    """
    x = A.reshape(-1).to(torch.float32)
    n = x.numel()
    full = n - n % blocksize
    scaled = torch.empty(n, dtype=torch.float32)
    absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32)
    if full:
        xb = x[:full].reshape(-1, blocksize)
        am = xb.abs().amax(dim=1)
        absmax[: full // blocksize] = am
        recip = 1.0 / am.clamp(min=TINY_ABSMAX)
        scaled[:full] = torch.clamp(xb * recip[:, None], -1, 1).reshape(-1)
    if full < n:
        am = x[full:].abs().amax().clamp(min=TINY_ABSMAX)
        absmax[-1] = am
        scaled[full:] = torch.clamp(x[full:] / am, -1, 1)
    if n % 2:
        # The odd trailing low nibble holds the code of 0.0 (7 for NF4, 0 for FP4), not 0.
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    bucket = torch.bucketize(scaled, midpoints_4bit(quant_type))
    q = _order(quant_type)[bucket]
    return _pack_nibbles(q).to(A.device), absmax.to(A.device)


def dequantize_nested_absmax(
    absmax_q: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: torch.Tensor,
    nested_blocksize: int,
) -> torch.Tensor:
    """absmax[j] = nested_code[absmax_q[j]] * nested_absmax[j // nested_blocksize] + offset,
    each step rounded to float32 (two operations, never fused)."""
    j = torch.arange(absmax_q.numel(), device=absmax_q.device)
    scale = nested_absmax.float()[j // nested_blocksize]
    return (nested_code.float()[absmax_q.reshape(-1).long()] * scale) + offset.float().reshape(())


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """out = dtype(code[q] * absmax[block]) with the product in float32, rounded to nearest even.

    FP4's code 8 (-0.0) decodes to +0.0, as bitsandbytes' CPU kernel does."""
    n = math.prod(shape)
    if absmax.dtype == torch.uint8:
        absmax = dequantize_nested_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    q = _unpack_nibbles(packed.cpu(), n)
    scale = absmax.float().cpu()[torch.arange(n) // blocksize]
    out = decode_table_4bit(quant_type)[q] * scale
    return out.to(dtype).reshape(tuple(shape)).to(packed.device)


@functools.lru_cache(maxsize=8)
def _lut_8bit(code_bytes: bytes) -> torch.Tensor:
    """65536-entry table: code index nearest to each point of a uniform grid over [-1, 1].

    Nearest: lower_bound in the sorted code, then the right neighbour only when strictly closer.
    """
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    grid = torch.arange(65536, dtype=torch.float32) / 65535.0 * 2.0 - 1.0
    right = torch.searchsorted(code, grid, side="left")
    r = right.clamp(1, 255)
    dist_left = (grid - code[r - 1]).abs()
    dist_right = (code[r] - grid).abs()
    idx = torch.where(dist_right < dist_left, r, r - 1)
    idx = torch.where(right == 0, torch.zeros_like(idx), idx)
    idx = torch.where(right == 256, torch.full_like(idx, 255), idx)
    return idx.to(torch.uint8)


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit: (uint8 codes, shape of A; absmax float32 [ceil(n/blocksize)]).

    v = clamp(x * float32(1 / absmax), -1, 1) (NaN for an all-zero block), then the grid point
    trunc(((v + 1) * 0.5) * 65535 + 0.5) (float32 steps; NaN -> 0) is looked up in the
    nearest-code table (bitsandbytes' CPU quantizer works the same way).
    """
    x = A.reshape(-1).to(torch.float32).cpu()
    n = x.numel()
    nblocks = math.ceil(n / blocksize)
    pad = nblocks * blocksize - n
    xb = torch.nn.functional.pad(x, (0, pad)).reshape(nblocks, blocksize)
    absmax = xb.abs().amax(dim=1)
    v = torch.clamp((xb * (1.0 / absmax)[:, None]).reshape(-1)[:n], -1, 1)
    t = ((v + 1.0) * 0.5) * 65535.0 + 0.5
    t = torch.where(torch.isnan(t), torch.zeros_like(t), t)
    grid_index = t.to(torch.int64)
    lut = _lut_8bit(code.float().cpu().contiguous().numpy().tobytes())
    q = lut[grid_index]
    return q.reshape(A.shape).to(A.device), absmax.to(A.device)


def quantize_nested_absmax(
    absmax: torch.Tensor, offset: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The second level of a nested 4-bit quantization: quantize_blockwise(absmax - offset), the
    subtraction one float32 rounding (offset is torch's float32 mean of absmax on its device)."""
    return quantize_blockwise(absmax.float() - offset.float().reshape(()), code, blocksize)


def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """out = dtype(code[q] * absmax[block]), product in float32."""
    q = A.reshape(-1).long()
    scale = absmax.float()[torch.arange(q.numel(), device=A.device) // blocksize]
    return (code.float()[q] * scale).to(dtype).reshape(A.shape)


def gemm_4bit(
    A: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    out_features: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """out[..., N] = A[..., K] @ W^T (+ bias), W = dequantize_4bit(...) in float32, product in float64."""
    K = A.shape[-1]
    W = dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                        quant_type, (out_features, K), torch.float32)
    out = A.double() @ W.double().t().to(A.device)
    if bias is not None:
        out = out + bias.double()
    return out.to(A.dtype)


# bitsandbytes 0.50.2 multiplies the int32 product by this float32 constant (backends/default/ops.py), not by
# 1/127^2 = 6.2000124e-05: the CPU result is about 1.8e-5 (relative) larger. Its CUDA kernel uses 6.200012e-05.
MM_DEQUANT_CONST = 6.200124e-05
# int8_vectorwise_dequant multiplies by this (float32 1/127).
INT8_DEQUANT_CONST = 7.874015718698502e-3


def int8_threshold(threshold: float, dtype: torch.dtype) -> float:
    """The outlier threshold as bitsandbytes compares it: rounded to A's dtype (double -> float32 -> dtype)."""
    return float(torch.tensor(threshold, dtype=torch.float32).to(dtype))


def int8_vectorwise_quant(A: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise int8 (LLM.int8), rows = all leading dimensions of A.

    With threshold > 0, entries with |A| >= threshold (the threshold rounded to A's dtype, as torch
    compares a Python float with a half tensor) are outliers: they are left out of the row's absmax,
    quantize to 0, and their columns are returned (int64, ascending); every entry of those columns
    is zeroed in q. threshold <= 0 returns no columns (an empty tensor; the Python API returns None).

    row_stats = max |A| per row over the non-outliers (float32; NaN propagates).
    q = round_half_even(A * ((1 / row_stats) * 127)) in float32 steps (torch computes
    ``127.0 / t`` as ``t.reciprocal() * 127.0``); a non-finite product (a zero row: 0 * inf; a row
    whose absmax is below 127 / FLT_MAX, so that the scale overflows; NaN) gives 0, as bitsandbytes'
    float -> int8 conversion does on x86.
    """
    x = A.reshape(-1, A.shape[-1]).float()
    if threshold > 0:
        outliers = x.abs() >= int8_threshold(threshold, A.dtype)
        cols = torch.nonzero(outliers.any(dim=0)).reshape(-1)
        x = torch.where(outliers, torch.zeros_like(x), x)
    else:
        cols = torch.empty(0, dtype=torch.int64, device=A.device)
    row_stats = x.abs().amax(dim=1)
    scale = row_stats.reciprocal() * 127.0
    q = torch.round(x * scale[:, None])
    q = torch.where(torch.isfinite(q), q, torch.zeros_like(q)).to(torch.int8)
    if cols.numel():
        q[:, cols] = 0
    return q.reshape(A.shape), row_stats, cols


def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """int32 [..., N] = int8 A [..., K] @ int8 B [N, K]^T, exact (wrapping modulo 2^32 like int32 sums)."""
    return (A.reshape(-1, A.shape[-1]).long() @ B.long().t()).to(torch.int32).reshape(*A.shape[:-1], B.shape[0])


def int8_mm_dequant(
    A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor, dtype: torch.dtype, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """out = dtype((float(A) * (row_stats[:, None] * col_stats[None, :])) * MM_DEQUANT_CONST (+ float(bias))),
    every step a float32 operation rounded to nearest (never fused), as bitsandbytes' CPU op."""
    out = A.reshape(-1, A.shape[-1]).float() * (row_stats.reshape(-1, 1).float() * col_stats.reshape(1, -1).float())
    out = out * torch.tensor(MM_DEQUANT_CONST, dtype=torch.float32)
    if bias is not None:
        out = out + bias.reshape(1, -1).float()
    return out.to(dtype).reshape(A.shape)


def int8_scaled_mm(
    A: torch.Tensor, B: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor, dtype: torch.dtype,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, dtype, bias), fused."""
    return int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, dtype, bias)
