"""BitsAndBytesConfig: transformers' config of the same name, field for field, validated.

    from nf4kit import BitsAndBytesConfig          # was: from transformers import BitsAndBytesConfig

The fields and their defaults are those of ``transformers.BitsAndBytesConfig``, plus nf4kit's
``bnb_4bit_blocksize``. Bad values raise ``ValueError`` (``TypeError`` for a wrong type) naming the
field. Nothing here imports transformers: ``nf4kit.integrations.transformers`` registers the config
with it when transformers is loaded.

Serialised form (``to_dict``): ``quant_method`` is ``"nf4kit"`` and the choice of 4 or 8 bits is the
key ``bits`` (4, 8, or null), not ``load_in_4bit`` / ``load_in_8bit``: transformers sends every
``quantization_config`` dict holding a true ``load_in_4bit`` to bitsandbytes whatever its
``quant_method`` says, so a checkpoint saved with those keys could not reload through nf4kit.
``from_dict`` reads both forms, transformers' bitsandbytes dicts included.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Any, Optional, Union

import torch

from .functional import BLOCKSIZES_4BIT, QUANT_TYPES

QUANT_METHOD = "nf4kit"
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
# transformers accepts these storage names; the packed bytes are only viewed as this dtype.
STORAGE_DTYPES = ("uint8", "int8", "float16", "bfloat16", "float32", "float64")

_BOOL_FIELDS = ("llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight", "bnb_4bit_use_double_quant")
_SERIALIZED_KEYS = (
    "quant_method", "bits", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant",
    "bnb_4bit_quant_storage", "bnb_4bit_blocksize", "llm_int8_threshold", "llm_int8_skip_modules",
    "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight",
)


def _dtype_from(value: Union[str, torch.dtype, None], field: str, allowed: tuple[str, ...], default: torch.dtype):
    if value is None:
        return default
    if isinstance(value, str):
        name = value[len("torch."):] if value.startswith("torch.") else value
        if name not in allowed:
            raise ValueError(f"{field} must be one of {list(allowed)} (or the torch.dtype), got {value!r}")
        return getattr(torch, name)
    if isinstance(value, torch.dtype):
        if str(value).replace("torch.", "") not in allowed:
            raise ValueError(f"{field} must be one of {list(allowed)}, got {value}")
        return value
    raise TypeError(f"{field} must be a torch.dtype or its name, got {type(value).__name__} {value!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "", 1)


class BitsAndBytesConfig:
    """How to quantize a model's linear layers: 4-bit NF4/FP4 (``load_in_4bit``) or LLM.int8()
    (``load_in_8bit``).

    Args:
        load_in_8bit: replace nn.Linear by ``Linear8bitLt`` (LLM.int8()).
        load_in_4bit: replace nn.Linear by ``Linear4bit``.
        llm_int8_threshold: outlier threshold of LLM.int8() (a float, default 6.0).
        llm_int8_skip_modules: module names (or name suffixes) left in full precision; for 4-bit
            too, as in transformers. None: the output head is skipped.
        llm_int8_enable_fp32_cpu_offload: keep CPU/disk-offloaded modules unquantized.
        llm_int8_has_fp16_weight: LLM.int8() keeps 16-bit main weights (training).
        bnb_4bit_compute_dtype: dtype the 4-bit matmul runs in (default float32, as transformers).
        bnb_4bit_quant_type: "fp4" (default, as transformers) or "nf4".
        bnb_4bit_use_double_quant: quantize the absmax again (nested; 4.127 instead of 4.5 bits/weight).
        bnb_4bit_quant_storage: dtype the packed bytes are viewed as (default uint8).
        bnb_4bit_blocksize: elements per absmax (nf4kit's addition; default 64, as bitsandbytes).
    """

    quant_method = QUANT_METHOD

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: Optional[list[str]] = None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_compute_dtype: Union[str, torch.dtype, None] = None,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_quant_storage: Union[str, torch.dtype, None] = None,
        bnb_4bit_blocksize: int = 64,
        **kwargs: Any,
    ):
        kwargs.pop("quant_method", None)
        bits = kwargs.pop("bits", None)
        if kwargs:
            raise TypeError(f"BitsAndBytesConfig got unexpected arguments {sorted(kwargs)}")
        if bits is not None:
            if bits not in (4, 8):
                raise ValueError(f"bits must be 4, 8 or None, got {bits!r}")
            load_in_4bit, load_in_8bit = load_in_4bit or bits == 4, load_in_8bit or bits == 8
        self._load_in_4bit = self._load_in_8bit = False
        self.load_in_4bit = load_in_4bit
        self.load_in_8bit = load_in_8bit
        self.llm_int8_threshold = llm_int8_threshold
        self.llm_int8_skip_modules = llm_int8_skip_modules
        self.llm_int8_enable_fp32_cpu_offload = llm_int8_enable_fp32_cpu_offload
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        self.bnb_4bit_compute_dtype = _dtype_from(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype", COMPUTE_DTYPES,
                                                  torch.float32)
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.bnb_4bit_quant_storage = _dtype_from(bnb_4bit_quant_storage, "bnb_4bit_quant_storage", STORAGE_DTYPES,
                                                  torch.uint8)
        self.bnb_4bit_blocksize = bnb_4bit_blocksize
        self.post_init()

    # load_in_4bit / load_in_8bit exclude each other, also when set later (as in transformers).
    def _set_load_in(self, name: str, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
        other = "_load_in_8bit" if name == "load_in_4bit" else "_load_in_4bit"
        if value and getattr(self, other, False):
            raise ValueError("load_in_4bit and load_in_8bit are both True; choose one")
        setattr(self, "_" + name, value)

    load_in_4bit = property(lambda self: self._load_in_4bit, lambda self, v: self._set_load_in("load_in_4bit", v))
    load_in_8bit = property(lambda self: self._load_in_8bit, lambda self, v: self._set_load_in("load_in_8bit", v))

    def post_init(self) -> None:
        """Check every field (called by __init__; call again after changing fields by hand)."""
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}")
        if self.bnb_4bit_blocksize not in BLOCKSIZES_4BIT or isinstance(self.bnb_4bit_blocksize, bool):
            raise ValueError(f"bnb_4bit_blocksize must be one of {BLOCKSIZES_4BIT}, got {self.bnb_4bit_blocksize!r}")
        if isinstance(self.llm_int8_threshold, int) and not isinstance(self.llm_int8_threshold, bool):
            self.llm_int8_threshold = float(self.llm_int8_threshold)
        if not isinstance(self.llm_int8_threshold, float) or self.llm_int8_threshold != self.llm_int8_threshold:
            raise ValueError(f"llm_int8_threshold must be a float, got {self.llm_int8_threshold!r}")
        skip = self.llm_int8_skip_modules
        if skip is not None:
            if isinstance(skip, tuple):
                skip = self.llm_int8_skip_modules = list(skip)
            if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
                raise ValueError(f"llm_int8_skip_modules must be a list of module names, got {skip!r}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self.bnb_4bit_compute_dtype = _dtype_from(self.bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype",
                                                  COMPUTE_DTYPES, torch.float32)
        self.bnb_4bit_quant_storage = _dtype_from(self.bnb_4bit_quant_storage, "bnb_4bit_quant_storage",
                                                  STORAGE_DTYPES, torch.uint8)

    # --- what transformers asks of a quantization config ------------------------------------------
    def is_quantizable(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    def quantization_method(self) -> Optional[str]:
        """'llm_int8', 'nf4', 'fp4' or None, as transformers' BitsAndBytesConfig says it."""
        if self.load_in_8bit:
            return "llm_int8"
        if self.load_in_4bit:
            return self.bnb_4bit_quant_type
        return None

    @property
    def bits(self) -> Optional[int]:
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (dtypes by name); see the module docstring for ``bits``."""
        return {
            "quant_method": QUANT_METHOD,
            "bits": self.bits,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_compute_dtype": _dtype_name(self.bnb_4bit_compute_dtype),
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_quant_storage": _dtype_name(self.bnb_4bit_quant_storage),
            "bnb_4bit_blocksize": self.bnb_4bit_blocksize,
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": copy.copy(self.llm_int8_skip_modules),
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
        }

    def to_diff_dict(self) -> dict[str, Any]:
        """to_dict() less the values equal to the defaults (quant_method and bits always kept)."""
        default = type(self)().to_dict()
        return {k: v for k, v in self.to_dict().items() if k in ("quant_method", "bits") or v != default[k]}

    def to_json_string(self, use_diff: bool = False) -> str:
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: Union[str, os.PathLike]) -> None:
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from ``to_dict()``'s output or from a transformers BitsAndBytesConfig dict
        (quant_method 'bitsandbytes', load_in_4bit...). Keys neither knows raise ValueError;
        ``kwargs`` override fields (transformers' signature)."""
        d = dict(config_dict)
        method = d.pop("quant_method", QUANT_METHOD)
        method = getattr(method, "value", method)
        if method not in (QUANT_METHOD, "bitsandbytes"):
            raise ValueError(f"quant_method must be {QUANT_METHOD!r} or 'bitsandbytes', got {method!r}")
        for key in ("_load_in_4bit", "_load_in_8bit"):  # transformers' to_dict also writes the private copies
            if key in d:
                d.setdefault(key[1:], d.pop(key))
        known = set(_SERIALIZED_KEYS) | {"load_in_4bit", "load_in_8bit"}
        unknown = sorted(set(d) - known)
        if unknown and method == QUANT_METHOD:
            raise ValueError(f"unknown BitsAndBytesConfig keys {unknown}")
        for key in unknown:  # a newer transformers may write fields this version does not know
            warnings.warn(f"BitsAndBytesConfig.from_dict: ignoring unknown key {key!r}", stacklevel=2)
            del d[key]
        unused = {}
        for key, value in kwargs.items():
            if key in known:
                d[key] = value
            else:
                unused[key] = value
        config = cls(**d)
        return (config, unused) if return_unused_kwargs else config

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the fields named in kwargs (then re-validate); returns the kwargs that name no field."""
        unused = {}
        for key, value in kwargs.items():
            if key in ("load_in_4bit", "load_in_8bit") or key in _SERIALIZED_KEYS[2:]:
                setattr(self, key, value)
            else:
                unused[key] = value
        self.post_init()
        return unused

    def get_loading_attributes(self) -> dict[str, Any]:
        return {}

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BitsAndBytesConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        fields = [f"load_in_4bit={self.load_in_4bit}", f"load_in_8bit={self.load_in_8bit}"]
        if self.load_in_4bit or not self.load_in_8bit:
            fields += [
                f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r}",
                f"bnb_4bit_compute_dtype={self.bnb_4bit_compute_dtype}",
                f"bnb_4bit_use_double_quant={self.bnb_4bit_use_double_quant}",
                f"bnb_4bit_quant_storage={self.bnb_4bit_quant_storage}",
                f"bnb_4bit_blocksize={self.bnb_4bit_blocksize}",
            ]
        if self.load_in_8bit or not self.load_in_4bit:
            fields += [
                f"llm_int8_threshold={self.llm_int8_threshold}",
                f"llm_int8_has_fp16_weight={self.llm_int8_has_fp16_weight}",
            ]
        fields += [f"llm_int8_skip_modules={self.llm_int8_skip_modules!r}",
                   f"llm_int8_enable_fp32_cpu_offload={self.llm_int8_enable_fp32_cpu_offload}"]
        return f"{type(self).__name__}({', '.join(fields)})"
