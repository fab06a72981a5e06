"""nf4kit: bitsandbytes-format 4-bit (NF4/FP4) and 8-bit weight quantization with its own kernels.

A bitsandbytes user changes one import::

    import nf4kit as bnb                      # was: import bitsandbytes as bnb
    import nf4kit.functional as F             # was: import bitsandbytes.functional as F
"""
from . import _ops, functional, reference  # noqa: F401
from .functional import QuantState, matmul_4bit  # noqa: F401

__version__ = "0.1.0"
