"""prepare_model_for_kbit_training: what peft's function of that name does, for nf4kit layers.

Freezes every parameter, casts the float16/bfloat16 parameters that are not quantized (norms,
embeddings, heads) to float32, makes the input embeddings' output require grad and turns on
gradient checkpointing. Packed 4-bit and int8 weights are never cast, whatever their storage dtype
(a Params4bit with bf16 quant_storage is bytes, not bf16 numbers).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
from torch import nn

from .params4bit import Params4bit

from .linear8bit import Int8Params


def _is_quantized_param(p: torch.nn.Parameter) -> bool:
    if isinstance(p, Params4bit):
        return True
    if Int8Params is not None and isinstance(p, Int8Params):
        return True
    return type(p).__name__ in ("Params4bit", "Int8Params")  # bitsandbytes' own, if mixed in


def _make_inputs_require_grad(module, inputs, output):
    output.requires_grad_(True)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict] = None,
) -> nn.Module:
    """Get a quantized model ready for (Q)LoRA training; returns the model (changed in place).

    ``gradient_checkpointing_kwargs`` goes to transformers' ``activation_checkpointing_enable``
    (formerly ``gradient_checkpointing_enable``), e.g. ``{"use_reentrant": False}``; the default is
    reentrant checkpointing, as peft's. Models without that method train without checkpointing
    (a warning says so).
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    kwargs.setdefault("use_reentrant", True)  # peft's (and torch's historical) default, said explicitly
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and not _is_quantized_param(p):
            p.data = p.data.to(torch.float32)
    if not use_gradient_checkpointing:
        return model
    # Reentrant checkpointing needs an input that requires grad, or no gradient reaches the adapters.
    if kwargs["use_reentrant"]:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
            model.get_input_embeddings().register_forward_hook(_make_inputs_require_grad)
    # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias).
    enable = getattr(model, "activation_checkpointing_enable", None)
    name = "activation_checkpointing_kwargs"
    if enable is None:
        enable, name = getattr(model, "gradient_checkpointing_enable", None), "gradient_checkpointing_kwargs"
    if enable is None:
        warnings.warn(f"{type(model).__name__} has no activation_checkpointing_enable(); training without "
                      "gradient checkpointing", stacklevel=2)
    elif name in inspect.signature(enable).parameters:
        enable(**{name: kwargs})
    else:
        enable()
    return model
