"""nf4kit.functional against bitsandbytes.functional 0.50.2, end to end, bit for bit on the CPU:
quantize_4bit / dequantize_4bit / quantize_blockwise / dequantize_blockwise, QuantState's state-dict
form (as_dict, from_dict, the packed JSON bytes), loading each library's state in the other,
QuantState.to and ==, quant_storage, and the memory a nested NF4 weight takes.
"""
import math

import pytest
import torch

import nf4kit.functional as F
from nf4kit import reference as R
from quant_helpers import BLOCKSIZES, FLOAT_DTYPES, QUANT_TYPES, assert_same_bits, make_input

bnb_functional = pytest.importorskip("bitsandbytes.functional")

STORAGES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
# The state-dict keys beside the weight (FORMAT.md), plain and nested.
KEYS_PLAIN = {"absmax", "quant_map", "quant_state.bitsandbytes__{}"}
KEYS_NESTED = KEYS_PLAIN | {"nested_absmax", "nested_quant_map"}


def storage_shapes(blocksize):
    """Shapes whose packed byte count divides by 4, so every quant_storage works in bitsandbytes:
    odd counts, 1xN, Nx1, rows straddling blocks, whole blocks. (Rows whose length is a multiple
    of 16 but not of blocksize are left out: bitsandbytes' CPU dequantize gets them wrong, see
    test_reference.py::test_bnb_cpu_dequantize_bug_rows_straddling_blocks.)"""
    return [(3, 5), (1, 2 * blocksize + 8), (2 * blocksize + 8, 1), (4, 2 * blocksize + 10), (2, 2 * blocksize)]


def assert_state_dicts_equal(ours: dict, theirs: dict, what: str):
    assert set(ours) == set(theirs), what
    for key in theirs:
        assert_same_bits(ours[key], theirs[key], f"{key} {what}")


def check_4bit_against_bnb(x, blocksize, quant_type, nested, storage):
    what = f"{quant_type} bs={blocksize} {x.dtype} nested={nested} storage={storage} shape={tuple(x.shape)}"
    kw = dict(blocksize=blocksize, compress_statistics=nested, quant_type=quant_type, quant_storage=storage)
    b_packed, b_state = bnb_functional.quantize_4bit(x, **kw)
    packed, state = F.quantize_4bit(x, **kw)
    assert_same_bits(packed, b_packed, "packed " + what)
    ours, theirs = state.as_dict(packed=True), b_state.as_dict(packed=True)
    want_keys = {k.format(quant_type) for k in (KEYS_NESTED if nested else KEYS_PLAIN)}
    assert set(ours) == want_keys, what
    assert_state_dicts_equal(ours, theirs, what)  # the JSON bytes included
    assert state.as_dict() .keys() == b_state.as_dict().keys()
    out = F.dequantize_4bit(packed, state)
    b_out = bnb_functional.dequantize_4bit(b_packed, b_state)
    assert out.shape == x.shape, what
    # bitsandbytes returns some shapes as [1, n] or transposed, and FP4 code 8 as -0.0 on some
    # paths (see test_reference.py): compare the values.
    assert_same_bits(out.reshape(-1), b_out.reshape(-1), "dequantized " + what, zeros_equal=True)
    ref = R.dequantize_4bit(*F_args(packed, state))
    assert_same_bits(out, ref.reshape(out.shape), "dequantized vs reference " + what)


def F_args(packed, state):
    absmax, nested_absmax, nested_code, offset, bs, nbs, qt = state._decode_args()
    return (packed, absmax, nested_absmax, nested_code, offset, bs, nbs, qt, list(state.shape), state.dtype)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_4bit_matches_bitsandbytes(dtype, quant_type, blocksize, nested):
    for i, shape in enumerate(storage_shapes(blocksize)):
        storage = STORAGES[(i + blocksize.bit_length() + int(nested)) % len(STORAGES)]  # each storage, rotating
        check_4bit_against_bnb(make_input(shape, dtype, seed=i), blocksize, quant_type, nested, storage)


@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (1, 1), (1, 3), (5, 1), (64,), (65,)])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_tiny_and_vector_shapes_match_bitsandbytes(quant_type, shape):
    for nested in (False, True):
        for dtype in FLOAT_DTYPES:
            check_4bit_against_bnb(make_input(shape, dtype), 64, quant_type, nested, torch.uint8)


@pytest.mark.parametrize("storage", STORAGES)
def test_quant_storage_every_dtype(storage):
    for nested in (False, True):
        check_4bit_against_bnb(make_input((64, 130), torch.bfloat16), 64, "nf4", nested, storage)


@pytest.mark.parametrize("n, storage", [(9, torch.float32), (1, torch.bfloat16), (2, torch.float16),
                                        (11, torch.float32)])
def test_quant_storage_not_dividing_the_bytes_is_a_clear_error(n, storage):
    """bitsandbytes fails with an obscure `view` error; nf4kit names quant_storage and the fix."""
    x = torch.randn(n)
    with pytest.raises(RuntimeError):
        bnb_functional.quantize_4bit(x, quant_type="nf4", quant_storage=storage)
    with pytest.raises(ValueError, match="quant_storage") as err:
        F.quantize_4bit(x, quant_type="nf4", quant_storage=storage)
    assert "torch.uint8" in str(err.value)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_state_dicts_load_across_libraries(quant_type, nested):
    """A state saved by bitsandbytes loads in nf4kit and dequantizes identically, and vice versa,
    with the state-dict prefixes ('weight.absmax', ...) a model's state_dict has."""
    x = make_input((48, 200), torch.float16)
    kw = dict(blocksize=128, compress_statistics=nested, quant_type=quant_type)
    b_packed, b_state = bnb_functional.quantize_4bit(x, **kw)
    packed, state = F.quantize_4bit(x, **kw)
    b_out = bnb_functional.dequantize_4bit(b_packed, b_state)

    def prefixed(d):
        return {"weight." + k: v for k, v in d.items()}

    ours_from_bnb = F.QuantState.from_dict(prefixed(b_state.as_dict(packed=True)), device="cpu")
    assert ours_from_bnb == state
    assert_same_bits(F.dequantize_4bit(b_packed, ours_from_bnb), b_out, zeros_equal=True)
    bnb_from_ours = bnb_functional.QuantState.from_dict(prefixed(state.as_dict(packed=True)), device="cpu")
    assert bnb_from_ours == b_state
    assert_same_bits(bnb_functional.dequantize_4bit(packed, bnb_from_ours), F.dequantize_4bit(packed, state),
                     zeros_equal=True)
    # The unpacked form (plain values beside the tensors) loads too.
    assert F.QuantState.from_dict(b_state.as_dict(packed=False), device="cpu") == state


def test_state_dict_json_and_keys_as_in_format_md():
    x = make_input((64, 1024), torch.float16)
    _, state = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    d = state.as_dict(packed=True)
    assert set(d) == {"absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"}
    assert d["absmax"].dtype == torch.uint8 and d["nested_absmax"].dtype == torch.float32
    assert d["quant_map"].dtype == torch.float32 and d["quant_map"].numel() == 16
    assert d["nested_quant_map"].dtype == torch.float32 and d["nested_quant_map"].numel() == 256
    meta = F.unpack_tensor_to_dict(d["quant_state.bitsandbytes__nf4"])
    assert list(meta) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                          "nested_offset"]
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["dtype"] == "float16"
    assert meta["shape"] == [64, 1024] and meta["nested_blocksize"] == 256 and meta["nested_dtype"] == "float32"
    assert meta["nested_offset"] == pytest.approx(float(state.offset))


def test_quant_state_to_and_eq(device):
    x = make_input((32, 96), torch.bfloat16)
    packed, state = F.quantize_4bit(x, blocksize=32, compress_statistics=True, quant_type="fp4")
    copy = F.QuantState.from_dict(state.as_dict(packed=True), device="cpu")
    assert copy == state and not (copy != state)
    moved = copy.to(device)
    assert moved is copy
    tensors = [copy.absmax, copy.code, copy.offset, copy.state2.absmax, copy.state2.code]
    assert all(t.device.type == torch.device(device).type for t in tensors)
    assert copy == state  # compared by value, across devices
    assert_same_bits(F.dequantize_4bit(packed.to(device), copy), F.dequantize_4bit(packed, state))
    other = F.QuantState.from_dict(state.as_dict(packed=True), device="cpu")
    other.blocksize = 64
    assert other != state
    other = F.QuantState.from_dict(state.as_dict(packed=True), device="cpu")
    other.state2.absmax = other.state2.absmax * 2
    assert other != state
    assert state != "not a state"


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_blockwise_matches_bitsandbytes(dtype, blocksize, nested):
    for i, shape in enumerate([(1,), (7, 3), (blocksize + 5,), (3, blocksize)]):
        x = make_input(shape, dtype, seed=i)
        what = f"bs={blocksize} {dtype} nested={nested} shape={shape}"
        b_q, b_state = bnb_functional.quantize_blockwise(x, blocksize=blocksize, nested=nested)
        q, state = F.quantize_blockwise(x, blocksize=blocksize, nested=nested)
        assert_same_bits(q, b_q, "codes " + what)
        assert_same_bits(state.absmax, b_state.absmax, "absmax " + what)
        assert_same_bits(state.code, b_state.code, "code " + what)
        if nested:
            assert_same_bits(state.offset.reshape(()), b_state.offset.reshape(()), "offset " + what)
            assert_same_bits(state.state2.absmax, b_state.state2.absmax, "nested absmax " + what)
        out = F.dequantize_blockwise(q, state)
        assert_same_bits(out, bnb_functional.dequantize_blockwise(b_q, b_state), "dequantized " + what)
        # absmax + code instead of a QuantState
        if not nested:
            out2 = F.dequantize_blockwise(q, absmax=state.absmax, code=state.code, blocksize=blocksize)
            assert_same_bits(out2, bnb_functional.dequantize_blockwise(b_q, absmax=b_state.absmax,
                                                                       code=b_state.code, blocksize=blocksize))


def test_blockwise_out_and_absmax_arguments():
    x = make_input((10, 100), torch.float32)
    out, absmax = torch.empty(10, 100, dtype=torch.uint8), torch.empty(1)
    q, state = F.quantize_blockwise(x, out=out, absmax=absmax)
    assert q.data_ptr() == out.data_ptr() and state.absmax.data_ptr() == absmax.data_ptr()
    b_q, b_state = bnb_functional.quantize_blockwise(x)
    assert_same_bits(out, b_q)
    dq = torch.empty(10, 100)
    assert F.dequantize_blockwise(q, state, out=dq).data_ptr() == dq.data_ptr()
    assert_same_bits(dq, bnb_functional.dequantize_blockwise(b_q, b_state))


def test_quantize_4bit_out_and_absmax_arguments():
    x = make_input((16, 64), torch.float16)
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    out = torch.empty_like(packed)
    absmax = torch.empty_like(state.absmax)
    p2, s2 = F.quantize_4bit(x, absmax=absmax, out=out, blocksize=64, quant_type="nf4")
    assert p2.data_ptr() == out.data_ptr() and s2.absmax.data_ptr() == absmax.data_ptr()
    assert_same_bits(out, packed)
    dq = torch.empty(16, 64, dtype=torch.float16)
    assert F.dequantize_4bit(packed, state, out=dq).data_ptr() == dq.data_ptr()
    assert_same_bits(dq, F.dequantize_4bit(packed, state))
    # absmax + out instead of a QuantState (out gives the shape and dtype)
    dq2 = torch.empty(16, 64, dtype=torch.float16)
    F.dequantize_nf4(packed, absmax=state.absmax, out=dq2, blocksize=64)
    assert_same_bits(dq2, dq)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_named_wrappers(quant_type):
    x = make_input((8, 64), torch.float32)
    quantize = F.quantize_nf4 if quant_type == "nf4" else F.quantize_fp4
    dequantize = F.dequantize_nf4 if quant_type == "nf4" else F.dequantize_fp4
    packed, state = quantize(x, blocksize=64)
    b_packed, b_state = bnb_functional.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    assert state.quant_type == quant_type
    assert_same_bits(packed, b_packed)
    assert_same_bits(dequantize(packed, state), bnb_functional.dequantize_4bit(b_packed, b_state), zeros_equal=True)


def test_default_blocksize_and_quant_type_match_bitsandbytes():
    x = make_input((8, 256), torch.float16)
    packed, state = F.quantize_4bit(x)
    b_packed, b_state = bnb_functional.quantize_4bit(x)
    assert (state.blocksize, state.quant_type) == (b_state.blocksize, b_state.quant_type)
    assert_same_bits(packed, b_packed)
    _, state8 = F.quantize_blockwise(x)
    _, b_state8 = bnb_functional.quantize_blockwise(x)
    assert state8.blocksize == b_state8.blocksize


def test_get_4bit_type_matches_bitsandbytes():
    for quant_type in QUANT_TYPES:
        assert_same_bits(F.get_4bit_type(quant_type, device="cpu"),
                         bnb_functional.get_4bit_type(quant_type, device="cpu"))
    assert_same_bits(F.create_dynamic_map(), bnb_functional.create_dynamic_map().float())


def test_pack_dict_to_tensor_matches_bitsandbytes():
    d = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3, 5], "nested_offset": 0.125}
    assert_same_bits(F.pack_dict_to_tensor(d), bnb_functional.pack_dict_to_tensor(d))
    assert F.unpack_tensor_to_dict(bnb_functional.pack_dict_to_tensor(d)) == d


def test_noncontiguous_input_quantizes_like_its_contiguous_copy(device):
    base = make_input((130, 96), torch.float16, device)
    for x in (base.t(), base[::2], base[:, 3:90]):
        assert not x.is_contiguous()
        packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
        packed_c, state_c = F.quantize_4bit(x.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
        assert_same_bits(packed, packed_c)
        assert state == state_c
        assert state.shape == x.shape
        q, s8 = F.quantize_blockwise(x, blocksize=256)
        q_c, s8_c = F.quantize_blockwise(x.contiguous(), blocksize=256)
        assert_same_bits(q, q_c)
        assert_same_bits(s8.absmax, s8_c.absmax)


def test_functional_on_device_matches_cpu(device):
    """The whole functional path on `device` gives the CPU's bytes and values."""
    x = make_input((70, 130), torch.bfloat16)
    for nested in (False, True):
        for quant_type in QUANT_TYPES:
            kw = dict(blocksize=64, compress_statistics=nested, quant_type=quant_type)
            packed, state = F.quantize_4bit(x.to(device), **kw)
            packed_c, state_c = F.quantize_4bit(x, **kw)
            assert_same_bits(packed, packed_c)
            assert_state_dicts_equal(state.as_dict(packed=True), state_c.as_dict(packed=True), f"{quant_type} {nested}")
            assert_same_bits(F.dequantize_4bit(packed, state), F.dequantize_4bit(packed_c, state_c))


def test_bits_per_weight_nested_nf4_blocksize_64():
    """4 + 8/64 + 32/(64*256) bits per weight, measured from the tensors a nested NF4 weight keeps
    (packed bytes, uint8 absmax codes, float32 nested absmax, the float32 offset; the code tables
    are shared per model and not counted), against 4.5 without nesting."""
    x = make_input((1024, 4096), torch.float16)
    n = x.numel()
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    per_weight = [packed, state.absmax, state.state2.absmax]
    bits = 8 * sum(t.numel() * t.element_size() for t in per_weight)
    assert bits / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), rel=1e-12)
    assert (bits + 32) / n < 4.128  # + the offset
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    plain_bits = 8 * sum(t.numel() * t.element_size() for t in (packed, state.absmax))
    assert plain_bits / n == pytest.approx(4.5, rel=1e-12)
    assert math.isclose(bits / n, 4.127, abs_tol=5e-4)
