"""Loads the compiled library and gives every op its fake (meta) kernel and autograd rule.

The schemas live in ``csrc/ops.cpp``; the CPU and CUDA kernels register themselves from
``csrc/cpu`` and ``csrc/cuda``. The fake kernels here let ``torch.compile`` trace the ops without
running them: they only compute output shapes and dtypes.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

try:
    from . import _C  # noqa: F401  (loads libnf4kit ops into torch.ops.nf4kit)

    BACKENDS: tuple[str, ...] = tuple(_C.backends.split(","))
    LOAD_ERROR: Optional[BaseException] = None
except ImportError as exc:  # not built: nf4kit still imports; calling an op says why it can't run
    BACKENDS = ()
    LOAD_ERROR = exc

ops = torch.ops.nf4kit


def _nblocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


if LOAD_ERROR is None:

    @torch.library.register_fake("nf4kit::quantize_4bit")
    def _(A: torch.Tensor, blocksize: int, quant_type: str, nonfinite=None):
        n = A.numel()
        packed = A.new_empty(((n + 1) // 2,), dtype=torch.uint8)
        absmax = A.new_empty((_nblocks(n, blocksize),), dtype=torch.float32)
        return packed, absmax

    @torch.library.register_fake("nf4kit::dequantize_4bit")
    def _(packed, absmax, nested_absmax, nested_code, offset, blocksize: int, nested_blocksize: int,
          quant_type: str, shape: Sequence[int], dtype: torch.dtype):
        return packed.new_empty(tuple(shape), dtype=dtype)

    @torch.library.register_fake("nf4kit::quantize_blockwise")
    def _(A: torch.Tensor, code: torch.Tensor, blocksize: int):
        return (A.new_empty(A.shape, dtype=torch.uint8),
                A.new_empty((_nblocks(A.numel(), blocksize),), dtype=torch.float32))

    @torch.library.register_fake("nf4kit::quantize_nested_absmax")
    def _(absmax: torch.Tensor, offset: torch.Tensor, code: torch.Tensor, blocksize: int):
        return (absmax.new_empty(absmax.shape, dtype=torch.uint8),
                absmax.new_empty((_nblocks(absmax.numel(), blocksize),), dtype=torch.float32))

    @torch.library.register_fake("nf4kit::dequantize_blockwise")
    def _(A, absmax, code, blocksize: int, dtype: torch.dtype):
        return A.new_empty(A.shape, dtype=dtype)

    @torch.library.register_fake("nf4kit::gemm_4bit")
    def _(A, packed, absmax, nested_absmax, nested_code, offset, blocksize: int, nested_blocksize: int,
          quant_type: str, out_features: int, bias):
        return A.new_empty((*A.shape[:-1], out_features))

    @torch.library.register_fake("nf4kit::int8_vectorwise_quant")
    def _(A: torch.Tensor, threshold: float):
        rows = math.prod(A.shape[:-1])
        # The outlier-column count depends on the data, except that threshold <= 0 finds none.
        ncols = torch.library.get_ctx().new_dynamic_size() if threshold > 0 else 0
        return (A.new_empty(A.shape, dtype=torch.int8), A.new_empty((rows,), dtype=torch.float32),
                A.new_empty((ncols,), dtype=torch.int64))

    @torch.library.register_fake("nf4kit::int8_linear_matmul")
    def _(A: torch.Tensor, B: torch.Tensor):
        torch._check(A.dtype == torch.int8 and B.dtype == torch.int8, lambda: "A and B must be int8")
        return A.new_empty((*A.shape[:-1], B.shape[0]), dtype=torch.int32)

    @torch.library.register_fake("nf4kit::int8_mm_dequant")
    def _(A, row_stats, col_stats, dtype: torch.dtype, bias):
        torch._check(A.dtype == torch.int32, lambda: "A must be int32")
        return A.new_empty(A.shape, dtype=dtype)

    @torch.library.register_fake("nf4kit::int8_scaled_mm")
    def _(A, B, row_stats, col_stats, dtype: torch.dtype, bias):
        torch._check(A.dtype == torch.int8 and B.dtype == torch.int8, lambda: "A and B must be int8")
        return A.new_empty((*A.shape[:-1], B.shape[0]), dtype=dtype)

    # gemm_4bit is differentiable in A (and bias): grad_A = grad_out @ W, W dequantized by the
    # fast dequantize kernel in the compute dtype, then one dense matmul. W gets no gradient.
    def _gemm_setup(ctx, inputs, output):
        (A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
         out_features, bias) = inputs
        ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)
        ctx.meta = (blocksize, nested_blocksize, quant_type, out_features, A.shape[-1], A.dtype,
                    bias is not None)

    def _gemm_backward(ctx, grad_out):
        packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
        blocksize, nested_blocksize, quant_type, N, K, dtype, has_bias = ctx.meta
        grad_A = grad_bias = None
        if ctx.needs_input_grad[0]:
            W = ops.dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                    nested_blocksize, quant_type, [N, K], grad_out.dtype)
            grad_A = (grad_out @ W).to(dtype)
        if has_bias and ctx.needs_input_grad[10]:
            grad_bias = grad_out.reshape(-1, N).sum(0)
        return grad_A, None, None, None, None, None, None, None, None, None, grad_bias

    torch.library.register_autograd("nf4kit::gemm_4bit", _gemm_backward, setup_context=_gemm_setup)


def require_ops() -> None:
    """Raise a clear error when the compiled library is missing."""
    if LOAD_ERROR is not None:
        raise RuntimeError(
            "nf4kit's compiled kernels (nf4kit._C) could not be loaded: "
            f"{LOAD_ERROR}. Reinstall with `pip install --no-build-isolation .`."
        )
