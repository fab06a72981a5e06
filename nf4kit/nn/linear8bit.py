"""LLM.int8() layers, bitsandbytes' names and state_dict layout: Int8Params, Linear8bitLt,
MatmulLtState and matmul.

Inference (``has_fp16_weights=False``): the weight is stored as int8 row codes (``CB``) with one
float32 absmax per output row (``SCB``); each forward quantizes the input row-wise, multiplies on
the int8 kernels with the dequantizing epilogue (and bias) fused, and, with ``threshold > 0``, adds
the input columns holding an outlier (|x| >= threshold) back in the input dtype against the
dequantized weight columns, as bitsandbytes does.

Differences from bitsandbytes 0.50.2, all on purpose:
- the input is quantized in its own dtype (bitsandbytes casts it to float16 first): identical codes
  for float16 and for bfloat16 within float16's range; no overflow to inf beyond it; float32 inputs
  keep their precision;
- a weight whose float16 cast would overflow is quantized in its own dtype (bitsandbytes would
  store a row of zeros);
- the gradient of an fp16 weight (``has_fp16_weights=True``) is the exact grad_out^T @ x in the
  input dtype (bitsandbytes computes it with int8 products);
- a quantized checkpoint loads into a layer that was not quantized yet (bitsandbytes asks for
  ``.cuda()`` first);
- with ``has_fp16_weights=True`` in eval mode, the cached int8 weight is refreshed when the weight
  changes (bitsandbytes keeps the first one).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .. import functional as F
from .._ops import ops, require_ops

__all__ = ["Int8Params", "Linear8bitLt", "MatmulLtState", "matmul"]

# bitsandbytes' weight_format codes (only "row" is in use).
LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING = {"row": 0, "col32": 1, "col_turing": 2, "col_ampere": 3}
INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING = {v: k for k, v in LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING.items()}


def quantize_weight(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 [N, K], SCB float32 [N]) of a float weight, as bitsandbytes: quantized after a cast to
    float16 (so checkpoints match byte for byte), unless that cast overflows a finite weight."""
    if W.dtype not in F.FLOAT_DTYPES:
        raise ValueError(f"the weight must be float16, bfloat16 or float32 to quantize, got {W.dtype}")
    if W.dim() != 2:
        raise ValueError(f"the weight must be 2-D [out_features, in_features], got shape {tuple(W.shape)}")
    W16 = W.contiguous().to(torch.float16)
    if W.dtype != torch.float16 and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(W16).all()) and bool(torch.isfinite(W).all()):
            W16 = W.contiguous()
    CB, SCB, _ = F.int8_vectorwise_quant(W16)
    return CB, SCB


def dequantize_weight(CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """CB * SCB / 127 in ``dtype`` (bitsandbytes' backward and PEFT-merge formula)."""
    return CB.to(dtype, copy=True).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))


class Int8Params(torch.nn.Parameter):
    """A weight that quantizes to int8 (CB, SCB) when moved to a device, unless has_fp16_weights."""

    def __new__(cls, data: Optional[torch.Tensor] = None, requires_grad: bool = True, has_fp16_weights: bool = False,
                CB: Optional[torch.Tensor] = None, SCB: Optional[torch.Tensor] = None, **kwargs: Any):
        if data is None:
            data = torch.empty(0)
        obj = torch.Tensor._make_subclass(cls, data, requires_grad)
        obj.CB = CB
        obj.SCB = SCB
        obj.has_fp16_weights = has_fp16_weights
        return obj

    def _quantize(self, device):
        if self.has_fp16_weights:
            return super().to(device)
        CB, SCB = quantize_weight(self.data.to(device=device))
        self.requires_grad_(False)  # an int8 tensor cannot require grad (bitsandbytes raises here)
        self.data = CB
        self.CB = CB
        self.SCB = SCB
        return self

    def cpu(self):
        return self.to(device="cpu")

    def cuda(self, device=None, non_blocking: bool = False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def __deepcopy__(self, memo):
        return type(self).__new__(
            type(self), data=copy.deepcopy(self.data, memo), requires_grad=self.requires_grad,
            has_fp16_weights=self.has_fp16_weights, CB=copy.deepcopy(self.CB, memo), SCB=copy.deepcopy(self.SCB, memo))

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        is_quantized = self.data.dtype == torch.int8
        if not is_quantized and device is not None and device.type != "meta" and self.data.device.type == "cpu":
            # Leaving the CPU (or `.to("cpu")`) quantizes, as in bitsandbytes.
            return self._quantize(device)
        # A quantized weight keeps its int8 dtype whatever dtype is asked for.
        new_param = Int8Params(
            super().to(device=device, dtype=None if is_quantized else dtype, non_blocking=non_blocking),
            requires_grad=self.requires_grad, has_fp16_weights=self.has_fp16_weights)
        if is_quantized:
            new_param.CB = new_param.data
            if self.SCB is not None:
                new_param.SCB = self.SCB if device is None or self.SCB.device.type == "meta" else self.SCB.to(device)
        return new_param


@dataclass
class MatmulLtState:
    """What the int8 matmul keeps between calls (bitsandbytes' fields; the deprecated ones are None)."""

    force_no_igemmlt: bool = False
    CB: Optional[torch.Tensor] = None
    SB: Optional[torch.Tensor] = None
    SCB: Optional[torch.Tensor] = None
    SBt: Optional[torch.Tensor] = None
    CBt: Optional[torch.Tensor] = None
    subB: Optional[torch.Tensor] = None
    outlier_pool: Any = None
    has_accumulated_gradients = False
    threshold = 0.0
    idx: Optional[torch.Tensor] = None
    is_training = True
    has_fp16_weights = True
    use_pool = False
    # The fp16 weight the cached CB/SCB came from (version counter, storage), has_fp16_weights only.
    _source: Optional[tuple] = None

    def reset_grads(self):
        self.CB = self.SB = self.SCB = self.SBt = self.CBt = None


def int8_linear(x: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: Optional[torch.Tensor],
                threshold: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """out [..., N] = x [..., K] @ (CB * SCB / 127)^T (+ bias) by LLM.int8 in x's dtype; also the
    outlier columns (None without a threshold)."""
    require_ops()
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    CA, SCA, cols = ops.int8_vectorwise_quant(x2, threshold)
    out = ops.int8_scaled_mm(CA, CB, SCA, SCB, x.dtype, bias)
    if threshold > 0.0 and cols.numel() > 0:
        # The outlier columns in x's dtype against the dequantized weight columns (bitsandbytes'
        # int8_mixed_scaled_mm).
        subA = x2.index_select(1, cols)
        subB = F.int8_vectorwise_dequant(CB.index_select(1, cols), SCB).to(x.dtype).t()
        out = out.addmm(subA, subB)
    return out.reshape(*x.shape[:-1], CB.shape[0]), (cols if threshold > 0.0 else None)


def _weight_source(B: torch.Tensor) -> tuple:
    return (B._version, B.data_ptr(), B.device, B.dtype, tuple(B.shape))


def _int8_weight(B: torch.Tensor, state: MatmulLtState) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 weight of this call: the stored one, or (fp16 weights) B quantized now, or cached
    while B is unchanged and the layer is in eval mode."""
    if not state.has_fp16_weights and state.CB is not None:
        if state.SCB is None:
            raise RuntimeError("MatmulLtState has CB but no SCB: the int8 weight lost its row statistics")
        return state.CB, state.SCB
    if B.dtype == torch.int8:
        raise RuntimeError("the int8 weight has no statistics (SCB): quantize it with Int8Params.to(device)")
    source = _weight_source(B)
    if state.CB is None or state.SCB is None or state.is_training or state._source != source:
        state.CB, state.SCB = quantize_weight(B.detach())
        state._source = source
    return state.CB, state.SCB


def _forward(A: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor], state: MatmulLtState):
    """The forward of the int8 matmul; returns (output, CB, SCB)."""
    CB, SCB = _int8_weight(B, state)
    if A.shape[-1] != CB.shape[1]:
        raise ValueError(f"the input's last dimension ({A.shape[-1]}) must be in_features={CB.shape[1]}")
    if A.numel() == 0:
        return A.new_empty((*A.shape[:-1], CB.shape[0])), CB, SCB
    output, state.idx = int8_linear(A, CB, SCB, bias, state.threshold)
    return output, CB, SCB


class MatMul8bitLt(torch.autograd.Function):
    """LLM.int8 matmul: out = A @ W^T (+ bias). Gradients: A (through the dequantized int8 weight, as
    bitsandbytes), B when it is a float weight that requires grad (exact), bias."""

    @staticmethod
    def forward(ctx, A, B, out=None, bias=None, state: Optional[MatmulLtState] = None):
        state = state or MatmulLtState()
        output, CB, SCB = _forward(A, B, bias, state)
        ctx.state = state
        ctx.dtype_A = A.dtype
        ctx.save_for_backward(CB, SCB, A if ctx.needs_input_grad[1] else None)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.dtype_B = B.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        CB, SCB, A = ctx.saved_tensors
        N = CB.shape[0]
        g2 = grad_output.reshape(-1, N)
        grad_A = grad_B = grad_bias = None
        if ctx.needs_input_grad[0]:
            W = dequantize_weight(CB, SCB, ctx.dtype_A)
            grad_A = (g2.to(ctx.dtype_A) @ W).reshape(*grad_output.shape[:-1], CB.shape[1])
        if ctx.needs_input_grad[1]:
            grad_B = (g2.t().to(A.dtype) @ A.reshape(-1, A.shape[-1])).to(ctx.dtype_B)
        if ctx.needs_input_grad[3]:
            grad_bias = g2.sum(0, dtype=ctx.bias_dtype)
        return grad_A, grad_B, None, grad_bias, None


def matmul(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None,
           state: Optional[MatmulLtState] = None, threshold: float = 0.0, bias: Optional[torch.Tensor] = None):
    """bitsandbytes.matmul: A @ B^T by LLM.int8 (B the weight [N, K], float or with int8 state).
    ``out`` is accepted and ignored, as in bitsandbytes."""
    state = state or MatmulLtState()
    if threshold > 0.0:
        state.threshold = threshold
    F._check_threshold(state.threshold)
    if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad or (bias is not None and bias.requires_grad)):
        return MatMul8bitLt.apply(A, B, out, bias, state)
    # Nothing to differentiate: skip the autograd.Function (about 20 us a call on the host).
    return _forward(A, B, bias, state)[0]


def maybe_rearrange_weight(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Load-state-dict pre-hook: drop ``weight_format`` after checking that it says "row" (0)."""
    if state_dict.get(f"{prefix}weight") is None:
        return
    weight_format = state_dict.pop(f"{prefix}weight_format", "row")
    if isinstance(weight_format, torch.Tensor):
        weight_format = weight_format.item()
    if isinstance(weight_format, int):
        if weight_format not in INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING:
            raise ValueError(f"Expected supported weight format - got {weight_format}")
        weight_format = INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING[weight_format]
    if weight_format != "row":
        raise ValueError(f"Only 'row' weight format is supported, got {weight_format}")


class Linear8bitLt(nn.Linear):
    """bitsandbytes' Linear8bitLt: LLM.int8 linear layer. Load fp weights, then ``.to(device)``
    quantizes them (``has_fp16_weights=False``); ``threshold`` > 0 (6.0 in the paper) keeps the
    input's outlier columns in the input dtype."""

    def __init__(self, input_features: int, output_features: int, bias: bool = True, has_fp16_weights: bool = True,
                 threshold: float = 0.0, index=None, device=None):
        super().__init__(input_features, output_features, bias, device)
        self.state = MatmulLtState()
        self.index = index
        self.state.threshold = F._check_threshold(threshold)
        self.state.has_fp16_weights = has_fp16_weights
        if threshold > 0.0 and not has_fp16_weights:
            self.state.use_pool = True
        self.weight = Int8Params(self.weight.data, has_fp16_weights=has_fp16_weights, requires_grad=has_fp16_weights)
        self._register_load_state_dict_pre_hook(maybe_rearrange_weight)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        scb = getattr(self.weight, "SCB", None)
        if scb is None:
            scb = self.state.SCB
        if not self.state.has_fp16_weights and scb is not None:
            destination[prefix + "SCB"] = scb if keep_vars else scb.detach()
            destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        scb_key, weight_key = prefix + "SCB", prefix + "weight"
        incoming = state_dict.get(weight_key)
        if (scb_key in state_dict and isinstance(incoming, torch.Tensor) and incoming.dtype == torch.int8
                and self.weight.dtype != torch.int8):
            # A quantized checkpoint into a layer not quantized yet: take the int8 weight as it is.
            if self.state.has_fp16_weights:
                raise RuntimeError(f"{weight_key} is an int8 checkpoint but the layer has has_fp16_weights=True; "
                                   "build it with has_fp16_weights=False to load quantized weights")
            device = self.weight.device
            self.weight = Int8Params(torch.empty(self.weight.shape, dtype=torch.int8, device=device),
                                     requires_grad=False, has_fp16_weights=False)
            self.weight.CB = self.weight.data
            self.weight.SCB = torch.empty(self.weight.shape[0], dtype=torch.float32, device=device)
            self.state.reset_grads()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if scb_key in unexpected_keys:
            weight_scb = getattr(self.weight, "SCB", None)
            if weight_scb is None:
                weight_scb = self.state.SCB
            if weight_scb is None:
                raise RuntimeError("Loading a quantized checkpoint into a non-quantized Linear8bitLt with "
                                   "has_fp16_weights=True is not supported")
            weight_scb.copy_(state_dict[scb_key])
            if self.state.SCB is not None:
                self.state.SCB = weight_scb
            if self.state.CB is not None:
                self.state.CB = self.weight.data
            unexpected_keys.remove(scb_key)

    def init_8bit_state(self):
        self.state.CB = self.weight.CB
        self.state.SCB = self.weight.SCB
        self.weight.CB = None
        self.weight.SCB = None

    def to(self, *args, **kwargs):
        result = super().to(*args, **kwargs)
        device, _, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            if result.state.CB is not None:
                result.state.CB = result.state.CB.to(device)
            if result.state.SCB is not None:
                result.state.SCB = result.state.SCB.to(device)
        return result

    def _check_input(self, x: torch.Tensor, weight_device: torch.device) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in F.FLOAT_DTYPES:
            raise ValueError(f"input must be float16, bfloat16 or float32, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension must be in_features={self.in_features}, got shape {tuple(x.shape)}")
        if x.device != weight_device:
            raise ValueError(f"input is on {x.device} but the layer's weight is on {weight_device}; "
                             f"move the input (or the layer) to one device")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, weight, bias = self.state, self.weight, self.bias
        state.is_training = self.training
        if weight.CB is not None:
            self.init_8bit_state()
        CB = None if state.has_fp16_weights else state.CB
        if CB is not None:
            device = weight.device
            if CB.device != device:  # moved by .cuda() / .cpu() (Module._apply), which skip state
                state.CB = CB = weight.data
                state.SCB = state.SCB.to(device)
        self._check_input(x, weight.device if CB is None else CB.device)
        if CB is None and not state.has_fp16_weights and weight.dtype != torch.int8:
            raise RuntimeError("Linear8bitLt(has_fp16_weights=False) holds an unquantized weight: move it to a device "
                               "(e.g. .cuda() or .to('cpu')) to quantize it first")
        # bitsandbytes casts the bias to the input dtype, in place.
        if bias is not None and bias.dtype != x.dtype:
            bias.data = bias.data.to(x.dtype)
        out = matmul(x, weight, bias=bias, state=state)
        if not state.has_fp16_weights and state.CB is not None and weight.dtype != torch.int8:
            weight.data = state.CB
        return out
