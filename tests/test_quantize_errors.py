"""Bad input to the quantize/dequantize API: a clear Python exception of the right type whose
message names the argument, from nf4kit.functional and from the ops' host functions (CPU, and
CUDA when present). Never a crash, a hang or silent garbage."""
import pytest
import torch

import nf4kit.functional as F
from nf4kit import reference as R
from quant_helpers import assert_same_bits, make_input

ops = torch.ops.nf4kit
DYNAMIC_MAP = R.create_dynamic_map()


def other_device(device: str) -> str:
    """A device unlike `device` that really reaches the device checks: 'meta' beside the CPU (the
    functional checks run before any kernel), the CPU beside a GPU."""
    return "meta" if device == "cpu" else "cpu"


# ------------------------------------------------------------------------------------------------
# nf4kit.functional
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.float64, torch.bool])
def test_quantize_4bit_rejects_non_float_input(device, dtype):
    x = torch.ones(64, dtype=dtype, device=device)
    with pytest.raises(ValueError, match=r"A must be float16, bfloat16 or float32, got torch\." + str(dtype)[6:]):
        F.quantize_4bit(x, quant_type="nf4")
    with pytest.raises(ValueError, match="A must be float16"):
        F.quantize_blockwise(x)


def test_quantize_4bit_rejects_non_tensor():
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        F.quantize_4bit([1.0, 2.0])


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64, 64.0, "64"])
def test_quantize_4bit_rejects_unsupported_blocksize(device, blocksize):
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, 64, .*4096\), got"):
        F.quantize_4bit(torch.randn(256, device=device), blocksize=blocksize, quant_type="nf4")


@pytest.mark.parametrize("blocksize", [0, -1, 64.0])
def test_quantize_blockwise_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        F.quantize_blockwise(torch.randn(256), blocksize=blocksize)


@pytest.mark.parametrize("quant_type", ["int4", "NF4", "", None])
def test_quantize_4bit_rejects_unknown_quant_type(device, quant_type):
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        F.quantize_4bit(torch.randn(64, device=device), quant_type=quant_type)


def test_dequantize_4bit_rejects_unknown_quant_type_in_state():
    packed, state = F.quantize_4bit(torch.randn(64), quant_type="nf4")
    state.quant_type = "af4"
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4', got 'af4'"):
        F.dequantize_4bit(packed, state)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 64)])
def test_quantize_rejects_empty_tensor(device, shape):
    x = torch.empty(shape, device=device)
    with pytest.raises(ValueError, match=r"A must not be empty \(shape"):
        F.quantize_4bit(x, quant_type="nf4")
    with pytest.raises(ValueError, match="A must not be empty"):
        F.quantize_blockwise(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_4bit_non_finite_input(device, dtype, bad):
    """NaN/Inf raise by default (they would silently corrupt the whole block); check_finite=False
    quantizes anyway, exactly as the reference (and bitsandbytes) does."""
    x = make_input((5, 64), dtype, device)
    x[3, 17] = bad
    with pytest.raises(ValueError, match=r"A contains NaN or Inf \(first in block 3\).*check_finite=False"):
        F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    with pytest.raises(ValueError, match="A contains NaN or Inf"):
        F.quantize_4bit(x, blocksize=64, quant_type="fp4", compress_statistics=True)
    # the caller's buffers are left as they were
    out = torch.full((160, 1), 7, dtype=torch.uint8, device=device)
    absmax = torch.full((5,), 3.0, device=device)
    with pytest.raises(ValueError, match="A contains NaN or Inf"):
        F.quantize_4bit(x, absmax=absmax, out=out, blocksize=64, quant_type="nf4")
    assert bool((out == 7).all()) and bool((absmax == 3.0).all())
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", check_finite=False)
    ref_packed, ref_absmax = R.quantize_4bit(x.cpu(), 64, "nf4")
    assert_same_bits(packed.reshape(-1), ref_packed)
    assert_same_bits(state.absmax, ref_absmax)
    # Only the poisoned block is affected.
    out = F.dequantize_4bit(packed, state)
    assert bool(torch.isfinite(out[[0, 1, 2, 4]]).all())


def test_dequantize_4bit_rejects_packed_too_small(device):
    packed, state = F.quantize_4bit(torch.randn(10, 64, device=device), quant_type="nf4")
    with pytest.raises(ValueError, match=r"A \(the packed weights\) is too small for quant_state.shape \(10, 64\): "
                                         r"it holds 319 bytes, 320 are needed"):
        F.dequantize_4bit(packed[:-1], state)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_dequantize_4bit_rejects_absmax_of_wrong_length(device, nested):
    packed, state = F.quantize_4bit(torch.randn(10, 64, device=device), blocksize=32, quant_type="nf4",
                                    compress_statistics=nested)
    state.absmax = state.absmax[:-1]
    with pytest.raises(ValueError, match=r"quant_state.absmax has 19 values, expected 20 \(one per block of 32"):
        F.dequantize_4bit(packed, state)


def test_dequantize_4bit_rejects_nested_absmax_of_wrong_length():
    packed, state = F.quantize_4bit(torch.randn(300, 64), blocksize=32, quant_type="nf4", compress_statistics=True)
    state.state2.absmax = torch.cat([state.state2.absmax, state.state2.absmax])
    with pytest.raises(ValueError, match="quant_state.state2.absmax has 6 values, expected 3"):
        F.dequantize_4bit(packed, state)


def test_dequantize_4bit_rejects_absmax_of_wrong_dtype():
    packed, state = F.quantize_4bit(torch.randn(64), quant_type="nf4")
    state.absmax = state.absmax.half()
    with pytest.raises(ValueError, match="quant_state.absmax must be float32, got torch.float16"):
        F.dequantize_4bit(packed, state)


@pytest.mark.parametrize("which", ["absmax", "state2.absmax", "offset"])
def test_dequantize_4bit_rejects_state_on_another_device(device, which):
    packed, state = F.quantize_4bit(torch.randn(10, 64, device=device), quant_type="nf4", compress_statistics=True)
    elsewhere = other_device(device)
    if which == "absmax":
        state.absmax = state.absmax.to(elsewhere)
    elif which == "state2.absmax":
        state.state2.absmax = state.state2.absmax.to(elsewhere)
    else:
        state.offset = state.offset.to(elsewhere)
    with pytest.raises(ValueError, match=rf"A \(packed weights\) is on {device}.* but quant_state.{which} is on {elsewhere}"):
        F.dequantize_4bit(packed, state)


def test_dequantize_blockwise_rejects_absmax_on_another_device(device):
    q, state = F.quantize_blockwise(torch.randn(10, 64, device=device), blocksize=64)
    state.absmax = state.absmax.to(other_device(device))
    with pytest.raises(ValueError, match=f"A is on {device}.* but absmax is on {other_device(device)}"):
        F.dequantize_blockwise(q, state)


def test_dequantize_4bit_rejects_out_of_another_dtype(device):
    """A QuantState made for one dtype used to fill an `out` of another."""
    packed, state = F.quantize_4bit(torch.randn(10, 64, device=device, dtype=torch.float16), quant_type="nf4")
    out = torch.empty(10, 64, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match=r"out must have dtype torch.float16 and 640 elements \(the quant_state's\), "
                                         r"got torch.bfloat16 with 640"):
        F.dequantize_4bit(packed, state, out=out)
    with pytest.raises(ValueError, match="out must have dtype torch.float16 and 640 elements"):
        F.dequantize_4bit(packed, state, out=torch.empty(10, 63, dtype=torch.float16, device=device))


def test_dequantize_4bit_rejects_state_with_bad_dtype():
    packed, state = F.quantize_4bit(torch.randn(64), quant_type="nf4")
    state.dtype = torch.float64
    with pytest.raises(ValueError, match="quant_state.dtype must be float16, bfloat16 or float32, got torch.float64"):
        F.dequantize_4bit(packed, state)


def test_dequantize_4bit_needs_state_or_absmax_and_out():
    packed, state = F.quantize_4bit(torch.randn(64), quant_type="nf4")
    with pytest.raises(ValueError, match="needs quant_state, or both absmax and out"):
        F.dequantize_4bit(packed, absmax=state.absmax)
    with pytest.raises(TypeError, match="quant_state must be a nf4kit QuantState, got dict"):
        F.dequantize_4bit(packed, state.as_dict())


def test_dequantize_blockwise_rejects_bad_codes_and_lengths():
    q, state = F.quantize_blockwise(torch.randn(1000), blocksize=256)
    with pytest.raises(ValueError, match="A must be uint8, got torch.float32"):
        F.dequantize_blockwise(q.float(), state)
    with pytest.raises(ValueError, match="absmax has 3 values, expected 4"):
        F.dequantize_blockwise(q, absmax=state.absmax[:3], blocksize=256)
    with pytest.raises(ValueError, match="needs quant_state or absmax"):
        F.dequantize_blockwise(q)


def test_quantize_blockwise_rejects_bad_code():
    with pytest.raises(ValueError, match="code must be 256 float32 values, got 255 of torch.float32"):
        F.quantize_blockwise(torch.randn(64), code=torch.linspace(-1, 1, 255))
    with pytest.raises(ValueError, match="code must be 256 float32 values, got 256 of torch.float64"):
        F.quantize_blockwise(torch.randn(64), code=torch.linspace(-1, 1, 256, dtype=torch.float64))


def test_from_dict_rejects_malformed_state_dicts():
    _, state = F.quantize_4bit(torch.randn(64), quant_type="nf4")
    d = state.as_dict(packed=True)
    with pytest.raises(ValueError, match="neither a packed 'quant_state.bitsandbytes__\\*' entry nor quant_type"):
        F.QuantState.from_dict({"absmax": d["absmax"]}, device="cpu")
    with pytest.raises(ValueError, match="unexpected keys \\['bogus'\\]"):
        F.QuantState.from_dict({**d, "bogus": torch.zeros(1)}, device="cpu")
    with pytest.raises(ValueError, match="exactly one quant_state entry"):
        F.QuantState.from_dict({**d, "quant_state.bitsandbytes__fp4": d["quant_state.bitsandbytes__nf4"]},
                               device="cpu")


# ------------------------------------------------------------------------------------------------
# The ops' host functions (TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError)
# ------------------------------------------------------------------------------------------------

def op_cases(device):
    """(name, exception type, message pattern, call) for each bad argument of each op."""
    x = torch.randn(3, 70, device=device)
    packed, absmax = ops.quantize_4bit(x, 64, "nf4")
    offset = absmax.mean().reshape(1)
    absmax_q, nested = ops.quantize_blockwise(absmax - offset, DYNAMIC_MAP.to(device), 256)
    code = DYNAMIC_MAP.to(device)
    q8, absmax8 = ops.quantize_blockwise(x, code, 64)

    def deq(packed=packed, absmax=absmax, nested_absmax=None, nested_code=None, off=None, blocksize=64,
            nested_blocksize=256, quant_type="nf4", shape=(3, 70), dtype=torch.float16):
        return lambda: ops.dequantize_4bit(packed, absmax, nested_absmax, nested_code, off, blocksize,
                                           nested_blocksize, quant_type, list(shape), dtype)

    nested_ok = dict(absmax=absmax_q, nested_absmax=nested, nested_code=code, off=offset)
    return [
        ("q4 int input", TypeError, "A must be float16, bfloat16 or float32, got Long",
         lambda: ops.quantize_4bit(x.long(), 64, "nf4")),
        ("q4 float64 input", TypeError, "A must be float16, bfloat16 or float32, got Double",
         lambda: ops.quantize_4bit(x.double(), 64, "nf4")),
        ("q4 blocksize", ValueError, "blocksize must be one of 32, 64, .*, got 48",
         lambda: ops.quantize_4bit(x, 48, "nf4")),
        ("q4 quant_type", ValueError, "quant_type must be 'nf4' or 'fp4', got 'int4'",
         lambda: ops.quantize_4bit(x, 64, "int4")),
        ("q4 empty", ValueError, "A must not be empty", lambda: ops.quantize_4bit(x[:0], 64, "nf4")),
        ("q4 nonfinite dtype", TypeError, "nonfinite must be Int, got Float",
         lambda: ops.quantize_4bit(x, 64, "nf4", torch.zeros(1, device=device))),
        ("q4 nonfinite empty", ValueError, "nonfinite must hold at least one element",
         lambda: ops.quantize_4bit(x, 64, "nf4", torch.zeros(0, dtype=torch.int32, device=device))),
        ("dq4 blocksize", ValueError, "blocksize must be one of", deq(blocksize=100)),
        ("dq4 quant_type", ValueError, "quant_type must be 'nf4' or 'fp4'", deq(quant_type="fp8")),
        ("dq4 dtype", TypeError, "dtype must be float16, bfloat16 or float32, got Int", deq(dtype=torch.int32)),
        ("dq4 negative shape", ValueError, "shape must not have negative dimensions", deq(shape=(-3, 70))),
        ("dq4 packed too small", ValueError, r"packed holds 105 bytes, too few for shape \[3, 71\] \(107 needed\)",
         deq(shape=(3, 71))),
        ("dq4 absmax length", ValueError, r"absmax has 5 elements, expected 4 \(one per block", deq(absmax=torch.cat([absmax, absmax[:1]]))),
        ("dq4 absmax dtype", TypeError, "absmax must be float32, or uint8 codes", deq(absmax=absmax.half())),
        ("dq4 nested missing", ValueError, "nested_absmax, nested_code and offset are required",
         deq(absmax=absmax_q, nested_absmax=nested, nested_code=code)),
        ("dq4 nested_absmax length", ValueError, "nested_absmax has 2 elements, expected 1",
         deq(**{**nested_ok, "nested_absmax": torch.cat([nested, nested])})),
        ("dq4 nested_code length", ValueError, "nested_code has 255 elements, expected 256",
         deq(**{**nested_ok, "nested_code": code[:255]})),
        ("dq4 nested_absmax dtype", TypeError, "nested_absmax must be Float", deq(**{**nested_ok, "nested_absmax": nested.half()})),
        ("dq4 offset", ValueError, "offset has 2 elements, expected 1", deq(**{**nested_ok, "off": offset.repeat(2)})),
        ("dq4 nested_blocksize", ValueError, "nested_blocksize must be positive", deq(**nested_ok, nested_blocksize=0)),
        ("dq4 nested args with float absmax", ValueError, "only for uint8 \\(nested\\) absmax",
         deq(nested_absmax=nested, nested_code=code, off=offset)),
        ("q8 int input", TypeError, "A must be float16, bfloat16 or float32", lambda: ops.quantize_blockwise(x.int(), code, 64)),
        ("q8 empty", ValueError, "A must not be empty", lambda: ops.quantize_blockwise(x[:0], code, 64)),
        ("q8 blocksize", ValueError, "blocksize must be positive, got 0", lambda: ops.quantize_blockwise(x, code, 0)),
        ("q8 code length", ValueError, "code has 16 elements, expected 256", lambda: ops.quantize_blockwise(x, code[:16], 64)),
        ("q8 code dtype", TypeError, "code must be Float, got Half", lambda: ops.quantize_blockwise(x, code.half(), 64)),
        ("dq8 A dtype", TypeError, "A must be Byte, got Float",
         lambda: ops.dequantize_blockwise(x, absmax8, code, 64, torch.float32)),
        ("dq8 absmax length", ValueError, "absmax has 3 elements, expected 4",
         lambda: ops.dequantize_blockwise(q8, absmax8[:3], code, 64, torch.float32)),
        ("dq8 blocksize", ValueError, "blocksize must be positive",
         lambda: ops.dequantize_blockwise(q8, absmax8, code, -64, torch.float32)),
        ("dq8 dtype", TypeError, "dtype must be float16, bfloat16 or float32",
         lambda: ops.dequantize_blockwise(q8, absmax8, code, 64, torch.int8)),
        ("dq8 code length", ValueError, "code has 255 elements, expected 256",
         lambda: ops.dequantize_blockwise(q8, absmax8, code[1:], 64, torch.float32)),
    ]


OP_CASE_NAMES = [c[0] for c in op_cases("cpu")]


@pytest.mark.parametrize("case", OP_CASE_NAMES)
def test_op_rejects_bad_argument(device, case):
    _, exc, pattern, call = next(c for c in op_cases(device) if c[0] == case)
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.cuda
def test_op_rejects_mixed_devices(device):
    """Inputs on two devices: the host function names the stray argument (dispatch goes to the
    GPU kernel; on a CPU-only machine there is no second real device to try)."""
    if device != "cuda":
        pytest.skip("needs a GPU")
    x = torch.randn(3, 70, device="cuda")
    packed, absmax = ops.quantize_4bit(x, 64, "nf4")
    with pytest.raises((ValueError, RuntimeError), match="absmax"):
        ops.dequantize_4bit(packed, absmax.cpu(), None, None, None, 64, 256, "nf4", [3, 70], torch.float16)
    with pytest.raises((ValueError, RuntimeError), match="code"):
        ops.quantize_blockwise(x, DYNAMIC_MAP, 64)
    q8, absmax8 = ops.quantize_blockwise(x, DYNAMIC_MAP.cuda(), 64)
    with pytest.raises((ValueError, RuntimeError), match="absmax"):
        ops.dequantize_blockwise(q8, absmax8.cpu(), DYNAMIC_MAP.cuda(), 64, torch.float16)
    # quantize_4bit's flag may be pinned host memory (the kernel writes it directly), not pageable
    with pytest.raises(ValueError, match="nonfinite is a CPU tensor that is not pinned"):
        ops.quantize_4bit(x, 64, "nf4", torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="A must be a CUDA tensor, got one on cpu"):  # the flag picks CUDA
        ops.quantize_4bit(x.cpu(), 64, "nf4", torch.zeros(1, dtype=torch.int32, device="cuda"))
