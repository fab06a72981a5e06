"""quantize_model / dequantize_model: swap a model's nn.Linear layers for 4-bit (or 8-bit) ones in
place, and back.

Only the linear layers change: every other parameter and buffer keeps its tensor, dtype and
device. Each layer is quantized where its weight is (CPU or GPU) and its full-precision weight is
freed before the next one, so the peak is about the quantized model plus one layer.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..config import BitsAndBytesConfig
from .linear4bit import Linear4bit
from .params4bit import Params4bit

from .linear8bit import Int8Params, Linear8bitLt
from .linear8bit import dequantize_weight as dequantize_int8_weight


def matches_module(name: str, patterns: Optional[Iterable[str]]) -> bool:
    """Whether module ``name`` is named by one of ``patterns``: the name itself, a prefix of it up
    to a dot ('model.layers.0' names 'model.layers.0.mlp.up_proj'), or a dotted suffix ('lm_head',
    'mlp.down_proj')."""
    if not patterns:
        return False
    dotted = "." + name + "."
    return any(name == p or name.startswith(p + ".") or ("." + p + ".") in dotted for p in patterns)


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): a linear layer whose weight is stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _linear_like(module: nn.Module) -> bool:
    return type(module) is nn.Linear or _is_conv1d(module)


def default_skip_modules(model: nn.Module) -> list[str]:
    """What stays in full precision when the config names nothing: the output head (the model's
    ``get_output_embeddings()``, a linear layer tied to an input embedding, or, as transformers
    does, the module holding the model's last parameter)."""
    names: set[str] = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding_storages = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)
                          and m.weight.device.type != "meta"}
    for name, module in model.named_modules():
        if module is head and head is not None:
            names.add(name)
        elif _linear_like(module) and module.weight.device.type != "meta" and module.weight.data_ptr() in embedding_storages:
            names.add(name)
    params = list(model.named_parameters())
    if params:
        names.add(params[-1][0].rpartition(".")[0])
    return sorted(n for n in names if n)


def _new_4bit(module: nn.Module, config: BitsAndBytesConfig, compute_dtype) -> Linear4bit:
    weight = module.weight.detach()
    if _is_conv1d(module):
        weight = weight.t()
    out_features, in_features = weight.shape
    with torch.device("meta"):
        new = Linear4bit(in_features, out_features, bias=module.bias is not None, compute_dtype=compute_dtype,
                         compress_statistics=config.bnb_4bit_use_double_quant, quant_type=config.bnb_4bit_quant_type,
                         quant_storage=config.bnb_4bit_quant_storage, blocksize=config.bnb_4bit_blocksize)
    new.weight = Params4bit(weight, requires_grad=False, blocksize=config.bnb_4bit_blocksize,
                            compress_statistics=config.bnb_4bit_use_double_quant,
                            quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage,
                            module=new)
    if weight.device.type != "meta":
        new.weight._quantize(weight.device)
    new.bias = module.bias
    return new


def _new_8bit(module: nn.Module, config: BitsAndBytesConfig) -> nn.Module:
    weight = module.weight.detach()
    if _is_conv1d(module):
        weight = weight.t()
    out_features, in_features = weight.shape
    fp16_weights = config.llm_int8_has_fp16_weight
    with torch.device("meta"):
        new = Linear8bitLt(in_features, out_features, bias=module.bias is not None, has_fp16_weights=fp16_weights,
                           threshold=config.llm_int8_threshold)
    new.weight = Int8Params(weight, requires_grad=fp16_weights, has_fp16_weights=fp16_weights)
    if weight.device.type != "meta" and not fp16_weights:
        new.weight._quantize(weight.device)  # where the weight is (Int8Params.to quantizes only from the CPU)
    new.bias = module.bias
    return new


_DEFAULT = object()


def quantize_model(model: nn.Module, config: Optional[BitsAndBytesConfig] = None, *,
                   compute_dtype=_DEFAULT) -> nn.Module:
    """Replace, in place, every nn.Linear of ``model`` (and transformers' Conv1D) by a Linear4bit
    (``config.load_in_4bit``) or Linear8bitLt (``load_in_8bit``), quantized where it is.

    ``config`` defaults to NF4 with nested absmax; the modules named in
    ``config.llm_int8_skip_modules`` (None: the output head, see ``default_skip_modules``) stay as
    they are. ``compute_dtype`` defaults to the config's ``bnb_4bit_compute_dtype``, or, with no
    config, to None (each layer computes in its input's dtype). Returns the model.
    """
    if config is None:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
        compute_dtype = None if compute_dtype is _DEFAULT else compute_dtype
    elif not isinstance(config, BitsAndBytesConfig):
        raise TypeError(f"config must be a nf4kit.BitsAndBytesConfig, got {type(config).__name__}")
    if compute_dtype is _DEFAULT:
        compute_dtype = config.bnb_4bit_compute_dtype
    if not config.is_quantizable():
        raise ValueError("config asks for no quantization: set load_in_4bit=True or load_in_8bit=True")
    skip = config.llm_int8_skip_modules
    if skip is None:
        skip = default_skip_modules(model)
    targets = [(name, m) for name, m in model.named_modules() if name and _linear_like(m) and not matches_module(name, skip)]
    for name, module in targets:
        new = _new_8bit(module, config) if config.load_in_8bit else _new_4bit(module, config, compute_dtype)
        new.train(module.training)
        model.set_submodule(name, new)
        del module
    model.is_loaded_in_4bit = config.load_in_4bit
    model.is_loaded_in_8bit = config.load_in_8bit
    return model


def _dequantized_weight(module: nn.Module, dtype: Optional[torch.dtype]) -> torch.Tensor:
    if isinstance(module, Linear4bit):
        return module.weight.dequantize()
    w = module.weight  # Linear8bitLt: int8 codes and row scales (on the weight, or moved to the state)
    if w.dtype != torch.int8:
        return w.detach().clone()
    scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
    if dtype is None:
        dtype = module.bias.dtype if module.bias is not None else torch.float32
    return dequantize_int8_weight(w.data, scb, dtype)


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Undo ``quantize_model`` in place: each Linear4bit / Linear8bitLt becomes an nn.Linear
    holding its dequantized weight (in ``dtype``; default: the dtype a 4-bit weight was quantized
    from, the bias' dtype (else float32) for an 8-bit one, which does not record it)."""
    kinds = (Linear4bit,) + ((Linear8bitLt,) if Linear8bitLt is not None else ())
    for name, module in [(n, m) for n, m in model.named_modules() if n and isinstance(m, kinds)]:
        weight = _dequantized_weight(module, dtype)
        if dtype is not None:
            weight = weight.to(dtype)
        with torch.device("meta"):
            new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        new.weight = nn.Parameter(weight)
        if module.bias is not None:
            new.bias = module.bias
        new.train(module.training)
        model.set_submodule(name, new)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    return model
