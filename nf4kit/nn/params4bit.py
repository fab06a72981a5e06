"""Params4bit: a torch.nn.Parameter holding a 4-bit weight, bitsandbytes' class of the same name.

Before quantization it holds the full-precision weight; moving it to a device (``.to(device)``,
``.cuda()``, ``.cpu()``) or calling ``.quantize()`` replaces that by the packed 4-bit bytes
(``[(numel + 1) // 2 // itemsize(quant_storage), 1]``) and sets ``quant_state``. A quantized
Params4bit moves between devices with its QuantState and never changes dtype: the packed bytes are
storage, not numbers, so ``model.half()`` / ``.to(dtype)`` leave them alone (bitsandbytes would
reinterpret them when quant_storage is a float type).

Unlike bitsandbytes 0.50.2, pickling keeps the class and its QuantState, and deepcopy of a
Linear4bit points the copied weight at the copied module.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from .. import functional as F
from ..functional import QuantState

_ATTRS = ("blocksize", "compress_statistics", "quant_type", "quant_state", "quant_storage", "bnb_quantized", "module")
# Casts that would reinterpret packed bytes as numbers; a quantized Params4bit ignores them.
_CASTS = {torch.Tensor.half, torch.Tensor.float, torch.Tensor.bfloat16, torch.Tensor.double}


def _rebuild_params4bit(data: torch.Tensor, requires_grad: bool) -> "Params4bit":
    return Params4bit(data, requires_grad=requires_grad)  # pickle then calls __setstate__


def _quant_state_attr(name: str, get, nested_only: bool = False):
    """A read-only view of one QuantState field. FSDP resolves state_dict keys such as
    'weight.absmax' with getattr on the parameter; properties (not __getattr__) keep
    torch.compile from breaking the graph."""

    def fget(self):
        qs = self.__dict__.get("quant_state")
        if qs is not None and (not nested_only or qs.state2 is not None):
            return get(qs)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    return property(fget)


class Params4bit(torch.nn.Parameter):
    """A 4-bit weight. Arguments as bitsandbytes': ``quant_type`` 'fp4' (default) or 'nf4';
    ``compress_statistics`` nests the absmax; ``quant_storage`` the dtype the packed bytes are
    viewed as; ``module`` the Linear4bit that owns it (kept informed of the QuantState)."""

    def __new__(
        cls,
        data: Optional[torch.Tensor] = None,
        requires_grad: bool = False,  # quantized weights are frozen
        quant_state: Optional[QuantState] = None,
        blocksize: Optional[int] = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module: Optional[torch.nn.Module] = None,
        bnb_quantized: bool = False,
        **kwargs: Any,  # other attributes carried in __dict__ (e.g. transformers' _is_hf_initialized)
    ) -> "Params4bit":
        if data is None:
            data = torch.empty(0)
        blocksize = 64 if blocksize is None else blocksize
        F._check_blocksize(blocksize)
        F._check_quant_type(quant_type)
        if not isinstance(quant_storage, torch.dtype):
            raise TypeError(f"quant_storage must be a torch.dtype, got {quant_storage!r}")
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    # --- quantization ----------------------------------------------------------------------------
    def _quantize(self, device=None) -> "Params4bit":
        if self.bnb_quantized:
            return self
        w = self.data
        if w.device.type == "meta":
            raise RuntimeError("Params4bit holds no data (meta device): load the weight before quantizing it")
        if not w.is_floating_point():
            raise TypeError(
                f"Params4bit can only quantize a float16/bfloat16/float32 weight, it holds {w.dtype}; a packed "
                "4-bit weight is loaded with Params4bit.from_prequantized(data, quantized_stats)")
        w = w.contiguous().to(device if device is not None else w.device)
        packed, state = F.quantize_4bit(w, blocksize=self.blocksize, compress_statistics=self.compress_statistics,
                                        quant_type=self.quant_type, quant_storage=self.quant_storage)
        self.data = packed
        self.quant_state = state
        self.bnb_quantized = True
        if self.module is not None:
            self.module.quant_state = state
        return self

    def quantize(self, device=None) -> "Params4bit":
        """Quantize in place (on ``device``, default where the weight is); no-op when already done."""
        return self._quantize(device)

    def dequantize(self) -> torch.Tensor:
        """The weight back in its original dtype and shape (a new tensor)."""
        if not self.bnb_quantized:
            return self.data.clone()
        return F.dequantize_4bit(self.data, self.quant_state)

    @classmethod
    def from_prequantized(
        cls,
        data: torch.Tensor,
        quantized_stats: dict[str, Any],
        requires_grad: bool = False,
        device=None,
        module: Optional[torch.nn.Module] = None,
        **kwargs: Any,
    ) -> "Params4bit":
        """A quantized Params4bit from its state_dict entries: ``data`` the packed tensor,
        ``quantized_stats`` the 'absmax', 'quant_map', ... entries (prefixes allowed). ``device``
        defaults to data's device (bitsandbytes defaults to 'cuda')."""
        device = data.device if device is None else torch.device(device)
        state = QuantState.from_dict(qs_dict=quantized_stats, device=device)
        data = data.to(device)
        F._check_state(state, data, "quantized_stats")
        self = cls(data, requires_grad=requires_grad, quant_state=state, blocksize=state.blocksize,
                   compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=data.dtype,
                   module=module, bnb_quantized=True)
        if module is not None:
            module.quant_state = state
        return self

    # --- devices and dtypes ----------------------------------------------------------------------
    def cpu(self):
        return self.to(device="cpu")

    def cuda(self, device=None, non_blocking: bool = False):
        if isinstance(device, int):
            device = f"cuda:{device}"
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if not self.bnb_quantized:
            if device is not None and device.type != "meta":
                if dtype is not None and self.data.is_floating_point():
                    self.data = self.data.to(dtype)
                return self._quantize(device)
            return self._with_data(super().to(device=device, dtype=dtype, non_blocking=non_blocking))
        # Quantized: move the bytes and the QuantState (in place, as bitsandbytes); dtype is ignored.
        if device is None:
            return self
        if self.quant_state is not None:
            self.quant_state.to(device)
        return self._with_data(super().to(device=device, non_blocking=non_blocking))

    def _with_data(self, data: torch.Tensor) -> "Params4bit":
        return type(self)(data, requires_grad=self.requires_grad, **{k: getattr(self, k) for k in _ATTRS})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CASTS and isinstance(args[0], Params4bit) and args[0].bnb_quantized:
            return args[0]
        result = super().__torch_function__(func, types, args, kwargs)
        if func in (torch.chunk, torch.split, torch.Tensor.chunk, torch.Tensor.split):
            src = args[0]
            if isinstance(result, (tuple, list)):
                return tuple(src._with_data(r) for r in result)
            return src._with_data(result)
        return result

    # --- copy and pickle -------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = {k: getattr(self, k) for k in _ATTRS}
        state["data"] = self.data
        state["requires_grad"] = self.requires_grad
        return state

    def __setstate__(self, state: dict) -> None:
        self.requires_grad = state["requires_grad"]
        self.data = state["data"]
        for k in _ATTRS:
            setattr(self, k, state[k])

    def __reduce_ex__(self, protocol):
        # Keep the class (torch rebuilds a plain Parameter); the state comes after the object is
        # memoised, so the module <-> weight cycle pickles.
        return _rebuild_params4bit, (self.data, self.requires_grad), self.__getstate__()

    def __copy__(self) -> "Params4bit":
        return self._with_data(self.data)

    def __deepcopy__(self, memo) -> "Params4bit":
        if id(self) in memo:
            return memo[id(self)]
        new = type(self)(copy.deepcopy(self.data, memo), requires_grad=self.requires_grad,
                         quant_state=copy.deepcopy(self.quant_state, memo), blocksize=self.blocksize,
                         compress_statistics=self.compress_statistics, quant_type=self.quant_type,
                         quant_storage=self.quant_storage, bnb_quantized=self.bnb_quantized)
        memo[id(self)] = new
        # The module being copied is in memo already: point at its copy; else keep the original.
        new.module = memo.get(id(self.module), self.module) if self.module is not None else None
        if new.module is not None and new.module is not self.module:
            new.module.quant_state = new.quant_state
        return new

    def __repr__(self) -> str:
        if not self.bnb_quantized:
            return f"Params4bit(not quantized, {self.quant_type}, {super().__repr__()})"
        qs = self.quant_state
        return (f"Params4bit({qs.quant_type}, shape={tuple(qs.shape)}, dtype={qs.dtype}, blocksize={qs.blocksize}, "
                f"nested={qs.nested}, packed {tuple(self.shape)} {self.dtype} on {self.device})")

    # QuantState fields as attributes (FSDP's state_dict traversal).
    absmax = _quant_state_attr("absmax", lambda qs: qs.absmax)
    code = _quant_state_attr("code", lambda qs: qs.code)
    quant_map = _quant_state_attr("quant_map", lambda qs: qs.code)
    offset = _quant_state_attr("offset", lambda qs: qs.offset)
    state2 = _quant_state_attr("state2", lambda qs: qs.state2)
    nested_offset = _quant_state_attr("nested_offset", lambda qs: qs.offset)
    nested_absmax = _quant_state_attr("nested_absmax", lambda qs: qs.state2.absmax, nested_only=True)
    nested_blocksize = _quant_state_attr("nested_blocksize", lambda qs: qs.state2.blocksize, nested_only=True)
    nested_quant_map = _quant_state_attr("nested_quant_map", lambda qs: qs.state2.code, nested_only=True)
    nested_dtype = _quant_state_attr("nested_dtype", lambda qs: qs.state2.dtype, nested_only=True)
