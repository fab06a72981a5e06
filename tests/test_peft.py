"""PEFT: LoRA on nf4kit's Linear4bit (QLoRA training, merge / unmerge), prepare_model_for_kbit_training."""
import pytest
import torch

import nf4kit
import nf4kit.functional as F
from nf4kit import BitsAndBytesConfig, Linear4bit, Params4bit

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from nf4kit.integrations.peft import LoraLinear4bit, add_to_config  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qlora_model(dtype=torch.float32, storage=torch.uint8, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=storage)
    return nf4kit.quantize_model(model, q)


def packed_weights(model):
    return {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
            for n, p in model.named_parameters() if isinstance(p, Params4bit)}


def test_qlora_training_lowers_the_loss():
    model = qlora_model()
    before = packed_weights(model)
    nf4kit.prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    layers = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(layers) == 2 * len(TARGETS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    model.train()
    for _ in range(50):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0], losses
    after = packed_weights(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _one_layer(seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(128, 96))
    nf4kit.quantize_model(base, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, llm_int8_skip_modules=[]))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0))
    layer = model.base_model.model[0]
    assert isinstance(layer, LoraLinear4bit)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)  # a trained-looking adapter
    return model, layer


def _requant(W):
    packed, state = F.quantize_4bit(W, compress_statistics=True, quant_type="nf4")
    return F.dequantize_4bit(packed, state)


def test_merge_unmerge_exact_to_the_4bit_rounding():
    model, layer = _one_layer()
    W0 = layer.get_base_layer().weight.dequantize()
    delta = layer.get_delta_weight("default")
    x = torch.randn(5, 128)
    with torch.no_grad():
        y_lora = model(x)
        layer.merge()
        merged = layer.get_base_layer().weight
        assert isinstance(merged, Params4bit) and merged.bnb_quantized
        assert torch.equal(merged.dequantize(), _requant(W0 + delta))  # dequantize, add, quantize: nothing else
        rel = (merged.dequantize() - (W0 + delta)).norm() / (W0 + delta).norm()
        assert rel < 0.12  # NF4's own rounding error (0.092 on Gaussian weights)
        y_merged = model(x)
        layer.unmerge()
        W2 = layer.get_base_layer().weight.dequantize()
        assert torch.equal(W2, _requant(merged.dequantize() - delta))
        assert (W2 - W0).norm() / W0.norm() < 0.2  # two NF4 roundings (merge, then unmerge)
    assert (y_merged - y_lora).norm() / y_lora.norm() < 0.12


def test_merge_and_unload_and_exact_dense_merge():
    model, layer = _one_layer(seed=1)
    W0 = layer.get_base_layer().weight.dequantize()
    delta = layer.get_delta_weight("default")
    x = torch.randn(5, 128)
    with torch.no_grad():
        y_lora = model(x)
        unloaded = model.merge_and_unload()
    assert isinstance(unloaded[0], Linear4bit)
    assert torch.equal(unloaded[0].weight.dequantize(), _requant(W0 + delta))
    # exact merge: dequantize first, then merge densely
    model, layer = _one_layer(seed=1)
    with torch.no_grad():
        nf4kit.dequantize_model(model)
        assert type(layer.get_base_layer()) is torch.nn.Linear
        dense = model.merge_and_unload()
        torch.testing.assert_close(dense(x), y_lora, rtol=1e-5, atol=1e-5)


def test_lora_on_8bit_layers():
    from nf4kit.integrations.peft import LoraLinear8bitLt
    from nf4kit.nn.linear8bit import dequantize_weight, quantize_weight

    torch.manual_seed(3)
    base = torch.nn.Sequential(torch.nn.Linear(128, 96))
    nf4kit.quantize_model(base, BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[]))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0))
    layer = model.base_model.model[0]
    assert isinstance(layer, LoraLinear8bitLt)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    x = torch.randn(5, 128)
    with torch.no_grad():
        y_lora = model(x)
        w = layer.get_base_layer().weight
        W0 = dequantize_weight(w.data, w.SCB if w.SCB is not None else layer.get_base_layer().state.SCB, torch.float32)
        delta = layer.get_delta_weight("default")
        layer.merge()
        CB, SCB = quantize_weight((W0 + delta).half())
        assert torch.equal(layer.get_base_layer().weight.data, CB)
        torch.testing.assert_close(model(x), y_lora, rtol=0.05, atol=0.05)


def test_custom_module_config_and_dora():
    model = qlora_model(seed=2)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    add_to_config(config)  # PEFT's custom-module mechanism, the per-config alternative
    model = get_peft_model(model, config)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear4bit) and "default" in layer.lora_magnitude_vector
    ids = torch.randint(0, 128, (2, 8))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert layer.lora_magnitude_vector["default"].weight.grad is not None
    assert torch.isfinite(out.loss)


def test_prepare_model_for_kbit_training_on_a_transformers_model():
    model = qlora_model(dtype=torch.bfloat16, storage=torch.bfloat16)
    packed = packed_weights(model)
    nf4kit.prepare_model_for_kbit_training(model)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    for name, p in model.named_parameters():
        assert not p.requires_grad
        if name in packed:  # packed bytes in bf16 storage: never cast
            assert p.dtype == torch.bfloat16 and torch.equal(p.view(torch.int16), packed[name].view(torch.int16))
        else:
            assert p.dtype == torch.float32, name
    emb = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert emb.requires_grad  # input grads on, for reentrant checkpointing
