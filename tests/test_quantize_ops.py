"""torch.ops.nf4kit quantize/dequantize ops against nf4kit.reference, bit for bit, on every device.

Outputs start poisoned (NF4KIT_POISON=1, set by conftest), so an element a kernel forgets to write
shows up here. On CUDA the op is also compared with the CPU op.
"""
import math

import pytest
import torch

from nf4kit import reference as R
from quant_helpers import BLOCKSIZES, FLOAT_DTYPES, QUANT_TYPES, assert_same_bits, make_input, shapes_for

ops = torch.ops.nf4kit
DYNAMIC_MAP = R.create_dynamic_map()


def nested_absmax_args(absmax: torch.Tensor, nested_blocksize: int = 256):
    """absmax quantized the way compress_statistics does it: (uint8 codes, nested absmax, code, offset)."""
    offset = absmax.mean()
    q, nested = R.quantize_blockwise(absmax - offset, DYNAMIC_MAP, nested_blocksize)
    return q, nested, DYNAMIC_MAP.clone(), offset.reshape(1)


def on(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def check_quantize_4bit(x: torch.Tensor, blocksize: int, quant_type: str, device: str) -> None:
    packed, absmax = ops.quantize_4bit(x.to(device), blocksize, quant_type)
    ref_packed, ref_absmax = R.quantize_4bit(x.cpu(), blocksize, quant_type)
    what = f"{quant_type} bs={blocksize} {x.dtype} shape={tuple(x.shape)} on {device}"
    assert packed.device.type == absmax.device.type == torch.device(device).type
    assert_same_bits(packed, ref_packed, "packed " + what)
    assert_same_bits(absmax, ref_absmax, "absmax " + what)
    if device != "cpu":
        cpu_packed, cpu_absmax = ops.quantize_4bit(x.cpu(), blocksize, quant_type)
        assert_same_bits(packed, cpu_packed, "packed vs CPU op " + what)
        assert_same_bits(absmax, cpu_absmax, "absmax vs CPU op " + what)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_4bit(device, dtype, quant_type, blocksize):
    for i, shape in enumerate(shapes_for(blocksize)):
        check_quantize_4bit(make_input(shape, dtype, seed=i), blocksize, quant_type, device)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_4bit(device, quant_type, blocksize, nested):
    """Random packed bytes (every code, FP4's -0.0 included) and random absmax, every output dtype."""
    g = torch.Generator().manual_seed(blocksize)
    for shape in shapes_for(blocksize) + [(3 * 256 * blocksize // 32 + 5,)]:
        n = math.prod(shape)
        nblocks = -(-n // blocksize)
        packed = torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.uint8)
        absmax = torch.rand(nblocks, generator=g) * 4
        args = nested_absmax_args(absmax) if nested else (absmax, None, None, None)
        for dtype in FLOAT_DTYPES:
            call = (*args, blocksize, 256, quant_type, list(shape), dtype)
            out = ops.dequantize_4bit(*on(device, packed, *call))
            ref = R.dequantize_4bit(packed, *call)
            what = f"{quant_type} bs={blocksize} nested={nested} {dtype} shape={shape} on {device}"
            assert_same_bits(out, ref, what)
            if device != "cpu":
                assert_same_bits(out, ops.dequantize_4bit(packed, *call), "vs CPU op " + what)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_4bit_extreme_absmax(device, quant_type):
    """Products that overflow fp16/bf16 to inf, land in their subnormals, or are float32 subnormals;
    NaN and inf absmax; every code against each."""
    absmax = torch.tensor([1e5, 7e4, 65504.0, 3e38, 1e-5, 6e-8, 1e-39, 1e-45, 0.0, float("nan"), float("inf"), 1.0])
    blocksize = 32
    codes = torch.arange(32, dtype=torch.uint8) % 16
    packed = ((codes[0::2] << 4) | codes[1::2]).repeat(absmax.numel())
    n = blocksize * absmax.numel()
    for dtype in FLOAT_DTYPES:
        call = (absmax, None, None, None, blocksize, 256, quant_type, [n], dtype)
        assert_same_bits(ops.dequantize_4bit(*on(device, packed, *call)), R.dequantize_4bit(packed, *call),
                         f"{quant_type} {dtype}")


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cpu_vector_paths_agree(monkeypatch, dtype, quant_type):
    """The CPU kernels' AVX2 path and the baseline path (NF4KIT_CPU_NO_AVX2=1) give the same bits
    (and the reference's); on machines without AVX2 both runs take the baseline path."""
    x = make_input((37, 301), dtype)
    g = torch.Generator().manual_seed(3)
    packed = torch.randint(0, 256, (x.numel() // 2 + 1,), generator=g, dtype=torch.uint8)
    results = []
    for off in ("0", "1"):
        monkeypatch.setenv("NF4KIT_CPU_NO_AVX2", off)
        for blocksize in (32, 64, 4096):
            p, a = ops.quantize_4bit(x, blocksize, quant_type)
            absmax = torch.rand(-(-x.numel() // blocksize), generator=torch.Generator().manual_seed(blocksize))
            call = (absmax, None, None, None, blocksize, 256, quant_type, [x.numel()], dtype)
            d = ops.dequantize_4bit(packed, *call)
            assert_same_bits(p, R.quantize_4bit(x, blocksize, quant_type)[0], f"quantize NO_AVX2={off}")
            assert_same_bits(d, R.dequantize_4bit(packed, *call), f"dequantize NO_AVX2={off}")
            results.append((p, a, d))
    half = len(results) // 2
    for (p0, a0, d0), (p1, a1, d1) in zip(results[:half], results[half:]):
        assert_same_bits(p0, p1)
        assert_same_bits(a0, a1)
        assert_same_bits(d0, d1)


def test_dequantize_4bit_fp4_negative_zero_is_positive_zero(device):
    packed = torch.tensor([0x88, 0x08, 0x80], dtype=torch.uint8)
    out = ops.dequantize_4bit(*on(device, packed, torch.tensor([2.0])), None, None, None, 32, 256, "fp4", [6],
                              torch.float32)
    assert_same_bits(out, torch.zeros(6), "FP4 code 8")


def test_dequantize_4bit_nested_blocksize(device):
    """A nested blocksize other than 256 indexes nested_absmax by j // nested_blocksize."""
    g = torch.Generator().manual_seed(1)
    n, blocksize = 64 * 40, 64
    packed = torch.randint(0, 256, (n // 2,), generator=g, dtype=torch.uint8)
    absmax = torch.rand(n // blocksize, generator=g)
    args = nested_absmax_args(absmax, nested_blocksize=16)
    call = (*args, blocksize, 16, "nf4", [n], torch.float16)
    assert_same_bits(ops.dequantize_4bit(*on(device, packed, *call)), R.dequantize_4bit(packed, *call))


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16, torch.float32, torch.int8])
def test_dequantize_4bit_packed_storage_dtype(device, storage):
    """The packed bytes may arrive viewed as another dtype (quant_storage); the bytes are what count."""
    x = make_input((16, 64), torch.float16)
    packed, absmax = R.quantize_4bit(x, 64, "nf4")
    call = (absmax, None, None, None, 64, 256, "nf4", [16, 64], torch.float16)
    out = ops.dequantize_4bit(*on(device, packed.view(storage), *call))
    assert_same_bits(out, R.dequantize_4bit(packed, *call))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_4bit_special_values(device, dtype, quant_type):
    """NaN, +-Inf, all-zero blocks, subnormal blocks (full and partial), values at the block max."""
    cases = []
    x = torch.randn(5 * 64 + 7)
    x[3] = float("nan")          # block 0: NaN absmax, NaN bucket
    x[64 + 9] = float("inf")     # block 1: inf absmax, inf * 0 = NaN
    x[128 + 1] = -float("inf")   # block 2
    x[192:256] = 0.0             # block 3: all zero
    x[320:] = 0.0                # the partial last block: all zero
    cases.append(x)
    tiny = torch.randn(3 * 64 + 11) * 1e-39  # subnormal absmax: full blocks keep it, the partial one clamps
    cases.append(tiny)
    y = torch.randn(2 * 64 + 1)
    y[-1] = float("nan")          # NaN in the partial block
    cases.append(y)
    for x in cases:
        check_quantize_4bit(x.to(dtype), 64, quant_type, device)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_4bit_midpoint_ties(device, quant_type):
    """Values exactly on a midpoint (block absmax 1) go to the lower code, as the oracle does."""
    mids = R.midpoints_4bit(quant_type)
    block = torch.cat([mids, -mids, torch.nextafter(mids, torch.full_like(mids, 2.0)), torch.tensor([1.0, 0.0, -0.0])])
    x = torch.cat([block, torch.zeros(64 - block.numel())])
    x = torch.cat([x, x[:40]])  # and once more in a partial block (x / absmax there)
    check_quantize_4bit(x, 64, quant_type, device)
    packed, _ = ops.quantize_4bit(x.to(device), 64, quant_type)
    order = R.FP4_ORDER if quant_type == "fp4" else R.NF4_ORDER
    codes = torch.stack([packed.cpu() >> 4, packed.cpu() & 15], 1).reshape(-1)[:15].long()
    assert torch.equal(codes, order[:15]), "a value on the midpoint k/k+1 must take sorted code k"


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_4bit_noncontiguous(device, quant_type):
    base = make_input((96, 130), torch.bfloat16, device)
    for x in (base.t(), base[:, ::2], base[1::3, 5:77]):
        assert not x.is_contiguous()
        got = ops.quantize_4bit(x, 64, quant_type)
        want = ops.quantize_4bit(x.contiguous(), 64, quant_type)
        assert_same_bits(got[0], want[0])
        assert_same_bits(got[1], want[1])
        check_quantize_4bit(x, 64, quant_type, device)


BLOCKSIZES_8BIT = (64, 100, 256, 1024, 4096)


@pytest.mark.parametrize("blocksize", BLOCKSIZES_8BIT)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_blockwise(device, dtype, blocksize):
    for i, shape in enumerate(shapes_for(blocksize)):
        x = make_input(shape, dtype, seed=i)
        q, absmax = ops.quantize_blockwise(x.to(device), DYNAMIC_MAP.to(device), blocksize)
        ref_q, ref_absmax = R.quantize_blockwise(x, DYNAMIC_MAP, blocksize)
        what = f"bs={blocksize} {dtype} shape={shape} on {device}"
        assert_same_bits(q, ref_q, "codes " + what)
        assert_same_bits(absmax, ref_absmax, "absmax " + what)
        if device != "cpu":
            cq, ca = ops.quantize_blockwise(x, DYNAMIC_MAP, blocksize)
            assert_same_bits(q, cq, "codes vs CPU op " + what)
            assert_same_bits(absmax, ca, "absmax vs CPU op " + what)


def test_quantize_blockwise_special_values_and_codes(device):
    """Zero blocks (absmax 0: 0 * inf = NaN -> grid point 0), NaN, Inf, and codes other than the
    dynamic map (an unsigned one, a linear one, one with repeated values)."""
    x = torch.randn(6 * 64 + 3)
    x[64:128] = 0.0
    x[130] = float("nan")
    x[200] = float("inf")
    x[-3:] = 0.0
    codes = [
        DYNAMIC_MAP,
        R.create_dynamic_map(signed=False),
        torch.linspace(-1, 1, 256),
        torch.cat([torch.full((100,), -0.5), torch.linspace(-0.4, 1, 156)]),
    ]
    for code in codes:
        for v in (x, torch.rand(1000) - 0.2):
            q, absmax = ops.quantize_blockwise(v.to(device), code.to(device), 64)
            ref_q, ref_absmax = R.quantize_blockwise(v, code, 64)
            assert_same_bits(q, ref_q)
            assert_same_bits(absmax, ref_absmax)


@pytest.mark.parametrize("blocksize", BLOCKSIZES_8BIT)
def test_dequantize_blockwise(device, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    for shape in shapes_for(blocksize):
        q = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        absmax = torch.rand(-(-math.prod(shape) // blocksize), generator=g) * 3
        for dtype in FLOAT_DTYPES:
            out = ops.dequantize_blockwise(*on(device, q, absmax, DYNAMIC_MAP), blocksize, dtype)
            ref = R.dequantize_blockwise(q, absmax, DYNAMIC_MAP, blocksize, dtype)
            assert_same_bits(out, ref, f"bs={blocksize} {dtype} shape={shape} on {device}")


# ------------------------------------------------------------------------------------------------
# quantize_4bit's NaN/Inf flag
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["device", "pinned"])
@pytest.mark.parametrize("blocksize", [32, 64, 1024, 4096])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_4bit_nonfinite_flag(device, dtype, blocksize, where):
    """The flag is set by a NaN or inf in any block (first, middle, the partial last one), never by
    finite input, and never cleared; the outputs are those of the call without a flag."""
    if where == "pinned" and device == "cpu":
        pytest.skip("pinned host memory is the GPU kernel's form of the flag")
    n = 5 * 4096 + 2 * blocksize + 7  # several chunks or large blocks, a partial last block
    x = make_input((n,), dtype, seed=blocksize).to(device)

    def new_flag(value):
        f = torch.full((1,), value, dtype=torch.int32)
        return f.pin_memory() if where == "pinned" else f.to(device)

    for quant_type in QUANT_TYPES:
        flag = new_flag(0)
        got = ops.quantize_4bit(x, blocksize, quant_type, flag)
        want = ops.quantize_4bit(x, blocksize, quant_type)
        if device != "cpu":
            torch.cuda.synchronize()
        assert int(flag[0]) == 0, f"{quant_type} bs={blocksize}: finite input set the flag"
        for g, w in zip(got, want):
            assert_same_bits(g, w, f"{quant_type} bs={blocksize} with and without the flag")
        flag = new_flag(1)
        ops.quantize_4bit(x, blocksize, quant_type, flag)
        if device != "cpu":
            torch.cuda.synchronize()
        assert int(flag[0]) == 1, "the kernel cleared a set flag"
    for pos, bad in [(0, float("nan")), (3 * 4096 + 5, float("inf")), (n - 1, -float("inf")), (n // 2, float("nan"))]:
        y = x.clone()
        y[pos] = bad
        flag = new_flag(0)
        ops.quantize_4bit(y, blocksize, "nf4", flag)
        if device != "cpu":
            torch.cuda.synchronize()
        assert int(flag[0]) == 1, f"bs={blocksize}: {bad} at {pos} of {n} did not set the flag"


# ------------------------------------------------------------------------------------------------
# opcheck: schema, fake (meta) kernel, dispatch and autograd registration agree with the kernels
# ------------------------------------------------------------------------------------------------

def opcheck_cases(device):
    x = torch.randn(3, 70, device=device, dtype=torch.float16)
    packed, absmax = ops.quantize_4bit(x, 64, "nf4")
    q8, nested, code, offset = on(device, *nested_absmax_args(absmax.cpu()))
    bq, babsmax = ops.quantize_blockwise(x, code, 128)
    return [
        (ops.quantize_4bit.default, (x, 64, "nf4")),
        (ops.quantize_4bit.default, (x.float(), 32, "fp4")),
        (ops.quantize_4bit.default, (x, 64, "nf4", torch.zeros(1, dtype=torch.int32, device=device))),
        (ops.dequantize_4bit.default, (packed, absmax, None, None, None, 64, 256, "nf4", [3, 70], torch.bfloat16)),
        (ops.dequantize_4bit.default, (packed, q8, nested, code, offset, 64, 256, "fp4", [210], torch.float32)),
        (ops.quantize_blockwise.default, (x, code, 128)),
        (ops.dequantize_blockwise.default, (bq, babsmax, code, 128, torch.float16)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(device, case):
    op, args = opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------------------
# 64-bit indexing: more than 2^31 elements (GPU only: the CPU machine in CI is too small)
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.cuda
def test_more_than_2_pow_31_elements(device):
    if device != "cuda":
        pytest.skip("GPU only: 2^31 elements are too many for the CPU machine in CI")
    blocksize = 64
    n = 2**31 + 3 * blocksize + 5  # odd, ends in a partial block
    x = torch.randn(n, device=device, dtype=torch.float16)
    packed, absmax = ops.quantize_4bit(x, blocksize, "nf4")
    # Blocks are independent: the reference on a block-aligned slice gives that slice's bytes.
    for start in (0, (2**31 // blocksize - 2) * blocksize):
        sl = x[start:].cpu() if start else x[: 4 * blocksize].cpu()
        ref_p, ref_a = R.quantize_4bit(sl, blocksize, "nf4")
        b0 = start // blocksize
        assert_same_bits(packed[start // 2: start // 2 + ref_p.numel()], ref_p)
        assert_same_bits(absmax[b0: b0 + ref_a.numel()], ref_a)
    out = ops.dequantize_4bit(packed, absmax, None, None, None, blocksize, 256, "nf4", [n], torch.float16)
    tail = (2**31 // blocksize - 2) * blocksize
    ref = R.dequantize_4bit(packed[tail // 2:].cpu(), absmax[tail // blocksize:].cpu(), None, None, None, blocksize,
                            256, "nf4", [n - tail], torch.float16)
    assert_same_bits(out[tail:], ref)
