"""nf4kit inside transformers' ``from_pretrained`` / ``save_pretrained``.

``import nf4kit`` registers (lazily, see ``nf4kit.integrations``) a quantizer and a config under
the quantization method ``"nf4kit"``. Then:

- ``from_pretrained(path, quantization_config=nf4kit.BitsAndBytesConfig(load_in_4bit=True, ...))``
  builds the model on the meta device with nf4kit layers and quantizes each weight as it is read,
  so the peak is about the quantized model plus one full-precision layer;
- ``save_pretrained`` writes the weights in bitsandbytes' layout and ``quant_method: "nf4kit"`` in
  config.json; ``from_pretrained(path)`` reloads it with nf4kit, no config needed;
- a checkpoint saved by transformers + bitsandbytes (``quant_method: "bitsandbytes"``) loads onto
  nf4kit's layers when ``quantization_config=nf4kit.BitsAndBytesConfig(...)`` is passed (its
  format fields come from the checkpoint, the compute dtype from the argument), when bitsandbytes
  is not installed, or after ``use_nf4kit_for_bitsandbytes(True)`` (or NF4KIT_FOR_BITSANDBYTES=1).

Importing this module needs transformers; ``import nf4kit`` does not.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional

import torch
from transformers.quantizers import auto as _auto
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import config as _config
from ..nn import Linear4bit, Params4bit, dequantize_model
from ..nn.linear8bit import Int8Params, Linear8bitLt

METHOD = _config.QUANT_METHOD
_prefer_nf4kit: Optional[bool] = None


class BitsAndBytesConfig(_config.BitsAndBytesConfig, QuantizationConfigMixin):
    """nf4kit's config as transformers registers it (same class name, so transformers' checks
    that a checkpoint's config and the argument are of one kind pass)."""


def _as_nf4kit_config(config: Any) -> _config.BitsAndBytesConfig:
    if isinstance(config, _config.BitsAndBytesConfig):
        return config
    d = config if isinstance(config, dict) else config.to_dict()
    return BitsAndBytesConfig.from_dict(d)


def use_nf4kit_for_bitsandbytes(enabled: Optional[bool] = True) -> None:
    """Load ``quant_method: "bitsandbytes"`` checkpoints (and ``transformers.BitsAndBytesConfig``)
    with nf4kit (True), with bitsandbytes (False), or decide by whether bitsandbytes is installed
    (None, the default; the env var NF4KIT_FOR_BITSANDBYTES=1/0 sets it too)."""
    global _prefer_nf4kit
    _prefer_nf4kit = enabled


def _nf4kit_handles_bitsandbytes() -> bool:
    if _prefer_nf4kit is not None:
        return _prefer_nf4kit
    env = os.environ.get("NF4KIT_FOR_BITSANDBYTES")
    if env is not None:
        return env not in ("", "0", "false", "False")
    return importlib.util.find_spec("bitsandbytes") is None


# ------------------------------------------------------------------------------------------------
# Weight conversion ops: called by transformers' loader once per weight
# ------------------------------------------------------------------------------------------------

def _conversion_ops():
    """The ConversionOps classes (transformers.core_model_loading is imported only when loading)."""
    global _OPS
    if _OPS is None:
        from transformers.core_model_loading import ConversionOps

        class Quantize(ConversionOps):
            """A full-precision weight in, its quantized parameter out (on the weight's device)."""

            def __init__(self, hf_quantizer):
                self.hf_quantizer = hf_quantizer

            def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
                result = {}
                for name, value in input_dict.items():
                    value = value[0] if isinstance(value, list) else value
                    module, _ = get_module_from_name(model, name)
                    if getattr(module, "source_cls", None) is not None and module.source_cls.__name__ == "Conv1D":
                        value = value.t()
                    result[name] = _quantized_param(module, value)
                    module._is_hf_initialized = True
                return result

        class Deserialize(ConversionOps):
            """A checkpoint's packed weight and its companions in, the quantized parameter out."""

            def __init__(self, hf_quantizer):
                self.hf_quantizer = hf_quantizer

            def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
                tensors = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
                if len(tensors) == 1:  # an unquantized weight (a skipped module)
                    return tensors
                module, _ = get_module_from_name(model, full_layer_name)
                weight = tensors.pop("weight")
                module._is_hf_initialized = True
                if isinstance(module, Linear4bit):
                    new = Params4bit.from_prequantized(weight, tensors, requires_grad=False, device=weight.device,
                                                       module=module)
                    module.quant_storage = new.quant_storage
                    return {"weight": new}
                return {"weight": _int8_from_checkpoint(module, weight, tensors)}

        _OPS = (Quantize, Deserialize)
    return _OPS


_OPS = None


def _quantized_param(module: torch.nn.Module, value: torch.Tensor) -> torch.nn.Parameter:
    old = module.weight
    if isinstance(module, Linear4bit):
        return Params4bit(value, requires_grad=False, blocksize=old.blocksize,
                          compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                          quant_storage=old.quant_storage, module=module)._quantize(value.device)
    fp16_weights = getattr(old, "has_fp16_weights", False)
    p = Int8Params(value, requires_grad=fp16_weights, has_fp16_weights=fp16_weights)
    return p if fp16_weights else p._quantize(value.device)  # on the weight's device


def _int8_from_checkpoint(module, weight, tensors):
    scb = next((v for k, v in tensors.items() if k.split(".")[-1] == "SCB"), None)
    if scb is None:
        raise ValueError("an 8-bit checkpoint weight comes without its 'SCB' row scales")
    if weight.dtype != torch.int8:
        raise ValueError(f"an 8-bit checkpoint weight must be int8, got {weight.dtype}")
    return Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight, SCB=scb.to(weight.device))


# ------------------------------------------------------------------------------------------------
# The quantizer
# ------------------------------------------------------------------------------------------------

class Nf4kitHfQuantizer(HfQuantizer):
    """transformers' quantizer for ``quant_method: "nf4kit"`` (4-bit Linear4bit or 8-bit
    Linear8bitLt, by the config)."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(_as_nf4kit_config(quantization_config), **kwargs)

    @property
    def _layer(self):
        return Linear8bitLt if self.quantization_config.load_in_8bit else Linear4bit

    @property
    def quantized_element_size(self) -> float:
        return 1.0 if self.quantization_config.load_in_8bit else 0.5

    @property
    def serialized_names(self) -> dict[str, list[str]]:
        if self.quantization_config.load_in_8bit:
            return {"weight": ["weight", "SCB", "weight_format"]}
        return {"weight": ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                           "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
                           "weight.quant_state.bitsandbytes__fp4"]}

    def param_element_size(self, model, param_name: str, param) -> float:
        if self.param_needs_quantization(model, param_name):
            return self.quantized_element_size
        return super().param_element_size(model, param_name, param)

    def get_weight_conversions(self):
        if hasattr(HfQuantizer, "get_load_operations"):  # transformers >= 5.2x: serialized_names + load ops
            return super().get_weight_conversions()
        if not self.pre_quantized:  # older 5.x: the converter is spelled out
            return []
        from transformers.core_model_loading import WeightConverter

        names = [n for n in self.serialized_names["weight"] if n != "weight"] + ["weight"]
        return [WeightConverter(source_patterns=names, target_patterns="weight",
                                operations=[_conversion_ops()[1](self)])]

    def validate_environment(self, *args, **kwargs):
        from .._ops import require_ops

        require_ops()
        if not self.quantization_config.is_quantizable():
            raise ValueError("nf4kit.BitsAndBytesConfig asks for no quantization: set load_in_4bit or load_in_8bit")

    def update_device_map(self, device_map):
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        return device_map

    def adjust_max_memory(self, max_memory):
        return {key: val * 0.90 for key, val in max_memory.items()}  # room for one layer being quantized

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, self._layer) and name == "weight"

    def _process_model_before_weight_loading(self, model, device_map=None, **kwargs):
        cfg = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None))
        if cfg.llm_int8_enable_fp32_cpu_offload and isinstance(device_map, dict):
            self.modules_to_not_convert += [k for k, v in device_map.items() if v in ("disk", "cpu")]
        replace_with_nf4kit_linear(model, self.modules_to_not_convert, cfg, self.pre_quantized)

    def _process_model_after_weight_loading(self, model, **kwargs):
        model.is_loaded_in_4bit = self.quantization_config.load_in_4bit
        model.is_loaded_in_8bit = self.quantization_config.load_in_8bit
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        return dequantize_model(model, dtype)

    def get_quantize_ops(self):
        return _conversion_ops()[0](self)

    def get_load_operations(self):
        return {"deserialize": _conversion_ops()[1]}


def replace_with_nf4kit_linear(model, modules_to_not_convert, quantization_config, pre_quantized: bool = False):
    """Swap nn.Linear (and transformers' Conv1D) for nf4kit layers, on the meta device."""
    from transformers.pytorch_utils import Conv1D

    cfg = quantization_config
    replaced = 0
    for name, module in list(model.named_modules()):
        if not name or not should_convert_module(name, modules_to_not_convert):
            continue
        if not (type(module) is torch.nn.Linear or isinstance(module, Conv1D)):
            continue
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
        else:
            in_features, out_features = module.in_features, module.out_features
        with torch.device("meta"):
            if cfg.load_in_8bit:
                new = Linear8bitLt(in_features, out_features, module.bias is not None,
                                   has_fp16_weights=cfg.llm_int8_has_fp16_weight, threshold=cfg.llm_int8_threshold)
                if pre_quantized:
                    new.weight.data = new.weight.data.to(torch.int8)
            else:
                new = Linear4bit(in_features, out_features, module.bias is not None, cfg.bnb_4bit_compute_dtype,
                                 compress_statistics=cfg.bnb_4bit_use_double_quant,
                                 quant_type=cfg.bnb_4bit_quant_type, quant_storage=cfg.bnb_4bit_quant_storage,
                                 blocksize=cfg.bnb_4bit_blocksize)
                if pre_quantized:
                    new.weight.data = new.weight.data.to(cfg.bnb_4bit_quant_storage)
        new.source_cls = type(module)
        new.requires_grad_(False)
        model.set_submodule(name, new)
        replaced += 1
    if not replaced:
        import warnings

        warnings.warn("nf4kit found no nn.Linear layer to quantize in this model", stacklevel=2)
    return model


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------

def _route(original):
    """transformers' bitsandbytes quantizer class, or nf4kit's where nf4kit handles bitsandbytes."""

    class Router(original):
        def __new__(cls, quantization_config, **kwargs):
            if _nf4kit_handles_bitsandbytes():
                return Nf4kitHfQuantizer(quantization_config, **kwargs)
            return original(quantization_config, **kwargs)

    Router.__name__ = Router.__qualname__ = original.__name__
    Router._nf4kit_original = original
    return Router


def _wrap_merge():
    """When the user passes nf4kit's config for a pre-quantized checkpoint (bitsandbytes' or
    nf4kit's), load it with nf4kit: the checkpoint says what the bytes are, the argument how to
    compute (compute dtype, int8 threshold, CPU offload)."""
    cls = _auto.AutoHfQuantizer
    original = cls.__dict__["merge_quantization_configs"].__func__
    if getattr(original, "_nf4kit", False):
        return

    def merge_quantization_configs(klass, quantization_config, quantization_config_from_args):
        if isinstance(quantization_config_from_args, _config.BitsAndBytesConfig):
            d = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
            method = getattr(d.get("quant_method"), "value", d.get("quant_method"))
            if method in (METHOD, "bitsandbytes") or d.get("load_in_4bit") or d.get("load_in_8bit"):
                merged = BitsAndBytesConfig.from_dict(d)
                args = quantization_config_from_args
                merged.bnb_4bit_compute_dtype = args.bnb_4bit_compute_dtype
                merged.llm_int8_threshold = args.llm_int8_threshold
                merged.llm_int8_enable_fp32_cpu_offload = args.llm_int8_enable_fp32_cpu_offload
                return merged
        return original(klass, quantization_config, quantization_config_from_args)

    merge_quantization_configs._nf4kit = True
    cls.merge_quantization_configs = classmethod(merge_quantization_configs)


def register() -> None:
    """Register nf4kit's quantizer and config with transformers (idempotent)."""
    if METHOD not in _auto.AUTO_QUANTIZER_MAPPING:
        _auto.register_quantizer(METHOD)(Nf4kitHfQuantizer)
    if METHOD not in _auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        _auto.register_quantization_config(METHOD)(BitsAndBytesConfig)
    for key in ("bitsandbytes_4bit", "bitsandbytes_8bit"):
        current = _auto.AUTO_QUANTIZER_MAPPING.get(key)
        if current is not None and not hasattr(current, "_nf4kit_original"):
            _auto.AUTO_QUANTIZER_MAPPING[key] = _route(current)
    _wrap_merge()


register()  # importing this module is asking for the integration
