"""Params4bit / Linear4bit / quantize_model: behaviour of bitsandbytes' layers, its state_dict
layout both ways, and what bitsandbytes 0.50.2 gets wrong (pickling, strict reload, deepcopy)."""
import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import nf4kit
import nf4kit.functional as F
from nf4kit import BitsAndBytesConfig, Linear4bit, LinearFP4, LinearNF4, Params4bit
from nf4kit.nn import linear4bit as linear4bit_module

bnb = pytest.importorskip("bitsandbytes")

QUANT_KEYS = {"absmax", "quant_map", "nested_absmax", "nested_quant_map"}


def make_pair(W, b, **kw):
    """The same weights in an nf4kit and a bitsandbytes Linear4bit, both quantized on the CPU."""
    out_f, in_f = W.shape
    ours = Linear4bit(in_f, out_f, bias=b is not None, **kw)
    theirs = bnb.nn.Linear4bit(in_f, out_f, bias=b is not None, **kw)
    for layer in (ours, theirs):
        layer.weight.data = W.clone()
        if b is not None:
            layer.bias.data = b.clone()
    return ours.to("cpu"), theirs.to("cpu")


def as_bytes(t):
    """Packed weights in a float storage dtype may hold NaN bit patterns: compare bytes."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def dense(layer, x):
    """The layer's output computed densely from its dequantized weight (float64)."""
    W = layer.weight.dequantize().double()
    y = x.double() @ W.t()
    return y + layer.bias.double() if layer.bias is not None else y


# ------------------------------------------------------------------------------------------------
# Quantization moments and forward
# ------------------------------------------------------------------------------------------------

def test_quantizes_on_to_cpu_and_quantize():
    a = Linear4bit(64, 16, quant_type="nf4")
    assert not a.weight.bnb_quantized and a.weight.shape == (16, 64)
    with pytest.raises(RuntimeError, match="not quantized yet"):
        a(torch.randn(2, 64))
    a = a.to("cpu")
    assert a.weight.bnb_quantized and a.weight.shape == (512, 1) and a.weight.dtype == torch.uint8
    assert a.quant_state is a.weight.quant_state and a.weight.quant_state.shape == (16, 64)
    b = Linear4bit(64, 16).cpu()
    assert b.weight.bnb_quantized
    c = Linear4bit(64, 16).quantize()
    assert c.weight.bnb_quantized and c.weight.quant_state.quant_type == "fp4"
    assert isinstance(LinearNF4(64, 8).cpu().weight, Params4bit)
    assert LinearNF4(64, 8).weight.quant_type == "nf4" and LinearFP4(64, 8).weight.quant_type == "fp4"


def test_to_with_dtype_quantizes_that_dtype():
    a = Linear4bit(64, 16).to("cpu", torch.bfloat16)
    assert a.weight.quant_state.dtype == torch.bfloat16 and a.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_matches_dense(device, quant_type, compress_statistics, dtype):
    layer = Linear4bit(192, 72, quant_type=quant_type, compress_statistics=compress_statistics).to(dtype)
    layer = layer.to(device)
    assert layer.weight.device.type == device
    x = torch.randn(3, 5, 192, dtype=dtype, device=device)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 5, 72)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(y.double(), dense(layer, x), rtol=tol, atol=tol)


def test_forward_skips_params4bit_torch_function(device, monkeypatch):
    """Linear4bit passes its Params4bit weight to matmul_4bit as it is; matmul_4bit reads it and calls
    the op with torch functions off, so the weight's Python __torch_function__ (a few us a call each
    time, ~50 us a forward on the H200's host before) does not run at all in a forward, with or
    without a bias or a grad, and the product is the plain tensor's bit for bit."""
    layer = Linear4bit(64, 24, bias=True, compute_dtype=torch.float16, quant_type="nf4").to(device)
    x = torch.randn(3, 64, dtype=torch.float16, device=device, requires_grad=True)
    w = layer.weight
    plain = w.as_subclass(torch.Tensor)
    want = F.matmul_4bit(x, plain, w.quant_state, bias=layer.bias)
    calls = []
    real = Params4bit.__torch_function__.__func__

    def counting(cls, func, types, args=(), kwargs=None):
        calls.append(getattr(func, "__name__", func))
        return real(cls, func, types, args, kwargs)

    monkeypatch.setattr(Params4bit, "__torch_function__", classmethod(counting))
    assert torch.equal(layer(x), want)
    with torch.no_grad():
        assert torch.equal(layer(x), want)
    assert calls == []
    layer.weight.t()  # the counter itself works
    assert calls


def test_compute_dtype(device):
    layer = Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4").to(torch.float16).to(device)
    x = torch.randn(4, 64, dtype=torch.float16, device=device)
    linear4bit_module._warned.clear()
    with pytest.warns(UserWarning, match="needlessly slow"):
        y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        layer(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), dense(layer, x), rtol=2e-3, atol=2e-3)
    follow = Linear4bit(64, 32).to(device)  # compute_dtype None: the input's dtype, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert follow(x).dtype == torch.float16
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit(64, 32, compute_dtype=torch.int8)


def test_backward_reaches_input_and_bias_not_weight():
    layer = Linear4bit(128, 24, quant_type="nf4").cpu()
    layer.bias.requires_grad_(True)
    x = torch.randn(6, 128, requires_grad=True)
    layer(x).square().sum().backward()
    W = layer.weight.dequantize()
    g = 2 * (x.detach() @ W.t() + layer.bias.detach())
    torch.testing.assert_close(x.grad, g @ W, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad, g.sum(0), rtol=1e-4, atol=1e-4)
    assert layer.weight.grad is None and not layer.weight.requires_grad


# ------------------------------------------------------------------------------------------------
# Same bytes as bitsandbytes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [True, False])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_same_bytes_and_dequantization_as_bitsandbytes(quant_type, compress_statistics, quant_storage):
    W, b = torch.randn(96, 320), torch.randn(96)
    ours, theirs = make_pair(W, b, quant_type=quant_type, compress_statistics=compress_statistics,
                             quant_storage=quant_storage)
    assert ours.weight.dtype == theirs.weight.dtype == quant_storage
    assert torch.equal(as_bytes(ours.weight), as_bytes(theirs.weight))
    ref = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(ours.weight.dequantize(), ref)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys()
    for k in sd_ours:
        assert sd_ours[k].dtype == sd_theirs[k].dtype and torch.equal(as_bytes(sd_ours[k]), as_bytes(sd_theirs[k])), k
    theirs.train()  # (eval-mode CPU inference repacks the weight, see bnb's _convert_weight_packed_for_cpu)
    x = torch.randn(7, 320)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# state_dict: bitsandbytes' layout, strict loading both ways, safetensors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress_statistics", [True, False])
def test_state_dict_layout(device, compress_statistics):
    layer = Linear4bit(128, 40, quant_type="nf4", compress_statistics=compress_statistics).to(device)
    sd = layer.state_dict()
    extra = {"absmax", "quant_map", "quant_state.bitsandbytes__nf4"}
    if compress_statistics:
        extra |= {"nested_absmax", "nested_quant_map"}
    assert set(sd) == {"weight", "bias"} | {"weight." + k for k in extra}
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    meta = F.unpack_tensor_to_dict(sd["weight.quant_state.bitsandbytes__nf4"])
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["shape"] == [40, 128]
    assert meta["dtype"] == "float32"
    assert sd["weight.absmax"].dtype == (torch.uint8 if compress_statistics else torch.float32)


def test_strict_reload_and_safetensors(device, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    src = Linear4bit(256, 48, quant_type="nf4", quant_storage=torch.bfloat16).to(device)
    x = torch.randn(3, 256, device=device)
    safetensors.save_file(src.state_dict(), tmp_path / "w.safetensors")
    sd = safetensors.load_file(tmp_path / "w.safetensors", device=device)
    dst = Linear4bit(256, 48, quant_type="fp4", compress_statistics=False)  # settings come from the file
    assert str(dst.load_state_dict(sd, strict=True)) == "<All keys matched successfully>"
    assert dst.weight.quant_type == "nf4" and dst.weight.quant_storage == torch.bfloat16
    assert dst.weight.device.type == "cpu"  # as load_state_dict does: the values go where the layer is
    dst = dst.to(device)  # a quantized weight moves with its QuantState
    assert dst.weight.device.type == device and dst.weight.quant_state.absmax.device.type == device
    assert dst.quant_state is dst.weight.quant_state
    assert torch.equal(dst(x), src(x))
    meta_layer = Linear4bit(256, 48, device="meta")  # loading into a meta layer takes the tensors' device
    meta_layer.load_state_dict(sd, strict=True, assign=True)
    assert torch.equal(meta_layer(x), src(x))


def test_loads_bitsandbytes_state_dict_which_bitsandbytes_cannot():
    W, b = torch.randn(64, 192), torch.randn(64)
    ours, theirs = make_pair(W, b, quant_type="nf4")
    sd = theirs.state_dict()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        bnb.nn.Linear4bit(192, 64, quant_type="nf4").load_state_dict(sd, strict=True)
    fresh = Linear4bit(192, 64)
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(5, 192)
    assert torch.equal(fresh(x), ours(x))


def test_nf4kit_state_dict_loads_in_bitsandbytes():
    W = torch.randn(80, 256)
    ours, _ = make_pair(W, None, quant_type="fp4", compress_statistics=True)
    sd = ours.state_dict()
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    p = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    assert torch.equal(bnb.functional.dequantize_4bit(p.data, p.quant_state), ours.weight.dequantize())
    theirs = bnb.nn.Linear4bit(256, 80, bias=False, quant_type="fp4")
    theirs.weight = p
    theirs.train()
    x = torch.randn(4, 256)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


def test_load_errors_are_clear():
    src = Linear4bit(128, 32, quant_type="nf4").cpu()
    with pytest.raises(RuntimeError, match=r"shape \(32, 128\).*needs \(16, 128\)"):
        Linear4bit(128, 16).load_state_dict(src.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        Linear4bit(128, 32).load_state_dict({"weight": torch.randn(4, 4), "bias": torch.zeros(32)})
    result = Linear4bit(128, 32).load_state_dict({"bias": torch.zeros(32)}, strict=False)
    assert result.missing_keys == ["weight"]


def test_float_state_dict_into_4bit_layer():
    """bitsandbytes' documented flow: load an nn.Linear's state_dict, then move to quantize."""
    fp = nn.Linear(128, 24)
    q = Linear4bit(128, 24, quant_type="nf4")
    q.load_state_dict(fp.state_dict())
    q = q.to("cpu")
    direct = Linear4bit(128, 24, quant_type="nf4")
    direct.weight.data, direct.bias.data = fp.weight.data.clone(), fp.bias.data.clone()
    direct = direct.cpu()
    assert torch.equal(q.weight.data, direct.weight.data)
    q.load_state_dict(nn.Linear(128, 24).state_dict())  # into an already quantized layer: quantized there
    assert q.weight.bnb_quantized and not torch.equal(q.weight.data, direct.weight.data)


# ------------------------------------------------------------------------------------------------
# Params4bit: from_prequantized, copies, pickling, chunk/split, dtype casts
# ------------------------------------------------------------------------------------------------

def test_from_prequantized(device):
    W = torch.randn(40, 128, device=device)
    packed, state = F.quantize_4bit(W, compress_statistics=True, quant_type="nf4")
    stats = {"weight." + k: v for k, v in state.as_dict(packed=True).items()}
    p = Params4bit.from_prequantized(packed, stats)
    assert p.bnb_quantized and p.quant_type == "nf4" and p.compress_statistics and p.device == packed.device
    assert torch.equal(p.dequantize(), F.dequantize_4bit(packed, state))
    with pytest.raises(ValueError, match="absmax"):
        bad = dict(stats)
        bad["weight.absmax"] = bad["weight.absmax"][:-1]
        Params4bit.from_prequantized(packed, bad)


def test_pickle_and_copies_keep_the_class():
    layer = Linear4bit(128, 16, quant_type="nf4").cpu()
    x = torch.randn(2, 128)
    y = layer(x)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer), torch.load(buf, weights_only=False)):
        assert type(clone.weight) is Params4bit and clone.weight.module is clone  # bnb: a plain Parameter / old module
        assert clone.weight.quant_state == layer.weight.quant_state
        assert clone.weight.quant_state is not layer.weight.quant_state and clone.quant_state is clone.weight.quant_state
        assert torch.equal(clone(x), y)
    p = pickle.loads(pickle.dumps(layer.weight))
    assert type(p) is Params4bit and p.quant_state == layer.weight.quant_state
    shallow = copy.copy(layer.weight)
    assert type(shallow) is Params4bit and shallow.quant_state is layer.weight.quant_state
    assert shallow.data_ptr() == layer.weight.data_ptr()


def test_chunk_split_keep_subclass_and_casts_keep_bytes():
    w = Linear4bit(128, 16, quant_storage=torch.bfloat16).cpu().weight
    for parts in (torch.chunk(w, 2), torch.split(w, 100), w.chunk(4)):
        assert all(type(t) is Params4bit and t.quant_state is w.quant_state for t in parts)
    layer = Linear4bit(128, 16, quant_storage=torch.bfloat16).cpu()
    before = layer.weight.data.clone()
    x = torch.randn(2, 128)
    y = layer(x)
    layer.half()  # bnb would convert the packed bf16 "numbers" to fp16
    layer.float()
    layer.to(torch.float16)
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(as_bytes(layer.weight), as_bytes(before))
    assert layer.bias.dtype == torch.float16
    torch.testing.assert_close(layer(x), y, rtol=1e-3, atol=1e-3)  # same weight; the bias is fp16 now


def test_bad_arguments():
    with pytest.raises(ValueError, match="quant_type"):
        Linear4bit(64, 8, quant_type="nf3")
    with pytest.raises(ValueError, match="blocksize"):
        Params4bit(torch.randn(4, 4), blocksize=100)
    with pytest.raises(TypeError, match="quant_storage"):
        Params4bit(torch.randn(4, 4), quant_storage="uint8")
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        Params4bit(torch.zeros(4, 4, dtype=torch.int8)).quantize()
    with pytest.raises(RuntimeError, match="meta"):
        Linear4bit(64, 8, device="meta").quantize()


# ------------------------------------------------------------------------------------------------
# Memory: 4 + 8/64 + 32/(64*256) bits per weight with NF4 nested
# ------------------------------------------------------------------------------------------------

def test_bits_per_weight_nested_nf4():
    out_f, in_f = 256, 4096  # 1M weights: 16384 blocks of 64, 64 nested blocks of 256
    layer = Linear4bit(in_f, out_f, quant_type="nf4", compress_statistics=True).cpu()
    qs = layer.weight.quant_state
    tensors = [layer.weight.data, qs.absmax, qs.state2.absmax, qs.offset, qs.code, qs.state2.code]
    n = out_f * in_f
    bits = 8 * sum(t.numel() * t.element_size() for t in tensors)
    bias_bits = 8 * layer.bias.numel() * layer.bias.element_size()
    constants = 8 * (4 + 16 * 4 + 256 * 4)  # offset, the 16-value code, the 256-value nested code
    assert (bits - constants) / n == 4 + 8 / 64 + 32 / (64 * 256)  # 4.127
    total = 8 * sum(v.numel() * v.element_size() for k, v in layer.state_dict().items()
                    if "quant_state" not in k)  # the JSON blob is metadata
    assert total == bits - 8 * 4 + bias_bits  # the offset travels inside the JSON


# ------------------------------------------------------------------------------------------------
# quantize_model / dequantize_model
# ------------------------------------------------------------------------------------------------

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(64), "up": nn.Linear(64, 128),
                                                   "down": nn.Linear(128, 64, bias=False)}) for _ in range(2))
        self.head = nn.Linear(64, 50)

    def forward(self, ids):
        h = self.embed(ids)
        for blk in self.blocks:
            h = h + blk["down"](torch.relu(blk["up"](blk["norm"](h))))
        return self.head(h)


def test_quantize_model_replaces_linears_only():
    model = Toy()
    others = {k: v.data_ptr() for k, v in model.state_dict().items() if "up" not in k and "down" not in k}
    fp_up = model.blocks[0]["up"].weight.detach().clone()
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             llm_int8_skip_modules=None)
    nf4kit.quantize_model(model, cfg)
    assert type(model.head) is nn.Linear  # the output head stays (the module of the last parameter)
    for blk in model.blocks:
        assert isinstance(blk["up"], Linear4bit) and isinstance(blk["down"], Linear4bit)
        assert blk["up"].weight.bnb_quantized and blk["up"].compute_dtype == torch.float32
    assert model.blocks[1]["down"].bias is None and model.is_loaded_in_4bit
    for k, ptr in others.items():
        assert model.state_dict()[k].data_ptr() == ptr, k  # every other tensor kept as it was
    packed, state = F.quantize_4bit(fp_up, compress_statistics=True, quant_type="nf4")
    assert torch.equal(model.blocks[0]["up"].weight.data, packed)
    deq = {n: m.weight.dequantize() for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    ids = torch.randint(0, 50, (2, 7))
    y = model(ids)
    nf4kit.dequantize_model(model)
    assert not any(isinstance(m, Linear4bit) for m in model.modules()) and not model.is_loaded_in_4bit
    for name, w in deq.items():
        assert type(model.get_submodule(name)) is nn.Linear and torch.equal(model.get_submodule(name).weight, w)
    torch.testing.assert_close(model(ids), y, rtol=1e-5, atol=1e-5)


def test_quantize_model_skip_list_and_default_config():
    model = Toy()
    nf4kit.quantize_model(model, BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["blocks.1", "up"]))
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {"blocks.0.up": "Linear", "blocks.0.down": "Linear4bit", "blocks.1.up": "Linear",
                     "blocks.1.down": "Linear", "head": "Linear4bit"}
    assert model.head.weight.quant_type == "fp4"  # the config's (transformers') default
    model = nf4kit.quantize_model(Toy())  # no config: NF4, nested, compute in the input's dtype
    assert model.blocks[0]["up"].weight.quant_type == "nf4" and model.blocks[0]["up"].compute_dtype is None
    with pytest.raises(ValueError, match="no quantization"):
        nf4kit.quantize_model(Toy(), BitsAndBytesConfig())


def test_quantize_model_8bit():
    model = Toy()
    ids = torch.randint(0, 50, (2, 5))
    y = model(ids)
    nf4kit.quantize_model(model, BitsAndBytesConfig(load_in_8bit=True))
    assert isinstance(model.blocks[0]["up"], nf4kit.Linear8bitLt) and model.is_loaded_in_8bit
    assert model.blocks[0]["up"].weight.dtype == torch.int8
    y8 = model(ids)
    torch.testing.assert_close(y8, y, rtol=0.1, atol=0.1)
    nf4kit.dequantize_model(model)
    assert type(model.blocks[0]["up"]) is nn.Linear and model.blocks[0]["up"].weight.dtype == torch.float32
    torch.testing.assert_close(model(ids), y8, rtol=0.05, atol=0.05)  # int8 matmul vs the dense dequantized one


def test_prepare_model_for_kbit_training_keeps_packed_weights():
    model = Toy().to(torch.bfloat16)
    nf4kit.quantize_model(model, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=torch.bfloat16,
                                                    llm_int8_skip_modules=[]))
    packed = {n: p.data.clone() for n, p in model.named_parameters() if isinstance(p, Params4bit)}
    with pytest.warns(UserWarning, match="checkpointing"):  # a plain nn.Module has none
        nf4kit.prepare_model_for_kbit_training(model)
    for name, p in model.named_parameters():
        assert not p.requires_grad
        if name in packed:
            assert p.dtype == torch.bfloat16 and torch.equal(as_bytes(p), as_bytes(packed[name]))
        else:
            assert p.dtype == torch.float32, name
