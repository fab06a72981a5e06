"""transformers: from_pretrained(quantization_config=nf4kit.BitsAndBytesConfig(...)) quantizes while
loading, save_pretrained / from_pretrained round trip without the config, bitsandbytes checkpoints
load onto nf4kit's layers. Tiny random Llama models saved under tmp_path; nothing is downloaded."""
import gc
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import nf4kit
from nf4kit import BitsAndBytesConfig, Linear4bit

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from nf4kit.integrations import transformers as nf4kit_tf  # noqa: E402

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype=torch.float32)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(hidden=128, intermediate=256, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "fp"
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def quantized_reference(fp_dir, **kwargs):
    """The checkpoint's model quantized after loading, with quantize_model."""
    model = AutoModelForCausalLM.from_pretrained(fp_dir).eval()
    cfg = BitsAndBytesConfig(**(kwargs or NF4))
    return nf4kit.quantize_model(model, cfg)


def test_registered_with_transformers():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["nf4kit"] is nf4kit_tf.Nf4kitHfQuantizer
    assert issubclass(AUTO_QUANTIZATION_CONFIG_MAPPING["nf4kit"], nf4kit.BitsAndBytesConfig)


@pytest.mark.parametrize("code", [
    # nf4kit imports (and registers nothing) without transformers or peft
    "import sys; sys.modules['transformers'] = None; sys.modules['peft'] = None\n"
    "import nf4kit; assert 'transformers' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
    "nf4kit.BitsAndBytesConfig(load_in_4bit=True)",
    # lazily: importing transformers after nf4kit registers
    "import sys, nf4kit; assert 'transformers' not in sys.modules\n"
    "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; assert 'nf4kit' in M",
    # and so does importing nf4kit after transformers
    "import transformers.quantizers.auto as a, nf4kit; assert 'nf4kit' in a.AUTO_QUANTIZER_MAPPING",
])
def test_import_is_lazy_and_never_fails(code):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_from_pretrained_quantizes_while_loading(fp_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=BitsAndBytesConfig(**NF4))
    layer = model.model.layers[0]
    for name in LINEARS:
        m = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
        assert isinstance(m, Linear4bit) and m.weight.bnb_quantized and m.weight.quant_type == "nf4"
    assert type(model.lm_head) is torch.nn.Linear  # the output head stays, as transformers does for bnb
    assert model.is_loaded_in_4bit and model.config.quantization_config.quant_method == "nf4kit"
    assert torch.equal(logits(model, ids), logits(quantized_reference(fp_dir), ids))


def test_bfloat16_model(fp_dir, ids):
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=cfg, dtype=torch.bfloat16)
    q = model.model.layers[1].mlp.down_proj
    assert q.weight.quant_state.dtype == torch.bfloat16 and q.compute_dtype == torch.bfloat16
    assert not q.weight.compress_statistics and q.weight.quant_type == "fp4"
    out = logits(model, ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def _live_tensor_bytes():
    """Bytes of every distinct tensor storage Python can see (CPU tensors; meta ones hold nothing)."""
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                try:  # FakeTensors left over by torch.compile tests have no data pointer
                    s = obj.untyped_storage()
                    storages[s.data_ptr()] = s.nbytes()
                except (RuntimeError, NotImplementedError):
                    continue
    return sum(storages.values())


def _save_tiny_llama(path, hidden, intermediate):
    """A 4-layer tiny Llama saved to path (and dropped): its parameter bytes, and its largest linear
    weight's."""
    model = tiny_llama(hidden=hidden, intermediate=intermediate, layers=4)
    model.save_pretrained(path)
    fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(m.weight.numel() * m.weight.element_size() for m in model.modules()
                  if isinstance(m, torch.nn.Linear))
    return fp_bytes, largest


def test_peak_memory_is_quantized_model_plus_one_layer(tmp_path, monkeypatch):
    """Tensor accounting: before each weight is quantized, count every live tensor (the model so far,
    the one full-precision weight in hand, anything the loader holds)."""
    fp_bytes, largest = _save_tiny_llama(tmp_path, hidden=256, intermediate=1024)
    gc.collect()
    base = _live_tensor_bytes()
    seen = []
    quantize = nf4kit.Params4bit._quantize

    def counting(self, device=None):
        seen.append(_live_tensor_bytes() - base)
        return quantize(self, device)

    monkeypatch.setattr(nf4kit.Params4bit, "_quantize", counting)
    q = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(**NF4))
    monkeypatch.undo()
    gc.collect()
    final = _live_tensor_bytes() - base
    assert len(seen) == 4 * len(LINEARS)
    assert final < fp_bytes / 3  # 15.5 MiB of float32 weights become ~2.5 MiB
    assert max(seen) <= final + 2 * largest, (max(seen), final, largest, fp_bytes)
    assert isinstance(q.model.layers[3].mlp.up_proj, Linear4bit)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_gpu_memory_loading_onto_the_gpu(tmp_path):
    fp_bytes, largest = _save_tiny_llama(tmp_path, hidden=512, intermediate=2048)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    q = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(**NF4),
                                             device_map={"": 0})
    torch.cuda.synchronize()
    final, peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
    assert q.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    assert final < fp_bytes / 3
    assert peak <= final + 2 * largest + 2**21, (peak, final, largest, fp_bytes)


def test_save_pretrained_reloads_without_config(fp_dir, ids, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=BitsAndBytesConfig(**NF4))
    model.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "nf4kit" and qc["bits"] == 4 and "load_in_4bit" not in qc
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    prefix = "model.layers.0.mlp.up_proj.weight"
    assert {prefix, prefix + ".absmax", prefix + ".nested_absmax", prefix + ".quant_map",
            prefix + ".nested_quant_map", prefix + ".quant_state.bitsandbytes__nf4"} <= keys
    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # no quantization_config
    assert isinstance(again.model.layers[1].self_attn.o_proj, Linear4bit)
    assert isinstance(again.config.quantization_config, nf4kit.BitsAndBytesConfig)
    assert torch.equal(logits(again, ids), logits(model, ids))
    deq = again.dequantize()
    assert type(deq.model.layers[0].mlp.up_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(deq, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def bnb_dir(fp_dir, tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    path = tmp_path_factory.mktemp("llama") / "bnb"
    cfg = transformers.BitsAndBytesConfig(**NF4)
    with nf4kit_tf_use(False):
        model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=cfg)
    assert type(model.model.layers[0].mlp.up_proj).__module__.startswith("bitsandbytes")
    model.save_pretrained(path)
    return path


class nf4kit_tf_use:
    """use_nf4kit_for_bitsandbytes(value) for one block."""

    def __init__(self, value):
        self.value = value

    def __enter__(self):
        self.old = nf4kit_tf._prefer_nf4kit
        nf4kit_tf.use_nf4kit_for_bitsandbytes(self.value)

    def __exit__(self, *exc):
        nf4kit_tf.use_nf4kit_for_bitsandbytes(self.old)


def test_bitsandbytes_checkpoint_loads_onto_nf4kit(bnb_dir, fp_dir, ids):
    import bitsandbytes as bnb

    qc = json.loads((bnb_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes"
    with nf4kit_tf_use(False):
        theirs = AutoModelForCausalLM.from_pretrained(bnb_dir)  # transformers + bitsandbytes, untouched
    assert isinstance(theirs.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    ours = AutoModelForCausalLM.from_pretrained(bnb_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    assert isinstance(ours.model.layers[0].mlp.up_proj, Linear4bit)
    assert ours.model.layers[0].mlp.up_proj.weight.quant_type == "nf4"  # the checkpoint's, not the argument's fp4
    for name, m in ours.named_modules():
        if isinstance(m, Linear4bit):
            t = theirs.get_submodule(name)
            assert torch.equal(m.weight.data, t.weight.data), name
            assert torch.equal(m.weight.dequantize(), bnb.functional.dequantize_4bit(t.weight.data, t.weight.quant_state))
    # identical outputs to the same weights quantized by nf4kit from the full-precision checkpoint
    assert torch.equal(logits(ours, ids), logits(quantized_reference(fp_dir), ids))
    theirs.train()  # bnb's eval-mode CPU path repacks weights; the math is the same
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-4, atol=1e-4)
    with nf4kit_tf_use(True):  # no config passed: nf4kit handles quant_method "bitsandbytes"
        routed = AutoModelForCausalLM.from_pretrained(bnb_dir)
    assert isinstance(routed.model.layers[1].self_attn.q_proj, Linear4bit)
    assert torch.equal(logits(routed, ids), logits(ours, ids))


def test_load_in_8bit(fp_dir, ids, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    assert isinstance(model.model.layers[0].mlp.up_proj, nf4kit.Linear8bitLt)
    ref = AutoModelForCausalLM.from_pretrained(fp_dir)
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=0.05, atol=0.05)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again.model.layers[0].mlp.up_proj, nf4kit.Linear8bitLt)
    assert torch.equal(logits(again, ids), logits(model, ids))
