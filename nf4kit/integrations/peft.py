"""LoRA (PEFT) on nf4kit's 4-bit layers.

``import nf4kit`` makes PEFT (once imported) wrap every ``nf4kit.nn.Linear4bit`` that a LoraConfig
targets in ``LoraLinear4bit`` (see ``register``), so ``get_peft_model(model, LoraConfig(...))``
works unchanged. To do it per config instead: ``nf4kit.integrations.peft.add_to_config(config)``
(PEFT's custom-module mechanism).

``LoraLinear4bit`` is PEFT's dense LoRA layer around the 4-bit base layer: forward is the base
layer's (nf4kit's matmul_4bit) plus the adapters; merge / unmerge dequantize the weight, add or
subtract the adapter's delta and quantize it again (exact to the 4-bit rounding). PEFT's helper
``dequantize_module_weight`` (DoRA, some initialisations) learns to dequantize nf4kit's weights.

Importing this module needs peft; ``import nf4kit`` does not.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners.lora import layer as _lora_layer
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import integrations as _peft_integrations

from ..nn import Linear4bit, Params4bit
from ..nn._int8 import Int8Params


class LoraLinear4bit(_lora_layer.Linear):
    """PEFT's LoRA Linear around an nf4kit Linear4bit (arguments as PEFT's layers take them)."""

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs):
        kwargs.pop("is_target_conv_1d_layer", None)
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True does not apply to a Linear4bit; using False", stacklevel=2)
            config.fan_in_fan_out = False
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)

    def _requantize(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` (full precision) into the base layer, with its old settings."""
        base = self.get_base_layer()
        old = base.weight
        base.weight = Params4bit(weight.to(old.quant_state.dtype), requires_grad=False, blocksize=old.blocksize,
                                 compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                 quant_storage=old.quant_storage, module=base)._quantize(old.device)

    def _merged_weight(self, adapter: str, sign: int, safe_merge: bool) -> torch.Tensor:
        base = self.get_base_layer()
        weight = base.weight.dequantize().float()
        if adapter in self.lora_variant:
            variant = self.lora_variant[adapter]
            weight = variant.merge_safe(self, adapter, weight) if sign > 0 else variant.unmerge(self, adapter, weight)
        else:
            weight = weight + sign * self.get_delta_weight(adapter).float()
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        return weight

    def _update_bias(self, adapter: str, sign: int) -> None:
        if self.lora_bias[adapter]:
            base = self.get_base_layer()
            if base.bias is None:
                raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
            base.bias.data += sign * self.lora_B[adapter].bias * self.scaling[adapter]

    def _base_is_4bit(self) -> bool:
        # After nf4kit.dequantize_model the base layer is a plain nn.Linear: merge densely (exactly).
        return isinstance(self.get_base_layer(), Linear4bit)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if not self._base_is_4bit():
            return super().merge(safe_merge, adapter_names)
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A.keys():
                continue
            self._requantize(self._merged_weight(adapter, +1, safe_merge))
            self._update_bias(adapter, +1)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self._base_is_4bit():
            return super().unmerge()
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A.keys():
                continue
            self._requantize(self._merged_weight(adapter, -1, False))
            self._update_bias(adapter, -1)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def dispatch_nf4kit(target: torch.nn.Module, adapter_name: str, config, **kwargs) -> Optional[torch.nn.Module]:
    """PEFT dispatcher: a LoraLinear4bit for an nf4kit Linear4bit, None for anything else."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, Linear4bit) and kwargs.get("parameter_name") is None:
        kwargs = {k: v for k, v in kwargs.items() if k != "parameter_name"}
        return LoraLinear4bit(target, adapter_name, config=config, **kwargs)
    return None


def add_to_config(lora_config) -> None:
    """Register LoraLinear4bit for Linear4bit on one LoraConfig (PEFT's custom-module API)."""
    lora_config._register_custom_module({Linear4bit: LoraLinear4bit})


def _dequantize_weight(weight: torch.nn.Parameter, state=None, _original=None):
    if isinstance(weight, Params4bit):
        return weight.dequantize()
    if Int8Params is not None and isinstance(weight, Int8Params) and hasattr(weight, "dequantize"):
        return weight.dequantize()
    return _original(weight, state=state)


def register() -> None:
    """Make PEFT pick LoraLinear4bit for nf4kit's layers (idempotent)."""
    original = LoraModel.__dict__["_create_new_module"].__func__
    if not getattr(original, "_nf4kit", False):
        def _create_new_module(lora_config, adapter_name, target, **kwargs):
            new = dispatch_nf4kit(target, adapter_name, lora_config, **kwargs)
            return new if new is not None else original(lora_config, adapter_name, target, **kwargs)

        _create_new_module._nf4kit = True
        LoraModel._create_new_module = staticmethod(_create_new_module)

    original_dq = _peft_integrations.dequantize_bnb_weight
    if not getattr(original_dq, "_nf4kit", False):
        def dequantize_bnb_weight(weight, state=None):
            return _dequantize_weight(weight, state, original_dq)

        dequantize_bnb_weight._nf4kit = True
        _peft_integrations.dequantize_bnb_weight = dequantize_bnb_weight


register()  # importing this module is asking for the integration
