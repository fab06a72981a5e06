"""nf4kit's layers, bitsandbytes' names: ``import nf4kit.nn as bnn`` where code had ``bitsandbytes.nn``."""
from .convert import dequantize_model, quantize_model
from .linear4bit import Linear4bit, LinearFP4, LinearNF4
from .linear8bit import Int8Params, Linear8bitLt, MatmulLtState, matmul
from .params4bit import Params4bit
from .training import prepare_model_for_kbit_training

__all__ = [
    "Params4bit", "Linear4bit", "LinearNF4", "LinearFP4", "Int8Params", "Linear8bitLt",
    "quantize_model", "dequantize_model", "prepare_model_for_kbit_training", "MatmulLtState", "matmul",
]
