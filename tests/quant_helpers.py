"""Shared by the quantization tests: input makers, shape lists and the bit-for-bit comparison."""
from __future__ import annotations

import math

import torch

from conftest import bits

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def shapes_for(blocksize: int) -> list[tuple[int, ...]]:
    """The awkward shapes every 4-bit test covers: one element, odd counts, a count that is not a
    multiple of blocksize, 1xN, Nx1, a 3-D tensor, and several whole blocks."""
    return [
        (1,),
        (7,),
        (blocksize + 1,),
        (1, 2 * blocksize + 33),
        (blocksize + 17, 1),
        (3, 5, blocksize // 4 + 3),
        (4, blocksize),
    ]


def make_input(shape, dtype, device="cpu", seed: int = 0) -> torch.Tensor:
    """Gaussian values with the cases quantizers get wrong mixed in: exact zeros, a zero block at
    the start, values at the block maximum of both signs, tiny (subnormal-range) values."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = torch.randn(n, generator=g, dtype=torch.float32) * 3.0
    if n > 300:
        x[:32] = 0.0  # an all-zero block (blocksize 32), a zero-led one otherwise
    if n > 8:
        x[-2] = 0.0
        x[-3] = -x[-4].abs() * 10  # the last block's absmax, negative
        x[-5] = 1e-30
    return x.to(dtype).reshape(shape).to(device)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "", zeros_equal: bool = False) -> None:
    """Equal dtype, shape and bits; NaNs compare equal to NaNs (their payload may differ), and with
    ``zeros_equal`` -0.0 to +0.0."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if zeros_equal:
        actual, expected = actual + 0.0, expected + 0.0  # -0.0 + 0.0 = +0.0; every other value unchanged
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.dtype.is_floating_point:
        nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
        assert torch.equal(nan_a, nan_e), f"{what}: NaN at different places"
        a = bits(torch.where(nan_a, torch.zeros_like(actual), actual))
        e = bits(torch.where(nan_e, torch.zeros_like(expected), expected))
    else:
        a, e = actual, expected
    mismatch = (a != e).reshape(-1)
    if bool(mismatch.any()):
        i = int(mismatch.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(mismatch.sum())} of {mismatch.numel()} elements differ, first at flat index {i}: "
            f"{actual.reshape(-1)[i].item()!r} != {expected.reshape(-1)[i].item()!r}")
