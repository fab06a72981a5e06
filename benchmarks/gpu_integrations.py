"""GPU check of nf4kit's integrations: QLoRA through transformers + PEFT on a small random Llama
(from_pretrained with nf4kit's config, prepare_model_for_kbit_training, LoRA, 50 AdamW steps),
against bf16 LoRA on the same model; and nf4kit vs bitsandbytes (CUDA) on the same weights.

    python3 benchmarks/gpu_integrations.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import nf4kit

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_checkpoint(path, hidden, inter, layers, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)


def lora_run(path, quantized: bool, steps: int, batch: int, seq: int, vocab: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kwargs = dict(dtype=torch.bfloat16, device_map={"": 0})
    if quantized:
        kwargs["quantization_config"] = nf4kit.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    weights_mb = (torch.cuda.memory_allocated() - base) / 2**20
    if quantized:
        nf4kit.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=g)
    losses, times = [], []
    model.train()
    for _ in range(steps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        losses.append(loss.item())
    result = {"weights_MiB": weights_mb, "peak_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20,
              "loss_first": losses[0], "loss_last5": sum(losses[-5:]) / 5,
              "finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
              "ms_per_step_median": sorted(times[5:])[len(times[5:]) // 2]}
    if quantized:
        model.eval()
        with torch.no_grad():
            y_lora = model(ids[:2]).logits.float()
            merged = model.merge_and_unload()
            y_merged = merged(ids[:2]).logits.float()
        result["merge_rel_diff"] = ((y_merged - y_lora).norm() / y_lora.norm()).item()
        result["linear4bit_after_merge"] = sum(isinstance(m, nf4kit.Linear4bit) for m in merged.modules())
    del model, opt
    return result


def versus_bitsandbytes() -> dict:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        return {"skipped": f"bitsandbytes not importable: {exc}"}
    out = {}
    torch.manual_seed(1)
    for quant_type in ("nf4", "fp4"):
        W = torch.randn(4096, 4096, dtype=torch.float16, device="cuda")
        x = torch.randn(16, 4096, dtype=torch.float16, device="cuda")
        ours = nf4kit.Linear4bit(4096, 4096, bias=False, compute_dtype=torch.float16, quant_type=quant_type)
        theirs = bnb.nn.Linear4bit(4096, 4096, bias=False, compute_dtype=torch.float16, quant_type=quant_type)
        for layer in (ours, theirs):
            layer.weight.data = W.clone()
        ours, theirs = ours.cuda(), theirs.cuda()
        same_bytes = torch.equal(ours.weight.data, theirs.weight.data)
        deq_t = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
        same_deq = torch.equal(ours.weight.dequantize(), deq_t)
        with torch.no_grad():
            y_o, y_t = ours(x).float(), theirs(x).float()
            ref = x.double() @ deq_t.double().t()
        out[quant_type] = {"same_bytes": same_bytes, "same_dequantization": same_deq,
                           "rel_err_nf4kit": ((y_o - ref).norm() / ref.norm()).item(),
                           "rel_err_bnb": ((y_t - ref).norm() / ref.norm()).item(),
                           "rel_diff": ((y_o - y_t).norm() / y_t.norm()).item()}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    hidden, inter, layers, vocab, batch, seq = 1024, 2816, 8, 8192, 8, 256
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "model": f"random Llama hidden {hidden}, intermediate {inter}, {layers} layers, vocab {vocab}, bf16",
              "batch": batch, "seq": seq, "steps": args.steps}
    with tempfile.TemporaryDirectory() as d:
        build_checkpoint(d, hidden, inter, layers, vocab)
        report["qlora_nf4kit"] = lora_run(d, True, args.steps, batch, seq, vocab)
        report["lora_bf16"] = lora_run(d, False, args.steps, batch, seq, vocab)
    report["vs_bitsandbytes_cuda"] = versus_bitsandbytes()
    with open(os.path.join(args.out, "integrations.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
