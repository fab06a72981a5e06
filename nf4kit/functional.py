"""bitsandbytes-compatible functions: ``import nf4kit.functional as F`` where code had
``import bitsandbytes.functional as F``.

Arguments are checked here, once, with errors that name the argument; the torch ops below
(``torch.ops.nf4kit.*``) assume valid input.
"""
from __future__ import annotations

import ctypes
import json
import math
import threading
import numbers
import operator
from typing import Any, Optional

import torch

from . import reference
from ._ops import ops, require_ops

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCKSIZES_4BIT = reference.BLOCKSIZES_4BIT
QUANT_TYPES = ("fp4", "nf4")
NESTED_BLOCKSIZE = 256

__all__ = [
    "QuantState", "quantize_4bit", "dequantize_4bit", "quantize_nf4", "quantize_fp4", "dequantize_nf4",
    "dequantize_fp4", "quantize_blockwise", "dequantize_blockwise", "create_dynamic_map", "get_4bit_type",
    "gemv_4bit", "matmul_4bit", "pack_dict_to_tensor", "unpack_tensor_to_dict",
    "int8_vectorwise_quant", "int8_vectorwise_dequant", "int8_linear_matmul", "int8_mm_dequant", "int8_scaled_mm",
    "int8_double_quant",
]

_dynamic_maps: dict[torch.device, torch.Tensor] = {}


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic-exponent map, 256 sorted float32 values (as bitsandbytes builds it)."""
    return reference.create_dynamic_map(signed, max_exponent_bits, total_bits)


def _dynamic_map(device: torch.device) -> torch.Tensor:
    if device not in _dynamic_maps:
        _dynamic_maps[device] = create_dynamic_map(signed=True).to(device)
    return _dynamic_maps[device]


_codes_4bit: dict[tuple[str, torch.device], torch.Tensor] = {}


def _code_4bit(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 4-bit decode table on ``device``, copied there once (a per-call host copy would wait on the GPU)."""
    key = (quant_type, torch.device(device))
    if key not in _codes_4bit:
        _codes_4bit[key] = reference.decode_table_4bit(quant_type).to(device)
    return _codes_4bit[key]


def get_4bit_type(typename: str, device=None, blocksize: int = 64) -> torch.Tensor:
    """The 16 code values of ``typename`` ('nf4' or 'fp4') as float32, index order."""
    if typename not in QUANT_TYPES:
        raise ValueError(f"typename must be 'nf4' or 'fp4', got {typename!r}")
    # The decode table: bitsandbytes' FP4 list writes index 8 as the int -0, so it holds +0.0.
    return reference.decode_table_4bit(typename).to(
        "cuda" if device is None and torch.cuda.is_available() else device or "cpu")


# ----------------------------------------------------------------------------------------------
# QuantState and its state_dict form
# ----------------------------------------------------------------------------------------------

def pack_dict_to_tensor(source: dict[str, Any]) -> torch.Tensor:
    """A dict of plain values as the uint8 bytes of its UTF-8 JSON (safetensors can store it)."""
    return torch.tensor(list(json.dumps(source).encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(tensor: torch.Tensor) -> dict[str, Any]:
    return json.loads(bytes(tensor.cpu().to(torch.uint8).tolist()).decode("utf-8"))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "", 1)


class QuantState:
    """What it takes to undo a quantization: absmax (float32, or uint8 codes when nested), the
    original shape and dtype, the code, the blocksize and quant_type; when nested, the offset
    and ``state2`` (the QuantState of the absmax's own 8-bit quantization)."""

    valid_quant_types = QUANT_TYPES
    valid_qs_type_keys = [f"bitsandbytes__{x}" for x in QUANT_TYPES]
    valid_qs_keys = [
        "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state", "quant_type",
        "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset",
    ]

    def __init__(self, absmax, shape=None, code=None, blocksize=None, quant_type=None, dtype=None,
                 offset=None, state2=None):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    def __getattr__(self, name):
        # FSDP resolves the packed key "quant_state.bitsandbytes__nf4" through getattr.
        if name.startswith("bitsandbytes__"):
            packed = self.as_dict(packed=True)
            key = "quant_state." + name
            if key in packed:
                return packed[key]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __getitem__(self, idx):
        """The legacy list layout: [absmax, shape, dtype, blocksize, [offset, state2] or None, quant_type]."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device) -> "QuantState":
        """Rebuild from the state_dict entries of one weight (prefixes allowed, e.g. 'weight.absmax')."""
        qs_dict = dict(qs_dict)
        packed_keys = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in qs_dict:
            if not packed_keys:
                raise ValueError("qs_dict holds neither a packed 'quant_state.bitsandbytes__*' entry nor quant_type")
            if len(packed_keys) != 1 or packed_keys[0].split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(
                    f"qs_dict must hold exactly one quant_state entry ending in one of {cls.valid_qs_type_keys}, "
                    f"found {packed_keys}")
        if len(packed_keys) == 1:
            qs_dict.update(unpack_tensor_to_dict(qs_dict.pop(packed_keys[0])))
        qs_dict = {k.split(".")[-1]: v for k, v in qs_dict.items()}
        unknown = set(qs_dict) - set(cls.valid_qs_keys)
        if unknown:
            raise ValueError(f"qs_dict has unexpected keys {sorted(unknown)}")
        if qs_dict.get("quant_type") not in QUANT_TYPES:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {qs_dict.get('quant_type')!r}")

        offset = state2 = None
        if "nested_absmax" in qs_dict:
            offset = torch.tensor(float(qs_dict["nested_offset"]), dtype=torch.float32).to(device)
            state2 = cls(absmax=qs_dict["nested_absmax"].to(device), blocksize=qs_dict["nested_blocksize"],
                         code=qs_dict["nested_quant_map"].to(device),
                         dtype=getattr(torch, qs_dict["nested_dtype"]))
        return cls(
            quant_type=qs_dict["quant_type"],
            absmax=qs_dict["absmax"].to(device),
            blocksize=qs_dict["blocksize"],
            code=qs_dict["quant_map"].to(device),
            dtype=getattr(torch, qs_dict["dtype"]),
            shape=torch.Size(qs_dict["shape"]) if qs_dict["shape"] is not None else None,
            offset=offset,
            state2=state2,
        )

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state_dict entries, bitsandbytes' layout; ``packed=True`` folds the plain values into
        one uint8 tensor 'quant_state.bitsandbytes__<quant_type>' (safetensors-friendly)."""
        qs = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code.clone(),  # a fresh copy: quantize_4bit's states share one table
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            qs.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": self.state2.blocksize,
                "nested_quant_map": self.state2.code.clone(),
                "nested_dtype": _dtype_name(self.state2.dtype),
                "nested_offset": self.offset.item(),
            })
        if not packed or self.quant_type is None:
            return qs
        out = {k: v for k, v in qs.items() if isinstance(v, torch.Tensor)}
        plain = {k: v for k, v in qs.items() if not isinstance(v, torch.Tensor)}
        out["quant_state.bitsandbytes__" + self.quant_type] = pack_dict_to_tensor(plain)
        return out

    def to(self, device):
        """Move every tensor to ``device`` (in place, like bitsandbytes); returns self."""
        self.__dict__.pop("_matmul_args", None)  # what matmul_4bit kept holds the old tensors: let them go
        self.code = self.code.to(device)
        self.absmax = self.absmax.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)
        return self

    def __eq__(self, other):
        if not isinstance(other, QuantState):
            return False

        def close(a, b):
            return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(
                a.float().cpu(), b.float().cpu(), atol=1e-6)

        return (
            close(self.absmax, other.absmax)
            and self.shape == other.shape
            and close(self.code, other.code)
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and (close(self.offset.reshape(()), other.offset.reshape(()))
                 if self.offset is not None and other.offset is not None else self.offset is other.offset)
            and (self.state2 == other.state2
                 if self.state2 is not None and other.state2 is not None else self.state2 is other.state2)
        )

    __hash__ = None  # mutable, compared by value

    def __repr__(self):
        return (f"QuantState(quant_type={self.quant_type!r}, blocksize={self.blocksize}, shape={tuple(self.shape or ())},"
                f" dtype={self.dtype}, nested={self.nested})")

    # The arguments every 4-bit op takes to decode this state.
    def _decode_args(self):
        if self.nested:
            return (self.absmax, self.state2.absmax, self.state2.code, self.offset.reshape(1).float(),
                    self.blocksize, self.state2.blocksize, self.quant_type)
        return (self.absmax, None, None, None, self.blocksize, NESTED_BLOCKSIZE, self.quant_type)


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------

def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float_input(A, name: str = "A") -> None:
    _check_tensor(A, name)
    if A.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {A.dtype}")
    if A.numel() == 0:
        raise ValueError(f"{name} must not be empty (shape {tuple(A.shape)})")


def _check_blocksize(blocksize: int) -> None:
    # An int (or numpy integer), not 64.0 or True: the ops take an int.
    if not isinstance(blocksize, numbers.Integral) or isinstance(blocksize, bool) or blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize!r}")


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _check_finite(absmax: torch.Tensor, what: str) -> None:
    """NaN/Inf anywhere in a block shows in its absmax (the kernels propagate NaN). Called once the
    kernel's flag is up (never while compiling: quantize_4bit then passes no flag), to name the block."""
    if not bool(torch.isfinite(absmax).all()):
        bad = int((~torch.isfinite(absmax)).nonzero()[0])
        raise ValueError(
            f"{what} contains NaN or Inf (first in block {bad}); quantizing it would silently corrupt the "
            "whole block. Clean the input, or pass check_finite=False to quantize it anyway.")


_flag_slots = threading.local()  # per thread and device: a pinned int32 flag and an event, reused


class _NonfiniteFlag:
    """The quantize kernel's NaN/Inf flag (an int32 it sets to 1 when a block's absmax is not finite).
    On a GPU it is pinned host memory that the kernel writes directly, and ``raised()`` waits on an
    event recorded right after the kernel: nothing is queued on the stream for the check, the kernels
    queued after it (the nested pass) keep the GPU busy while the host waits, and the call can return
    before they finish. The flag and the event are made once per thread and device and reused (each
    call waits for its event before it returns, so a thread's calls never overlap on them)."""

    def __init__(self, device: torch.device):
        self._event = None
        if device.type == "cuda":
            slots = getattr(_flag_slots, "slots", None)
            if slots is None:
                slots = _flag_slots.slots = {}
            if device not in slots:
                t = torch.zeros(1, dtype=torch.int32, pin_memory=True)
                # The host reads and clears it through ctypes (no torch op on the critical path).
                slots[device] = (t, ctypes.c_int32.from_address(t.data_ptr()), torch.cuda.Event())
            self.tensor, self._host, self._event = slots[device]
            self._host.value = 0  # no kernel of this thread's is pending on it (each call waited)
        else:
            self.tensor = torch.zeros(1, dtype=torch.int32)
            self._host = None

    def kernel_queued(self, device: torch.device) -> None:
        if self._event is not None:
            self._event.record(torch.cuda.current_stream(device))

    def raised(self) -> bool:
        if self._event is None:
            return bool(self.tensor[0])
        self._event.synchronize()
        return self._host.value != 0


def _same_device(name_a: str, a: torch.Tensor, name_b: str, b: Optional[torch.Tensor]) -> None:
    if b is not None and a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; put them on one device")


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed 4-bit bytes as a flat uint8 tensor, whatever the storage dtype."""
    p = packed.reshape(-1)
    if not p.is_contiguous():
        p = p.contiguous()
    return p if p.dtype == torch.uint8 else p.view(torch.uint8)


def _check_state(quant_state: "QuantState", packed: torch.Tensor, name: str = "quant_state") -> None:
    _check_state_fields(quant_state, name, packed)
    n = math.prod(quant_state.shape)
    need = (n + 1) // 2
    have = packed.numel() * packed.element_size()
    if have < need:
        raise ValueError(
            f"A (the packed weights) is too small for {name}.shape {tuple(quant_state.shape)}: it holds "
            f"{have} bytes, {need} are needed")


def _check_state_fields(quant_state: "QuantState", name: str = "quant_state",
                        packed: Optional[torch.Tensor] = None) -> None:
    """The state's fields: types and sizes, and their devices against packed's (or, without packed,
    against each other's)."""
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"{name} must be a nf4kit QuantState, got {type(quant_state).__name__}")
    _check_blocksize(quant_state.blocksize)
    _check_quant_type(quant_state.quant_type)
    if quant_state.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}.dtype must be float16, bfloat16 or float32, got {quant_state.dtype}")
    if quant_state.shape is None:
        raise ValueError(f"{name}.shape is missing")
    n = math.prod(quant_state.shape)
    nblocks = -(-n // quant_state.blocksize)
    absmax = quant_state.absmax
    _check_tensor(absmax, f"{name}.absmax")
    where, where_name = (packed, "A (packed weights)") if packed is not None else (absmax, f"{name}.absmax")
    if packed is not None:
        _same_device(where_name, where, f"{name}.absmax", absmax)
    if absmax.numel() != nblocks:
        raise ValueError(
            f"{name}.absmax has {absmax.numel()} values, expected {nblocks} (one per block of "
            f"{quant_state.blocksize} in shape {tuple(quant_state.shape)})")
    if quant_state.nested:
        if absmax.dtype != torch.uint8:
            raise ValueError(f"{name}.absmax must be uint8 codes when nested, got {absmax.dtype}")
        s2 = quant_state.state2
        need2 = -(-nblocks // s2.blocksize)
        if s2.absmax.numel() != need2:
            raise ValueError(f"{name}.state2.absmax has {s2.absmax.numel()} values, expected {need2}")
        if s2.code.numel() != 256:
            raise ValueError(f"{name}.state2.code must hold 256 values, got {s2.code.numel()}")
        _same_device(where_name, where, f"{name}.state2.absmax", s2.absmax)
        _same_device(where_name, where, f"{name}.state2.code", s2.code)
        _same_device(where_name, where, f"{name}.offset", quant_state.offset)
    elif absmax.dtype != torch.float32:
        raise ValueError(f"{name}.absmax must be float32, got {absmax.dtype}")


# ----------------------------------------------------------------------------------------------
# 4-bit
# ----------------------------------------------------------------------------------------------

def quantize_4bit(
    A: torch.Tensor,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
    check_finite: bool = True,
) -> tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit quantization, bitsandbytes' format byte for byte.

    Returns the packed weights, shape [(numel + 1) // 2 // itemsize(quant_storage), 1], and their
    QuantState. ``compress_statistics`` quantizes the absmax again (8-bit, blocks of 256, around
    its mean). NaN or Inf in A raise ValueError unless ``check_finite=False``.
    """
    require_ops()
    blocksize = 64 if blocksize is None else blocksize
    _check_float_input(A)
    _check_blocksize(blocksize)
    blocksize = int(blocksize)
    _check_quant_type(quant_type)
    if not isinstance(quant_storage, torch.dtype):
        raise TypeError(f"quant_storage must be a torch.dtype, got {quant_storage!r}")
    nbytes = (A.numel() + 1) // 2
    itemsize = quant_storage.itemsize
    if nbytes % itemsize:
        raise ValueError(
            f"quant_storage={quant_storage} needs the packed byte count to be a multiple of {itemsize}, "
            f"but {A.numel()} elements pack into {nbytes} bytes; use quant_storage=torch.uint8 for this tensor")

    # NaN/Inf check: the kernel flags a non-finite block absmax (NaN anywhere in a block makes its
    # absmax NaN; the kernels propagate it). Not under torch.compile, where it would break the graph.
    flag = None
    if check_finite and not torch.compiler.is_compiling():
        flag = _NonfiniteFlag(A.device)
    packed, _absmax = ops.quantize_4bit(A.contiguous(), blocksize, quant_type,
                                        None if flag is None else flag.tensor)
    if flag is not None:
        flag.kernel_queued(A.device)
    # The offset is torch's float32 mean on A's device (as bitsandbytes computes it).
    offset = _absmax.mean() if compress_statistics else None
    # bnb's quant_map (FP4 index 8 is +0.0): the one per-device table, shared like the nested code
    # below; as_dict() hands out copies.
    code = _code_4bit(quant_type, A.device)
    if compress_statistics:
        # absmax - offset and its 8-bit quantization run as one kernel.
        qabsmax, absmax2 = ops.quantize_nested_absmax(_absmax, offset.reshape(1), _dynamic_map(A.device),
                                                      NESTED_BLOCKSIZE)
        # The nested code is the one per-device dynamic map, shared by every state (as bitsandbytes
        # does); as_dict() hands out a copy, so saved checkpoints never share it.
        state2 = QuantState(absmax=absmax2, code=_dynamic_map(A.device), blocksize=NESTED_BLOCKSIZE,
                            dtype=torch.float32)
        state = QuantState(absmax=qabsmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code,
                           quant_type=quant_type, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=_absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code,
                           quant_type=quant_type)
    if quant_storage != torch.uint8:
        packed = packed.view(quant_storage)
    packed = packed.unsqueeze(1)
    # The one wait for the GPU, for the quantize kernel only, after everything else is queued: the
    # call returns while the nested pass still runs.
    if flag is not None and flag.raised():
        _check_finite(_absmax, "A")
    # The caller's buffers are written only once the input passed the check.
    if out is not None:
        packed = out.copy_(packed)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return packed, state


def quantize_fp4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def quantize_nf4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
    quant_type: str = "fp4",
) -> torch.Tensor:
    """Undo quantize_4bit. Give the QuantState, or absmax + ``out`` (whose shape and dtype say
    what to produce) with blocksize and quant_type. The nested absmax is decoded inside the kernel."""
    require_ops()
    _check_tensor(A, "A")
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out")
        quant_state = QuantState(absmax=absmax, shape=out.shape, dtype=out.dtype,
                                 blocksize=64 if blocksize is None else blocksize, quant_type=quant_type)
    _check_state(quant_state, A)
    if out is not None:
        _check_tensor(out, "out")
        if out.dtype != quant_state.dtype or out.numel() != math.prod(quant_state.shape):
            raise ValueError(
                f"out must have dtype {quant_state.dtype} and {math.prod(quant_state.shape)} elements "
                f"(the quant_state's), got {out.dtype} with {out.numel()}")
        _same_device("A", A, "out", out)
    absmax_, nested_absmax, nested_code, offset, bs, nbs, qt = quant_state._decode_args()
    result = ops.dequantize_4bit(_as_bytes(A), absmax_, nested_absmax, nested_code, offset, bs, nbs, qt,
                                 list(quant_state.shape), quant_state.dtype)
    if out is not None:
        result = out.copy_(result.reshape(out.shape))
    # Weights passed transposed ([1, nbytes], as Linear4bit's weight.t()) come back transposed.
    if A.dim() == 2 and A.shape[0] == 1 and A.shape[1] > 1 and result.dim() == 2:
        return result.t()
    return result


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


# ----------------------------------------------------------------------------------------------
# 8-bit blockwise (dynamic map)
# ----------------------------------------------------------------------------------------------

def quantize_blockwise(
    A: torch.Tensor,
    code: Optional[torch.Tensor] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """Blockwise 8-bit quantization against ``code`` (default: the signed dynamic map)."""
    require_ops()
    _check_float_input(A)
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if code is None:
        code = _dynamic_map(A.device)
    _check_tensor(code, "code")
    if code.numel() != 256 or code.dtype != torch.float32:
        raise ValueError(f"code must be 256 float32 values, got {code.numel()} of {code.dtype}")
    code = code.to(A.device)
    q, _absmax = ops.quantize_blockwise(A.contiguous(), code, blocksize)
    if nested:
        offset = _absmax.mean()
        qabsmax, state2 = quantize_blockwise(_absmax - offset, blocksize=blocksize, nested=False)
        state = QuantState(absmax=qabsmax, code=code.clone(), blocksize=blocksize, dtype=A.dtype,
                           offset=offset, state2=state2)
    else:
        state = QuantState(absmax=_absmax, code=code.clone(), blocksize=blocksize, dtype=A.dtype)
    if out is not None:
        q = out.copy_(q)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return q, state


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    code: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> torch.Tensor:
    require_ops()
    _check_tensor(A, "A")
    if A.dtype != torch.uint8:
        raise ValueError(f"A must be uint8, got {A.dtype}")
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise needs quant_state or absmax")
        quant_state = QuantState(absmax=absmax, code=code if code is not None else _dynamic_map(A.device),
                                 blocksize=blocksize, dtype=torch.float32)
    absmax_ = quant_state.absmax
    if quant_state.nested:
        absmax_ = dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    need = -(-A.numel() // quant_state.blocksize)
    if absmax_.numel() != need:
        raise ValueError(f"absmax has {absmax_.numel()} values, expected {need}")
    _same_device("A", A, "absmax", absmax_)
    result = ops.dequantize_blockwise(A.contiguous(), absmax_.float(), quant_state.code.to(A.device),
                                      quant_state.blocksize, quant_state.dtype)
    if out is not None:
        return out.copy_(result)
    return result


# ----------------------------------------------------------------------------------------------
# 4-bit matmul
# ----------------------------------------------------------------------------------------------

# gemm_4bit's autograd formula is registered in Python (torch.library.register_autograd, _ops.py), so
# every call that reaches the Autograd dispatch key runs it, also under torch.no_grad() (transformers'
# generate), where it only redispatches below autograd: a trip from C++ into Python and back. Where no
# gradient can be wanted, matmul_4bit goes below autograd itself, as that formula would (H200 host,
# 4096x4096 batch 1: 5-11 us less a call, ~20%; benchmarks/results/h200/matmul.md, twenty-fourth
# session). Under torch.compile the op is left to the tracer as it is.
_BelowAutograd = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def _through_autograd(A: torch.Tensor, bias: Optional[torch.Tensor], compiling: bool) -> bool:
    return (_BelowAutograd is None or compiling or
            (torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad))))


def _state_fields(qs: QuantState) -> tuple:
    """What _matmul_state's checks and arguments depend on: the state's fields, and its nested state's."""
    s2 = qs.state2
    if s2 is None:
        return (qs.absmax, qs.shape, qs.blocksize, qs.quant_type, qs.dtype, qs.offset, s2)
    return (qs.absmax, qs.shape, qs.blocksize, qs.quant_type, qs.dtype, qs.offset, s2, s2.absmax, s2.code,
            s2.blocksize)


def _matmul_state(qs: QuantState) -> tuple:
    """The op's arguments for a matmul with this state (_decode_args), after the state's own checks.
    A decode loop multiplies by the same states over and over, so they are kept on the state, for as
    long as its fields are the same objects (compared by identity: reassigning any field checks
    again; the tensors' contents are the kernel's to read). What is kept holds the state's tensors,
    so .to() drops it: an offloaded layer's old GPU absmax is freed with the state's own reference.
    With B passed to the op as it is (no flattening: the op takes any shape), this took a call's host
    time on the H200's host from 35.0 / 26.5 / 29.9 to 27.5 / 22.0 / 24.6 us under no_grad /
    inference_mode / autograd on (4096x4096 batch 1, medians of 21 interleaved rounds,
    benchmarks/probes/host_ab.py; F.linear 18.0 / 18.3 / 21.4 us; benchmarks/results/h200/matmul.md,
    twenty-fifth session)."""
    if not isinstance(qs, QuantState):
        raise TypeError(f"quant_state must be a nf4kit QuantState, got {type(qs).__name__}")
    fields = _state_fields(qs)
    kept = qs.__dict__.get("_matmul_args")
    if kept is not None and len(kept[0]) == len(fields) and all(map(operator.is_, kept[0], fields)):
        return kept[1]
    _check_state_fields(qs)
    if len(qs.shape) != 2:
        raise ValueError(f"quant_state.shape must be 2-D [out_features, in_features], got {tuple(qs.shape)}")
    args = qs._decode_args()
    if qs.offset is None or qs.offset.dtype == torch.float32:  # else its float32 copy would go stale
        qs.__dict__["_matmul_args"] = (fields, args)
    return args


def _check_matmul(A: torch.Tensor, B: torch.Tensor, quant_state: QuantState, bias: Optional[torch.Tensor]) -> tuple:
    """The checks of one call; returns the state's op arguments (_matmul_state)."""
    _check_tensor(A, "A")
    if A.dtype not in FLOAT_DTYPES:
        raise ValueError(f"A must be float16, bfloat16 or float32, got {A.dtype}")
    if quant_state is None:
        raise ValueError("quant_state is required (the weight's QuantState)")
    state_args = _matmul_state(quant_state)
    _check_tensor(B, "B")
    _same_device("A (packed weights)", B, "quant_state.absmax", quant_state.absmax)
    N, K = quant_state.shape
    have, need = B.numel() * B.element_size(), (N * K + 1) // 2
    if have != need:
        raise ValueError(f"B holds {have} bytes but quant_state.shape {tuple(quant_state.shape)} packs into {need}: "
                         "B and quant_state belong to different weights")
    if A.dim() == 0 or A.shape[-1] != K:
        raise ValueError(f"A's last dimension must be in_features={K} (quant_state.shape {tuple(quant_state.shape)}), "
                         f"got A of shape {tuple(A.shape)}")
    if A.device != B.device:
        raise ValueError(f"A is on {A.device} but the 4-bit weight B is on {B.device}; move A to {B.device}")
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.numel() != N:
            raise ValueError(f"bias must have out_features={N} values, got {bias.numel()}")
        _same_device("A", A, "bias", bias)
    return state_args


_NoTorchFunction = torch._C.DisableTorchFunctionSubclass


def matmul_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    quant_state: QuantState,
    out: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """out = A @ W.t() (+ bias) with W the 4-bit weight (B is its packed tensor, in either
    orientation, as bitsandbytes passes ``weight.t()``). Differentiable in A and bias."""
    require_ops()
    compiling = torch.compiler.is_compiling()
    if type(B) is not torch.Tensor and isinstance(B, torch.Tensor) and not compiling:
        # B is a Params4bit (Linear4bit passes its weight as it is): its Python __torch_function__
        # would run for every read of B below and for the op, a few us each, for nothing (it only
        # keeps casts and splits of the weight quantized). A Linear4bit forward without bias on the
        # H200's host: 82.4 -> 23.4 us, nn.Linear 29.4 / 20.6 (probes/host_layer.py, run 8).
        with _NoTorchFunction():
            return _matmul_4bit(A, B, quant_state, out, bias, compiling)
    return _matmul_4bit(A, B, quant_state, out, bias, compiling)


def _matmul_4bit(A, B, quant_state, out, bias, compiling: bool):
    absmax, nested_absmax, nested_code, offset, bs, nbs, qt = _check_matmul(A, B, quant_state, bias)
    if bias is not None and bias.dtype != A.dtype:
        bias = bias.to(A.dtype)
    # B goes as it is: the op takes the packed bytes in any shape and storage dtype.
    args = (A, B, absmax, nested_absmax, nested_code, offset, bs, nbs, qt, quant_state.shape[0], bias)
    if _through_autograd(A, bias, compiling):
        result = ops.gemm_4bit(*args)
    else:
        with _BelowAutograd():
            result = ops.gemm_4bit(*args)
    if out is not None:
        return out.copy_(result)
    return result


def gemv_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    transposed_A: bool = False,
    transposed_B: bool = False,
    state: Optional[QuantState] = None,
) -> torch.Tensor:
    """bitsandbytes' inference gemv: A [..., K] times the 4-bit weight of ``state``; no bias."""
    if state is None:
        raise ValueError("state (the weight's QuantState) is required")
    return matmul_4bit(A, B, state, out=out)


# ----------------------------------------------------------------------------------------------
# LLM.int8 (row-wise 8-bit, outlier columns): bitsandbytes' int8_* functions
# ----------------------------------------------------------------------------------------------

# int8_vectorwise_dequant multiplies by this float32 1/127, as bitsandbytes does.
INT8_DEQUANT_CONST = reference.INT8_DEQUANT_CONST


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
    threshold = float(threshold)
    if not threshold >= 0.0:
        raise ValueError(f"threshold must be >= 0 (0 disables outlier detection), got {threshold}")
    return threshold


def _check_int8_operand(t, name: str, dtype: torch.dtype = torch.int8) -> None:
    _check_tensor(t, name)
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() == 0 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty tensor with at least one dimension, got shape {tuple(t.shape)}")


def _check_stats(stats, name: str, count: int, what: str, device: torch.device) -> None:
    _check_tensor(stats, name)
    if stats.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {stats.dtype}")
    if stats.numel() != count:
        raise ValueError(f"{name} has {stats.numel()} values, expected {count} ({what})")
    if stats.device != device:
        raise ValueError(f"{name} is on {stats.device} but A is on {device}; put them on one device")


def _check_bias(bias, count: int, device: torch.device) -> None:
    if bias is None:
        return
    _check_tensor(bias, "bias")
    if bias.dtype not in FLOAT_DTYPES:
        raise ValueError(f"bias must be float16, bfloat16 or float32, got {bias.dtype}")
    if bias.numel() != count:
        raise ValueError(f"bias must have {count} values (one per output column), got {bias.numel()}")
    if bias.device != device:
        raise ValueError(f"bias is on {bias.device} but A is on {device}; put them on one device")


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    """LLM.int8 row-wise quantization of A [..., K] (rows = the leading dimensions).

    Returns (int8 codes, shape of A; float32 row_stats [rows], the absmax of each row; outlier
    columns). With threshold > 0, entries with |A| >= threshold (compared in A's dtype) are left
    out of the absmax and their columns are zeroed in every row; their int64 indices are returned
    (an empty tensor when there are none). threshold == 0 returns None for the columns.
    bitsandbytes only takes float16 on CUDA; here float16, bfloat16 and float32 all work.
    """
    require_ops()
    _check_float_input(A)
    if A.dim() == 0:
        raise ValueError("A must have at least one dimension, got a scalar")
    threshold = _check_threshold(threshold)
    q, row_stats, cols = ops.int8_vectorwise_quant(A.contiguous(), threshold)
    return q, row_stats, (cols if threshold > 0.0 else None)


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Undo int8_vectorwise_quant: A * stats[:, None] * (1/127), float32 (bitsandbytes' formula)."""
    _check_int8_operand(A, "A")
    _check_tensor(stats, "stats")
    rows = A.numel() // A.shape[-1]
    if stats.numel() != rows:
        raise ValueError(f"stats has {stats.numel()} values, expected {rows} (one per row of A {tuple(A.shape)})")
    _same_device("A", A, "stats", stats)
    return (A.reshape(rows, A.shape[-1]) * stats.reshape(-1, 1) * INT8_DEQUANT_CONST).reshape(A.shape)


def _check_int8_matmul(A, B) -> None:
    _check_int8_operand(A, "A")
    _check_int8_operand(B, "B")
    if B.dim() != 2:
        raise ValueError(f"B must be 2-D [N, K] (the weight), got shape {tuple(B.shape)}")
    if A.shape[-1] != B.shape[1]:
        raise ValueError(f"A's last dimension ({A.shape[-1]}) must equal B's K ({B.shape[1]}): "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)} (out = A @ B.t())")
    _same_device("A", A, "B", B)


def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None,
                       dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """int32 [..., N] = A [..., K] @ B [N, K].t(), exact, on int8 tensor cores (CUDA) or the CPU kernel."""
    require_ops()
    _check_int8_matmul(A, B)
    if dtype != torch.int32:
        raise ValueError(f"dtype must be torch.int32, got {dtype}")
    result = ops.int8_linear_matmul(A, B)
    if out is not None:
        _check_tensor(out, "out")
        if out.dtype != torch.int32 or out.shape != result.shape:
            raise ValueError(f"out must be int32 of shape {tuple(result.shape)}, got {out.dtype} {tuple(out.shape)}")
        return out.copy_(result)
    return result


def int8_mm_dequant(A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                    out: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float16 (A * row_stats[:, None] * col_stats[None, :] * 6.200124e-05 + bias), in float32 steps,
    from the int32 product A [..., N] (bitsandbytes' CPU numbers; its CUDA kernel differs slightly)."""
    require_ops()
    _check_int8_operand(A, "A", torch.int32)
    rows, N = A.numel() // A.shape[-1], A.shape[-1]
    _check_stats(row_stats, "row_stats", rows, "one per row of A", A.device)
    _check_stats(col_stats, "col_stats", N, "one per column of A", A.device)
    _check_bias(bias, N, A.device)
    result = ops.int8_mm_dequant(A, row_stats, col_stats, torch.float16, bias)
    if out is not None:
        return out.copy_(result)
    return result


def int8_scaled_mm(A: torch.Tensor, B: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, bias) in ``dtype``, the
    epilogue fused into the matmul (bitsandbytes' int8_scaled_mm op)."""
    require_ops()
    _check_int8_matmul(A, B)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    _check_stats(row_stats, "row_stats", A.numel() // A.shape[-1], "one per row of A", A.device)
    _check_stats(col_stats, "col_stats", B.shape[0], "one per row of B", A.device)
    _check_bias(bias, B.shape[0], A.device)
    return ops.int8_scaled_mm(A, B, row_stats, col_stats, dtype, bias)


def int8_double_quant(A: torch.Tensor, col_stats=None, row_stats=None, out_col=None, out_row=None,
                      threshold: float = 0.0):
    """Row-wise and column-wise int8 statistics of A [rows, K] (LLM.int8 training).

    Returns (row codes, column codes, row_stats, col_stats, outlier columns or None), as
    bitsandbytes: the column codes are round(A * 127 (in A's dtype) / col_stats) with outliers
    (|A| >= threshold) zeroed first and left out of col_stats; a non-finite code (an all-zero
    column) is 0.
    """
    for name, val in (("row_stats", row_stats), ("col_stats", col_stats), ("out_col", out_col), ("out_row", out_row)):
        if val is not None:
            raise ValueError(f"{name} must be None: int8_double_quant() does not take pre-allocated outputs")
    quant_row, stats_row, outlier_cols = int8_vectorwise_quant(A, threshold)
    A2 = A.reshape(-1, A.shape[-1])
    absA = A2.abs()
    if threshold > 0.0:
        mask = absA >= threshold
        absA = absA.masked_fill(mask, 0.0)
        A2 = A2.masked_fill(mask, 0.0)
    stats_col = absA.amax(dim=0).float()
    q = torch.round(A2.mul(127.0) / stats_col.unsqueeze(0))
    quant_col = torch.where(torch.isfinite(q), q, torch.zeros_like(q)).to(torch.int8).reshape(A.shape)
    return quant_row, quant_col, stats_row, stats_col, outlier_cols


__all__ += ["int8_vectorwise_quant", "int8_vectorwise_dequant", "int8_linear_matmul", "int8_mm_dequant",
            "int8_scaled_mm", "int8_double_quant"]
