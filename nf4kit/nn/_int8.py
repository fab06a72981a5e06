"""The LLM.int8() layers of nn/linear8bit.py, or None where that file is absent from the build
(an error inside the file still raises)."""
try:
    from .linear8bit import Int8Params, Linear8bitLt
    from .linear8bit import dequantize_weight as dequantize_int8_weight
except ModuleNotFoundError as exc:
    if exc.name != __package__ + ".linear8bit":
        raise
    Int8Params = Linear8bitLt = dequantize_int8_weight = None

__all__ = ["Int8Params", "Linear8bitLt", "dequantize_int8_weight"]
