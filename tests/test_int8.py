"""LLM.int8: the int8 ops against nf4kit.reference bit for bit (every device, poisoned outputs),
against bitsandbytes 0.50.2 on the CPU (functional API, Linear8bitLt outputs, state_dict both
ways), opcheck, autograd and bad input."""
import copy
import functools
import io

import pytest
import torch

import nf4kit.functional as F
from conftest import bits
from nf4kit import reference as R
from nf4kit.nn.linear8bit import Int8Params, Linear8bitLt, MatmulLtState, matmul

ops = torch.ops.nf4kit
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except Exception:  # noqa: BLE001 - bitsandbytes is the oracle; the tests that need it skip without it
    bnb = bnbF = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes (the oracle) is not installed")


def same_bits(a: torch.Tensor, b: torch.Tensor, what: str = "", any_nan: bool = False) -> None:
    """Bit for bit; with any_nan, NaNs must sit in the same places but their payloads may differ."""
    a, b = a.cpu(), b.cpu()
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    if a.dtype.is_floating_point:
        if any_nan:
            assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaNs in different places"
            a, b = a.nan_to_num(nan=0.0), b.nan_to_num(nan=0.0)
        a, b = bits(a), bits(b)
    diff = (a != b).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.shape[0]} of {a.numel()} elements differ, first at {diff[0].tolist()}"


def make_rows(shape, dtype, seed=0, scale=1.5):
    """Gaussian rows with the cases row quantizers get wrong: an all-zero row, a row below
    127 / FLOAT_MAX (its scale overflows), NaN and inf rows, and exact ties (x * 127 / absmax = k + 0.5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    x2 = x.view(-1, shape[-1])
    rows, K = x2.shape
    if rows >= 6 and K >= 4:
        x2[1] = 0.0
        x2[2] = torch.randn(K, generator=g) * (1e-38 if dtype != torch.float16 else 1e-7)
        x2[3, 1] = float("nan")
        x2[4, 0] = float("inf")
        x2[5, :4] = torch.tensor([127.0, 0.5, -1.5, 2.5])  # codes 127, 0.5 -> 0, -1.5 -> -2, 2.5 -> 2
    return x.to(dtype)


QUANT_SHAPES = [(1, 1), (1, 7), (3, 1), (7, 33), (64, 100), (2, 3, 40), (17, 256), (9, 1000)]
THRESHOLDS = [0.0, 2.0, 2.0001, 1e-9]  # 2.0001 rounds to 2.0 in float16 and bfloat16


def check_quant(A, threshold, device):
    q, row_stats, cols = ops.int8_vectorwise_quant(A.to(device), threshold)
    rq, rrs, rcols = R.int8_vectorwise_quant(A, threshold)
    what = f"{A.dtype} {tuple(A.shape)} threshold={threshold} on {device}"
    same_bits(q, rq, "codes " + what)
    same_bits(row_stats, rrs, "row_stats " + what)
    same_bits(cols, rcols, "outlier columns " + what)


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_vectorwise_quant_matches_reference(device, dtype, threshold):
    for i, shape in enumerate(QUANT_SHAPES):
        check_quant(make_rows(shape, dtype, seed=i), threshold, device)


def test_vectorwise_quant_non_contiguous_and_offset(device):
    base = make_rows((40, 130), torch.float16).to(device)
    for A in (base[:, 1:129], base.t(), base[3:]):  # strided, transposed, storage offset (unaligned)
        q, rs, _ = ops.int8_vectorwise_quant(A, 0.0)
        rq, rrs, _ = R.int8_vectorwise_quant(A.cpu().contiguous(), 0.0)
        same_bits(q, rq, "codes")
        same_bits(rs, rrs, "row_stats")


def rand_i8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)


# (M, N, K): partial tiles in every direction, K not a multiple of 16 (padded on CUDA), K = 1, one
# row (decode), a 3-D input, and on CUDA the split-K and large-tile paths.
MATMUL_SHAPES = [(1, 1, 1), (1, 7, 15), (5, 64, 16), (16, 65, 33), (17, 9, 128), (3, 200, 300), ((2, 3), 40, 64)]
CUDA_MATMUL_SHAPES = [(1, 4096, 4096), (16, 1000, 2048), (130, 300, 1040), (256, 256, 4096), (300, 129, 8)]


def matmul_shapes(device):
    return MATMUL_SHAPES + (CUDA_MATMUL_SHAPES if device == "cuda" else [])


def operands(M, N, K, seed):
    lead = M if isinstance(M, tuple) else (M,)
    return rand_i8((*lead, K), seed), rand_i8((N, K), seed + 1)


@functools.lru_cache(maxsize=None)
def reference_product(M, N, K, seed):
    """reference.int8_linear_matmul of operands(M, N, K, seed), once per shape (int64 matmul is slow)."""
    return R.int8_linear_matmul(*operands(M, N, K, seed))


def test_linear_matmul_matches_reference(device):
    for i, (M, N, K) in enumerate(matmul_shapes(device)):
        A, B = operands(M, N, K, i)
        out = ops.int8_linear_matmul(A.to(device), B.to(device))
        same_bits(out, reference_product(M, N, K, i), f"int32 product M={M} N={N} K={K} on {device}")


def test_linear_matmul_extremes(device):
    """All -128 (the largest products) and a K long enough to need the full int32 range."""
    A = torch.full((3, 4096), -128, dtype=torch.int8)
    B = torch.full((5, 4096), -128, dtype=torch.int8)
    B[1] = 127
    out = ops.int8_linear_matmul(A.to(device), B.to(device))
    same_bits(out, R.int8_linear_matmul(A, B), "extremes")
    assert out[0, 0].item() == 128 * 128 * 4096


def make_stats(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) * 4 + 0.01


@pytest.mark.parametrize("bias_dtype", [None, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scaled_mm_and_mm_dequant_match_reference(device, dtype, bias_dtype):
    for i, (M, N, K) in enumerate(matmul_shapes(device)):
        A, B = operands(M, N, K, i)
        rows = A.numel() // K
        rs, cs = make_stats(rows, i), make_stats(N, i + 7)
        bias = None if bias_dtype is None else (torch.randn(N) * 3).to(bias_dtype)
        prod = reference_product(M, N, K, i)
        ref = R.int8_mm_dequant(prod, rs, cs, dtype, bias)  # = R.int8_scaled_mm(A, B, ...)
        d = lambda t: None if t is None else t.to(device)  # noqa: E731
        what = f"{dtype} bias={bias_dtype} M={M} N={N} K={K} on {device}"
        same_bits(ops.int8_scaled_mm(d(A), d(B), d(rs), d(cs), dtype, d(bias)), ref, "scaled_mm " + what)
        same_bits(ops.int8_mm_dequant(d(prod), d(rs), d(cs), dtype, d(bias)), ref, "mm_dequant " + what)


def test_mm_dequant_full_int32_range(device):
    A = torch.randint(-2**31, 2**31 - 1, (33, 65), dtype=torch.int32)
    A[0, :3] = torch.tensor([2**31 - 1, -2**31, 0])
    rs, cs = make_stats(33, 1) * 1000, make_stats(65, 2) * 1000  # products overflow float16 -> inf
    for dtype in FLOAT_DTYPES:
        out = ops.int8_mm_dequant(A.to(device), rs.to(device), cs.to(device), dtype, None)
        same_bits(out, R.int8_mm_dequant(A, rs, cs, dtype, None), f"{dtype}")


def test_ops_opcheck(device):
    A = torch.nan_to_num(make_rows((6, 40), torch.float16), nan=0.0, posinf=7.0).to(device)  # opcheck: NaN != NaN
    Ai, Bi = operands(5, 24, 40, 3)
    Ai, Bi = Ai.to(device), Bi.to(device)
    rs, cs, bias = make_stats(5, 1).to(device), make_stats(24, 2).to(device), torch.randn(24, device=device).half()
    prod = ops.int8_linear_matmul(Ai, Bi)
    torch.library.opcheck(ops.int8_vectorwise_quant.default, (A, 0.0))
    # Data-dependent outlier count: the dynamic-shape fake tests cannot run it.
    torch.library.opcheck(ops.int8_vectorwise_quant.default, (A, 2.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(ops.int8_linear_matmul.default, (Ai, Bi))
    torch.library.opcheck(ops.int8_mm_dequant.default, (prod, rs, cs, torch.bfloat16, bias))
    torch.library.opcheck(ops.int8_scaled_mm.default, (Ai, Bi, rs, cs, torch.float16, None))


# ----------------------------------------------------------------------------------------------
# bitsandbytes 0.50.2 (CPU) as the oracle
# ----------------------------------------------------------------------------------------------

@needs_bnb
@pytest.mark.parametrize("threshold", [0.0, 2.0, 2.0001])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_functional_matches_bitsandbytes(dtype, threshold):
    for i, shape in enumerate([(1, 9), (7, 33), (64, 100)]):
        A = make_rows(shape, dtype, seed=i)
        q, rs, cols = F.int8_vectorwise_quant(A, threshold)
        bq, brs, bcols = bnbF.int8_vectorwise_quant(A.clone(), threshold)
        same_bits(q, bq, "codes")
        same_bits(rs, brs, "row_stats", any_nan=True)
        if bcols is None:
            assert cols is None
        else:
            same_bits(cols, bcols, "outlier columns")
        same_bits(F.int8_vectorwise_dequant(q, rs), bnbF.int8_vectorwise_dequant(q, rs), "vectorwise dequant")
    A8, B8 = operands(13, 70, 257, 5)
    prod = F.int8_linear_matmul(A8, B8)
    same_bits(prod, bnbF.int8_linear_matmul(A8, B8), "int32 product")
    rs, cs = make_stats(13, 3), make_stats(70, 4)
    for bias in (None, torch.randn(70).half(), torch.randn(70)):
        same_bits(F.int8_mm_dequant(prod, rs, cs, bias=bias), bnbF.int8_mm_dequant(prod, rs, cs, bias=bias),
                  "mm_dequant")


def make_pair(in_f, out_f, threshold, dtype, bias=True, seed=0):
    """A Linear8bitLt of nf4kit and one of bitsandbytes with the same fp weights, quantized on the CPU."""
    torch.manual_seed(seed)
    fp = torch.nn.Linear(in_f, out_f, bias=bias).to(dtype)
    ours = Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False, threshold=threshold)
    theirs = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False, threshold=threshold)
    ours.load_state_dict(fp.state_dict())
    theirs.load_state_dict(fp.state_dict())
    return ours.to("cpu").eval(), theirs.to("cpu").eval(), fp


def layer_input(shape, dtype, seed, outliers=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if outliers:  # a few columns with activations above the threshold, as LLM.int8 expects
        x[..., 3] *= 8
        x[..., -2] *= 8
    return x.to(dtype)


@needs_bnb
@pytest.mark.parametrize("threshold", [0.0, 3.0])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_linear8bitlt_matches_bitsandbytes(dtype, threshold):
    ours, theirs, fp = make_pair(96, 40, threshold, dtype)
    same_bits(ours.weight.data, theirs.weight.data, "CB")
    same_bits(ours.weight.SCB, theirs.weight.SCB, "SCB")
    for shape in [(1, 96), (5, 96), (2, 7, 96)]:
        x = layer_input(shape, dtype, seed=len(shape))
        with torch.no_grad():
            out, ref = ours(x), theirs(x)
        assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
        if dtype == torch.float32:
            # bitsandbytes casts float32 inputs to float16 before quantizing them; nf4kit quantizes
            # the float32 values. Both stay within int8 quantization error of the fp layer.
            exact = fp(x)
            scale = exact.abs().max()
            assert (out - exact).abs().max() < 0.03 * scale
            assert (out - ref).abs().max() < 0.03 * scale
        else:
            same_bits(out, ref, f"Linear8bitLt {dtype} threshold={threshold} {shape}")
        if threshold > 0:
            assert ours.state.idx is not None and ours.state.idx.numel() > 0


@needs_bnb
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_state_dict_both_ways_with_bitsandbytes(threshold):
    ours, theirs, _ = make_pair(64, 24, threshold, torch.float16, seed=1)
    x = layer_input((3, 64), torch.float16, seed=2)
    with torch.no_grad():
        ref = theirs(x)  # (the forward casts the bias to the input dtype, in both)
        same_bits(ours(x), ref, "outputs")
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert set(sd_ours) == set(sd_theirs) == {"weight", "bias", "SCB", "weight_format"}
    for k in sd_ours:
        same_bits(sd_ours[k], sd_theirs[k], k)
    # bitsandbytes' checkpoint into nf4kit: a fresh (unquantized) layer and a quantized one.
    for fresh in (Linear8bitLt(64, 24, has_fp16_weights=False, threshold=threshold),
                  Linear8bitLt(64, 24, has_fp16_weights=False, threshold=threshold).to("cpu")):
        fresh.load_state_dict(sd_theirs)
        with torch.no_grad():
            same_bits(fresh.eval()(x), ref, "bnb checkpoint in nf4kit")
    # nf4kit's checkpoint (through a file, as saved) into bitsandbytes.
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    other = bnb.nn.Linear8bitLt(64, 24, has_fp16_weights=False, threshold=threshold).to("cpu")
    other.load_state_dict(torch.load(buf))
    with torch.no_grad():
        same_bits(other.eval()(x), ref, "nf4kit checkpoint in bnb")
    # a second forward leaves the checkpoint as it was
    with torch.no_grad():
        ours(x)
    for k, v in ours.state_dict().items():
        same_bits(v, sd_ours[k], k + " after forward")


# ----------------------------------------------------------------------------------------------
# Layer behaviour, devices, autograd
# ----------------------------------------------------------------------------------------------

def quantized_layer(in_f, out_f, device, threshold=0.0, dtype=torch.float16, seed=0):
    torch.manual_seed(seed)
    fp = torch.nn.Linear(in_f, out_f).to(dtype)
    layer = Linear8bitLt(in_f, out_f, has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(fp.state_dict())
    return layer.to(device), fp


@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_linear8bitlt_device_matches_cpu(device, threshold):
    layer, fp = quantized_layer(128, 72, device, threshold)
    cpu_layer, _ = quantized_layer(128, 72, "cpu", threshold)
    same_bits(layer.weight.data, cpu_layer.weight.data, "CB")
    for dtype in FLOAT_DTYPES:
        x = layer_input((4, 9, 128), dtype, seed=3)
        with torch.no_grad():
            out, ref = layer(x.to(device)), cpu_layer(x)
        if threshold == 0:
            same_bits(out, ref, f"{dtype} on {device}")  # the same int8 kernels' numbers
        else:  # + the outlier columns through the device's dense matmul
            torch.testing.assert_close(out.cpu(), ref, rtol=1e-2, atol=1e-2)


def test_layer_moved_after_forward(device):
    """.cuda() / .cpu() go through Module._apply, which moves the weight but not the layer's state."""
    layer, _ = quantized_layer(32, 16, "cpu")
    x = layer_input((3, 32), torch.float16, seed=1)
    with torch.no_grad():
        ref = layer(x)  # CB / SCB now live in layer.state
        moved = layer.cuda() if device == "cuda" else layer.cpu()
        same_bits(moved(x.to(device)), ref, "after the move")


def test_int8params_quantizes_on_move(device):
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    p = Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    q = p.to(device)
    assert q.dtype == torch.int8 and q.device.type == device
    CB, SCB, _ = R.int8_vectorwise_quant(w.half(), 0.0)
    same_bits(q.CB, CB, "CB")
    same_bits(q.SCB, SCB, "SCB")
    c = copy.deepcopy(q)
    same_bits(c.data, q.data, "deepcopy")
    assert c.SCB is not q.SCB and torch.equal(c.SCB, q.SCB)
    back = q.to("cpu")  # already quantized: moves, keeps CB/SCB
    assert back.dtype == torch.int8 and back.SCB.device.type == "cpu"
    fp16 = Int8Params(w.clone(), has_fp16_weights=True).to(device)
    assert fp16.dtype == torch.bfloat16


def test_weight_beyond_float16_range_is_not_zeroed():
    w = torch.randn(4, 64) * 10
    w[1, 5] = 1e6  # bitsandbytes' float16 cast makes this row inf -> codes 0
    p = Int8Params(w.clone()).to("cpu")  # requires_grad=True by default: dropped on quantization
    assert p.dtype == torch.int8 and not p.requires_grad
    assert p.SCB[1].item() == pytest.approx(1e6)
    assert p.CB[1, 5] == 127 and (p.CB[0] != 0).any()


def test_autograd(device):
    """Input gradient through the dequantized int8 weight (bitsandbytes' rule), bias gradient,
    and with fp16 weights the exact weight gradient."""
    layer, _ = quantized_layer(48, 20, device)
    x = layer_input((2, 3, 48), torch.float32, seed=5).to(device).requires_grad_()
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    W = layer.state.CB.float() * (layer.state.SCB.unsqueeze(1) * (1.0 / 127.0))
    torch.testing.assert_close(x.grad, (g.reshape(-1, 20) @ W).reshape(x.shape))
    torch.testing.assert_close(layer.bias.grad, g.reshape(-1, 20).sum(0))

    torch.manual_seed(0)
    train = Linear8bitLt(48, 20, has_fp16_weights=True, threshold=3.0).to(device)
    x = layer_input((6, 48), torch.float32, seed=6).to(device)
    out = train(x)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(train.weight.grad, torch.ones(6, 20, device=device).t() @ x)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, train.weight.detach(), train.bias.detach()),
                               rtol=0.05, atol=0.05)
    # eval mode caches the int8 weight until the weight changes
    train.eval()
    with torch.no_grad():
        first = train(x)
        train.weight.mul_(2)
        second = train(x)
    assert not torch.equal(first, second)


def test_matmul_function_and_state():
    """bnb.matmul's contract: float32 A, a float weight quantized (after a float16 cast) into the
    state, the outlier columns of A added back in A's dtype."""
    g = torch.Generator().manual_seed(9)
    B = torch.randn(12, 32, generator=g)
    A = torch.randn(5, 32, generator=g)
    A[:, 4] *= 6
    state = MatmulLtState()
    state.is_training = False
    out = matmul(A, B, state=state, threshold=2.5)
    assert state.threshold == 2.5 and state.CB.dtype == torch.int8
    CA, SCA, cols = R.int8_vectorwise_quant(A, 2.5)
    CB, SCB, _ = R.int8_vectorwise_quant(B.half(), 0.0)
    expected = R.int8_scaled_mm(CA, CB, SCA, SCB, torch.float32, None)
    assert cols.numel() > 0 and torch.equal(state.idx, cols)
    expected = expected.addmm(A[:, cols], (CB[:, cols] * SCB[:, None] * R.INT8_DEQUANT_CONST).t())
    same_bits(out, expected, "matmul")
    assert (out - A @ B.t()).abs().max() < 0.05 * (A @ B.t()).abs().max()


def test_empty_input_and_threshold_none():
    layer, _ = quantized_layer(16, 8, "cpu")
    out = layer(torch.empty(0, 16, dtype=torch.float16))
    assert out.shape == (0, 8)
    assert F.int8_vectorwise_quant(torch.randn(3, 4), 0.0)[2] is None
    assert F.int8_vectorwise_quant(torch.ones(3, 4), 5.0)[2].numel() == 0


def test_double_quant():
    A = make_rows((9, 30), torch.float16, seed=4)
    A = torch.nan_to_num(A, nan=0.0, posinf=0.0)
    for threshold in (0.0, 2.0):
        qr, qc, rs, cs, cols = F.int8_double_quant(A, threshold=threshold)
        rq, rrs, rcols = R.int8_vectorwise_quant(A, threshold)
        same_bits(qr, rq, "row codes")
        same_bits(rs, rrs, "row stats")
        assert (cols is None) == (threshold == 0.0)
        Am = A.float().masked_fill(A.abs() >= threshold, 0) if threshold else A.float()
        torch.testing.assert_close(cs, Am.abs().amax(0))
        assert qc.dtype == torch.int8 and qc.shape == A.shape and qc.abs().max() <= 127


# ----------------------------------------------------------------------------------------------
# Bad input: clear exceptions that name the argument
# ----------------------------------------------------------------------------------------------

def test_bad_input_functional(device):
    A8, B8 = operands(4, 6, 32, 0)
    A8, B8 = A8.to(device), B8.to(device)
    other = "meta" if device == "cpu" else "cpu"
    with pytest.raises(ValueError, match="A must be float16"):
        F.int8_vectorwise_quant(A8)
    with pytest.raises(ValueError, match="A must not be empty"):
        F.int8_vectorwise_quant(torch.empty(0, 5, device=device))
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        F.int8_vectorwise_quant(torch.randn(2, 3, device=device), -1.0)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        F.int8_vectorwise_quant(torch.randn(2, 3, device=device), float("nan"))
    with pytest.raises(ValueError, match="A must be torch.int8"):
        F.int8_linear_matmul(A8.float(), B8)
    with pytest.raises(ValueError, match="B must be torch.int8"):
        F.int8_linear_matmul(A8, B8.half())
    with pytest.raises(ValueError, match="A's last dimension"):
        F.int8_linear_matmul(A8[:, :31], B8)
    with pytest.raises(ValueError, match="B must be 2-D"):
        F.int8_linear_matmul(A8, B8[None])
    with pytest.raises(ValueError, match="A must be a non-empty"):
        F.int8_linear_matmul(A8[:0], B8)
    with pytest.raises(ValueError, match="B is on"):
        F.int8_linear_matmul(A8, B8.to(other))
    prod = F.int8_linear_matmul(A8, B8)
    rs, cs = make_stats(4, 0).to(device), make_stats(6, 1).to(device)
    with pytest.raises(ValueError, match="A must be torch.int32"):
        F.int8_mm_dequant(prod.float(), rs, cs)
    with pytest.raises(ValueError, match="row_stats has 3 values, expected 4"):
        F.int8_mm_dequant(prod, rs[:3], cs)
    with pytest.raises(ValueError, match="col_stats must be float32"):
        F.int8_mm_dequant(prod, rs, cs.half())
    with pytest.raises(ValueError, match="col_stats is on"):
        F.int8_mm_dequant(prod, rs, cs.to(other))
    with pytest.raises(ValueError, match="bias must have 6 values"):
        F.int8_mm_dequant(prod, rs, cs, bias=torch.zeros(5, device=device))
    with pytest.raises(ValueError, match="stats has 3 values"):
        F.int8_vectorwise_dequant(A8, rs[:3])
    with pytest.raises(ValueError, match="dtype must be float16"):
        F.int8_scaled_mm(A8, B8, rs, cs, dtype=torch.int32)


def test_bad_input_ops(device):
    """The host functions check too (for callers of torch.ops.nf4kit directly)."""
    A8, B8 = operands(4, 6, 32, 0)
    A8, B8 = A8.to(device), B8.to(device)
    rs, cs = make_stats(4, 0).to(device), make_stats(6, 1).to(device)
    with pytest.raises(TypeError, match="A must be float16"):
        ops.int8_vectorwise_quant(A8, 0.0)
    with pytest.raises(ValueError, match="last dimension must not be 0"):
        ops.int8_vectorwise_quant(torch.empty(3, 0, device=device), 0.0)
    with pytest.raises(TypeError, match="B must be Char"):
        ops.int8_linear_matmul(A8, B8.float())
    with pytest.raises(ValueError, match="must equal B's K"):
        ops.int8_linear_matmul(A8, B8[:, :30])
    with pytest.raises(ValueError, match="row_stats has 3 elements"):
        ops.int8_scaled_mm(A8, B8, rs[:3], cs, torch.float16, None)
    with pytest.raises(TypeError, match="row_stats must be Float"):
        ops.int8_mm_dequant(ops.int8_linear_matmul(A8, B8), rs.double(), cs, torch.float16, None)
    with pytest.raises(ValueError, match="bias has 5 elements"):
        ops.int8_scaled_mm(A8, B8, rs, cs, torch.float16, torch.zeros(5, device=device))
    if device == "cuda":
        with pytest.raises(ValueError, match="B is on"):
            ops.int8_linear_matmul(A8, B8.cpu())


def test_bad_input_layer(device):
    layer, _ = quantized_layer(16, 8, device)
    with pytest.raises(ValueError, match="in_features=16"):
        layer(torch.randn(3, 15, device=device))
    with pytest.raises(ValueError, match="input must be float16"):
        layer(torch.ones(3, 16, dtype=torch.int32, device=device))
    other = "meta" if device == "cpu" else "cpu"
    with pytest.raises(ValueError, match="input is on"):
        layer(torch.randn(3, 16, device=other))
    raw = Linear8bitLt(16, 8, has_fp16_weights=False)  # never moved: not quantized
    with pytest.raises(RuntimeError, match="unquantized weight"):
        raw(torch.randn(2, 16))
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        Linear8bitLt(16, 8, threshold=-1.0)
    fp_layer = Linear8bitLt(16, 8, has_fp16_weights=True)
    with pytest.raises(RuntimeError, match="has_fp16_weights=True"):
        fp_layer.load_state_dict(layer.cpu().state_dict())
