"""ds-attention: flash-attention kernels for dense, windowed and block-sparse attention."""

from ds_attention.protocol import AttentionBackend, MaskSpec

__version__ = "0.1.0"

__all__ = ["AttentionBackend", "MaskSpec", "__version__"]
