"""LoRA (PEFT) on nf4kit's 4-bit layers.

``import nf4kit`` makes PEFT (once imported) wrap every ``nf4kit.nn.Linear4bit`` (``Linear8bitLt``)
that a LoraConfig targets in ``LoraLinear4bit`` (``LoraLinear8bitLt``, see ``register``), so ``get_peft_model(model, LoraConfig(...))``
works unchanged. To do it per config instead: ``nf4kit.integrations.peft.add_to_config(config)``
(PEFT's custom-module mechanism).

``LoraLinear4bit`` (``LoraLinear8bitLt``) is PEFT's dense LoRA layer around the quantized base
layer: forward is the base layer's (nf4kit's matmul) plus the adapters; merge / unmerge dequantize
the weight, add or subtract the adapter's delta and quantize it again (exact to the 4-bit / int8
rounding). PEFT's helper
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
from ..nn.linear8bit import Int8Params, Linear8bitLt
from ..nn.linear8bit import dequantize_weight as dequantize_int8_weight


class _LoraQuantizedLinear(_lora_layer.Linear):
    """PEFT's dense LoRA Linear around a quantized nf4kit layer; merge / unmerge go through the
    full-precision weight and quantize it again. Subclasses say how to dequantize and requantize."""

    quantized_type: type = type(None)

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs):
        kwargs.pop("is_target_conv_1d_layer", None)
        if config.fan_in_fan_out:
            warnings.warn(f"fan_in_fan_out=True does not apply to a {self.quantized_type.__name__}; using False",
                          stacklevel=2)
            config.fan_in_fan_out = False
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)

    def _dequantized(self, base) -> torch.Tensor:
        raise NotImplementedError

    def _requantize(self, base, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def _merged_weight(self, adapter: str, sign: int, safe_merge: bool) -> torch.Tensor:
        weight = self._dequantized(self.get_base_layer()).float()
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

    def _base_is_quantized(self) -> bool:
        # After nf4kit.dequantize_model the base layer is a plain nn.Linear: merge densely (exactly).
        return isinstance(self.get_base_layer(), self.quantized_type)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if not self._base_is_quantized():
            return super().merge(safe_merge, adapter_names)
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A.keys():
                continue
            self._requantize(self.get_base_layer(), self._merged_weight(adapter, +1, safe_merge))
            self._update_bias(adapter, +1)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self._base_is_quantized():
            return super().unmerge()
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A.keys():
                continue
            self._requantize(self.get_base_layer(), self._merged_weight(adapter, -1, False))
            self._update_bias(adapter, -1)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class LoraLinear4bit(_LoraQuantizedLinear):
    """LoRA around an nf4kit Linear4bit."""

    quantized_type = Linear4bit

    def _dequantized(self, base) -> torch.Tensor:
        return base.weight.dequantize()

    def _requantize(self, base, weight: torch.Tensor) -> None:
        old = base.weight
        base.weight = Params4bit(weight.to(old.quant_state.dtype), requires_grad=False, blocksize=old.blocksize,
                                 compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                 quant_storage=old.quant_storage, module=base)._quantize(old.device)


class LoraLinear8bitLt(_LoraQuantizedLinear):
    """LoRA around an nf4kit Linear8bitLt (int8 weights: has_fp16_weights=False)."""

    quantized_type = Linear8bitLt if Linear8bitLt is not None else type(None)

    def _dequantized(self, base) -> torch.Tensor:
        return _int8_dequantized(base.weight, base.state, torch.float32)

    def _requantize(self, base, weight: torch.Tensor) -> None:
        new = Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
        base.weight = new._quantize(base.weight.device)
        base.state.reset_grads()  # the next forward takes CB / SCB from the new weight


def _int8_dequantized(weight, state, dtype) -> torch.Tensor:
    if weight.dtype != torch.int8:
        return weight.detach().to(dtype)
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else getattr(state, "SCB", None)
    if scb is None:
        raise RuntimeError("this int8 weight has no row scales (SCB) to dequantize it with")
    return dequantize_int8_weight(weight.data, scb, dtype)


def dispatch_nf4kit(target: torch.nn.Module, adapter_name: str, config, **kwargs) -> Optional[torch.nn.Module]:
    """PEFT dispatcher: LoraLinear4bit / LoraLinear8bitLt for nf4kit's layers, None for anything else."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if kwargs.get("parameter_name") is not None:
        return None
    kwargs = {k: v for k, v in kwargs.items() if k != "parameter_name"}
    if isinstance(base, Linear4bit):
        return LoraLinear4bit(target, adapter_name, config=config, **kwargs)
    if Linear8bitLt is not None and isinstance(base, Linear8bitLt):
        return LoraLinear8bitLt(target, adapter_name, config=config, **kwargs)
    return None


def add_to_config(lora_config) -> None:
    """Register nf4kit's LoRA layers on one LoraConfig (PEFT's custom-module API)."""
    mapping = {Linear4bit: LoraLinear4bit}
    if Linear8bitLt is not None:
        mapping[Linear8bitLt] = LoraLinear8bitLt
    lora_config._register_custom_module(mapping)


def _dequantize_weight(weight: torch.nn.Parameter, state=None, _original=None):
    if isinstance(weight, Params4bit):
        return weight.dequantize()
    if Int8Params is not None and isinstance(weight, Int8Params):
        return _int8_dequantized(weight, state, torch.float32)
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
