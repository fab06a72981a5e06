"""The LLM.int8() layers of nn/linear8bit.py, or None where that file is absent from the build
(an error inside the file still raises)."""
try:
    from .linear8bit import Int8Params, Linear8bitLt
except ModuleNotFoundError as exc:
    if exc.name != __package__ + ".linear8bit":
        raise
    Int8Params = Linear8bitLt = None

__all__ = ["Int8Params", "Linear8bitLt"]
