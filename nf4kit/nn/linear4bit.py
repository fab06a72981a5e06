"""Linear4bit (and LinearNF4 / LinearFP4): nn.Linear with a 4-bit weight, as bitsandbytes' layers.

The weight is quantized when the layer moves to a device (``.to(device)``, ``.cuda()``, ``.cpu()``)
or on ``.quantize()``; forward runs ``nf4kit.functional.matmul_4bit``. The state_dict is
bitsandbytes' layout (FORMAT.md): the packed ``weight`` plus ``weight.absmax``, ``weight.quant_map``,
[``weight.nested_absmax``, ``weight.nested_quant_map``,] ``weight.quant_state.bitsandbytes__<type>``,
all tensors (safetensors can store them). ``load_state_dict(strict=True)`` reads that layout, from
nf4kit or from bitsandbytes, and also a full-precision ``weight`` (an nn.Linear's), which it
quantizes when the layer already is.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .. import functional as F
from .params4bit import Params4bit

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


class Linear4bit(nn.Linear):
    """``y = x @ W.t() + b`` with W stored in 4 bits (QLoRA's layer).

    Args as bitsandbytes': ``compute_dtype`` the dtype the matmul runs in (None: the input's);
    ``compress_statistics`` nests the absmax; ``quant_type`` 'fp4' (default) or 'nf4';
    ``quant_storage`` the dtype the packed bytes are viewed as; nf4kit adds ``blocksize``.
    The output has the input's dtype.
    """

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device=None,
        *,
        blocksize: int = 64,
    ):
        if compute_dtype is not None and compute_dtype not in F.FLOAT_DTYPES:
            raise ValueError(f"compute_dtype must be None, float16, bfloat16 or float32, got {compute_dtype!r}")
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(self.weight.data, requires_grad=False, blocksize=blocksize,
                                 compress_statistics=compress_statistics, quant_type=quant_type,
                                 quant_storage=quant_storage, module=self)
        self.compute_dtype = compute_dtype
        self.compute_type_is_set = compute_dtype is not None
        self.quant_state = None
        self.quant_storage = quant_storage

    def quantize(self, device=None) -> "Linear4bit":
        """Quantize the weight in place (on ``device``, default where it is); returns self."""
        self.weight.quantize(device)
        if self.bias is not None and device is not None:
            self.bias.data = self.bias.data.to(device)
        return self

    def _packed_weight(self) -> Params4bit:
        w = self.weight
        if not isinstance(w, Params4bit):
            # A wrapper (FSDP) replaced the Parameter: the module still knows the QuantState.
            if self.quant_state is None:
                raise RuntimeError("Linear4bit lost its weight's QuantState and has none of its own")
            w = self.weight = Params4bit(w.data, requires_grad=False, quant_state=self.quant_state,
                                         blocksize=self.quant_state.blocksize, quant_type=self.quant_state.quant_type,
                                         quant_storage=w.dtype, module=self, bnb_quantized=True)
        elif w.quant_state is None and w.bnb_quantized and self.quant_state is not None:
            w.quant_state = self.quant_state
        if not w.bnb_quantized:
            raise RuntimeError(
                "Linear4bit's weight is not quantized yet: move the layer to its device (.to(device), .cuda(), "
                ".cpu()) or call .quantize() first")
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._packed_weight()
        compute_dtype = self.compute_dtype if self.compute_dtype is not None else x.dtype
        if compute_dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16):
            _warn_once(
                f"Linear4bit gets {x.dtype} input but computes in float32 (compute_dtype / bnb_4bit_compute_dtype), "
                f"which is needlessly slow: set compute_dtype={x.dtype} for speed")
        # (the casts only where the dtypes differ: a no-op .to() still costs a dispatch on the host)
        out = F.matmul_4bit(x if x.dtype == compute_dtype else x.to(compute_dtype), w, quant_state=w.quant_state,
                            bias=self.bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    # --- state_dict: bitsandbytes' layout ---------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = self.weight
        if isinstance(w, Params4bit) and w.bnb_quantized and w.quant_state is not None:
            for key, value in w.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        stats = {k[len(key) + 1:]: v for k, v in state_dict.items() if k.startswith(key + ".")}
        weight = self._parameters.pop("weight")
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            self._parameters["weight"] = weight
        consumed = {key} | {key + "." + k for k in stats}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in consumed]
        if key not in state_dict:
            missing_keys.append(key)
            return
        try:
            self._load_weight(state_dict[key], stats, local_metadata.get("assign_to_params_buffers", False))
        except (ValueError, TypeError, RuntimeError) as exc:
            error_msgs.append(f"While loading {key}: {exc}")

    def _load_weight(self, value: torch.Tensor, stats: dict, assign: bool) -> None:
        old = self.weight
        device = old.device if old.device.type != "meta" else value.device
        if stats:  # packed 4-bit with its QuantState
            new = Params4bit.from_prequantized(value, stats, requires_grad=False, device=device, module=self)
            shape = tuple(new.quant_state.shape)
            if shape != (self.out_features, self.in_features):
                raise ValueError(f"the checkpoint's 4-bit weight has shape {shape}, this layer "
                                 f"({self.in_features} -> {self.out_features}) needs {(self.out_features, self.in_features)}")
            self.weight = new
            self.quant_storage = new.quant_storage
            return
        if tuple(value.shape) != (self.out_features, self.in_features):
            raise ValueError(f"size mismatch: copying a weight of shape {tuple(value.shape)}, the layer's is "
                             f"{(self.out_features, self.in_features)} (a packed 4-bit weight needs its "
                             "'weight.absmax', 'weight.quant_map', 'weight.quant_state.*' entries)")
        if not value.is_floating_point():
            raise TypeError(f"a full-precision weight must be a float tensor, got {value.dtype}")
        attrs = dict(blocksize=old.blocksize, compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                     quant_storage=old.quant_storage, module=self)
        if old.bnb_quantized:  # a float weight into a quantized layer: quantize it where the layer is
            self.weight = Params4bit(value.detach(), **attrs)._quantize(device)
        elif assign or old.device.type == "meta":
            self.weight = Params4bit(value.detach(), **attrs)
        else:
            with torch.no_grad():
                old.data.copy_(value)

    def extra_repr(self) -> str:
        w = self.weight
        qt = getattr(w, "quant_type", "?")
        s = f"{super().extra_repr()}, quant_type={qt}, compute_dtype={self.compute_dtype}"
        if not getattr(w, "bnb_quantized", False):
            s += ", not quantized"
        return s


class LinearFP4(Linear4bit):
    """Linear4bit with the FP4 code."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True,
                 quant_storage=torch.uint8, device=None, *, blocksize: int = 64):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "fp4",
                         quant_storage, device, blocksize=blocksize)


class LinearNF4(Linear4bit):
    """Linear4bit with the NF4 code (QLoRA's normal-float 4-bit)."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True,
                 quant_storage=torch.uint8, device=None, *, blocksize: int = 64):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "nf4",
                         quant_storage, device, blocksize=blocksize)
