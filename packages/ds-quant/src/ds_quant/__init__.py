"""ds-quant: INT8 / INT4 (W4A16) / DeepSeek FP8 block quantization for torch models.

``quantize_(model, config)`` swaps ``nn.Linear`` layers in place; ``calibrate`` does
activation-aware INT4; ``save_quantized`` / ``load_quantized`` round-trip safetensors.
"""

from ds_quant.calibrate import calibrate
from ds_quant.config import (
    Fp8BlockConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    config_from_dict,
)
from ds_quant.fp8 import dequantize_fp8_block, quantize_fp8_block
from ds_quant.linear import QuantizedLinear
from ds_quant.linear_fp8 import Fp8BlockLinear
from ds_quant.linear_int4 import Int4WeightOnlyLinear
from ds_quant.linear_int8 import Int8DynamicActivationInt8WeightLinear, Int8WeightOnlyLinear
from ds_quant.primitives import pack_int4, unpack_int4
from ds_quant.protocol import QuantConfig, QuantizedLinearProtocol
from ds_quant.quantize import AlreadyQuantizedError, quantize_, register_quant_handler
from ds_quant.serialization import load_quantized, quantization_recipe, read_recipe, save_quantized

__version__ = "0.2.0"

__all__ = [
    "AlreadyQuantizedError",
    "Fp8BlockConfig",
    "Fp8BlockLinear",
    "Int4WeightOnlyConfig",
    "Int4WeightOnlyLinear",
    "Int8DynamicActivationInt8WeightConfig",
    "Int8DynamicActivationInt8WeightLinear",
    "Int8WeightOnlyConfig",
    "Int8WeightOnlyLinear",
    "QuantConfig",
    "QuantizedLinear",
    "QuantizedLinearProtocol",
    "__version__",
    "calibrate",
    "config_from_dict",
    "dequantize_fp8_block",
    "load_quantized",
    "pack_int4",
    "quantization_recipe",
    "quantize_",
    "quantize_fp8_block",
    "read_recipe",
    "register_quant_handler",
    "save_quantized",
    "unpack_int4",
]
