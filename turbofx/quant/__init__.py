"""turbofx.quant: quantization configs, tensor quantizers, the fp64 dequantization reference and a
raw GGUF block reader. Pure torch: the kernels (``turbofx.codegen.gemm``) and the compiler pass
(``turbofx.passes.quantize``) build on it. ``turbofx.quant.gguf`` imports the gguf package lazily."""
from __future__ import annotations

from turbofx.quant.config import (CHOICES, Float8Dynamic, Float8WeightOnly, GGUFNative, Int4WeightOnly,
                                  Int8Dynamic, Int8WeightOnly, QuantConfig, config_from_json, default_filter, parse)
from turbofx.quant.weights import (QuantizedWeight, cat_rows, dequantize, quantize_activations, quantize_fp8,
                                   quantize_int4, quantize_int8)

__all__ = ["CHOICES", "Float8Dynamic", "Float8WeightOnly", "GGUFNative", "Int4WeightOnly", "Int8Dynamic",
           "Int8WeightOnly", "QuantConfig", "QuantizedWeight", "cat_rows", "config_from_json", "default_filter",
           "dequantize", "gguf_linear_weights", "parse", "quantize_activations", "quantize_fp8", "quantize_int4",
           "quantize_int8"]


def __getattr__(name: str):
    if name == "gguf_linear_weights":  # lazy: keeps `import turbofx.quant` free of gguf / transformers
        from turbofx.quant.gguf import gguf_linear_weights

        return gguf_linear_weights
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
