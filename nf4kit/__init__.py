"""nf4kit: bitsandbytes-format 4-bit (NF4/FP4) and 8-bit weight quantization with its own kernels.

A bitsandbytes user changes one import::

    import nf4kit as bnb                      # was: import bitsandbytes as bnb
    import nf4kit.functional as F             # was: import bitsandbytes.functional as F
    from nf4kit import BitsAndBytesConfig     # was: from transformers import BitsAndBytesConfig

Importing nf4kit registers its quantizer with transformers and its LoRA layers with PEFT when those
are imported (see nf4kit.integrations); neither is needed to import nf4kit.
"""
from . import _ops, functional, reference  # noqa: F401
from . import nn  # noqa: F401
from .config import BitsAndBytesConfig
from .functional import QuantState, matmul_4bit
from .nn import (Int8Params, Linear4bit, Linear8bitLt, LinearFP4, LinearNF4, MatmulLtState, Params4bit,
                 dequantize_model, matmul, prepare_model_for_kbit_training, quantize_model)
from . import integrations

__version__ = "0.1.0"

__all__ = [
    "BitsAndBytesConfig", "nn", "functional", "Params4bit", "Linear4bit", "LinearNF4", "LinearFP4",
    "Linear8bitLt", "Int8Params", "quantize_model", "dequantize_model", "prepare_model_for_kbit_training",
    "matmul_4bit", "matmul", "MatmulLtState", "QuantState",
]

integrations.install()
