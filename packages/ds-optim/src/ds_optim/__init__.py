"""ds-optim: grouped-parameter AdamW and 4-bit gradient communication."""

from ds_optim.protocol import GradientCompressor

__version__ = "0.1.0"

__all__ = ["GradientCompressor", "__version__"]
