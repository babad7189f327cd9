"""ds-quant: INT8 / INT4 / FP8 block quantization for torch models."""

from ds_quant.protocol import QuantConfig, QuantizedLinearProtocol

__version__ = "0.1.0"

__all__ = ["QuantConfig", "QuantizedLinearProtocol", "__version__"]
