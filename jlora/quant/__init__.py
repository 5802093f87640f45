"""Quantized frozen bases (QLoRA), layer 2: the bitsandbytes codec (:mod:`.codec`), the
``QuantizedArray`` node (:mod:`.array`), its lazy dequantization inside ``jlora.lora``
(:mod:`.forward`) and the requantizing merge (:mod:`.merge`).

Choosing the kernels of a tree to quantize is a verb on trees: :func:`jlora.quantize`
(:mod:`jlora.tree.quantize`).
"""

from .array import (
    QuantConfig,
    QuantizedArray,
    bnb_order,
    dequantize,
    is_quantized,
    quantization_summary,
    quantize_array,
    quantized_leaves,
)
from .merge import RequantizeReport, RequantizeWarning

__all__ = [
    "QuantConfig",
    "QuantizedArray",
    "quantize_array",
    "dequantize",
    "is_quantized",
    "quantized_leaves",
    "quantization_summary",
    "bnb_order",
    "RequantizeReport",
    "RequantizeWarning",
]
