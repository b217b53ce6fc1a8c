"""Quantized weights: storage formats, conversions (GGUF blocks, int8, int4) and their modules."""

from llamarun.quant.formats import (
    DENSE, GGUF_INT4_TYPES, GGUF_SYMMETRIC_INT4_TYPES, INT4_GROUP_SIZES, INT8, Int4Parts, Int8Parts, WeightFormat, cat_int4, dequantize_int4,
    dequantize_int8, gguf_int4, quantize_int4, quantize_int8,
)
from llamarun.quant.modules import (
    Int4Linear, Int8Embedding, Int8Linear, int4_layout, module_state, quantized_module,
    swap_modules,
)

__all__ = [
    "DENSE", "GGUF_INT4_TYPES", "GGUF_SYMMETRIC_INT4_TYPES", "INT4_GROUP_SIZES", "INT8", "Int4Linear", "Int4Parts", "Int8Embedding", "Int8Linear",
    "Int8Parts", "WeightFormat", "cat_int4", "dequantize_int4", "dequantize_int8", "gguf_int4",
    "int4_layout", "module_state", "quantize_int4", "quantize_int8", "quantized_module", "swap_modules",
]
