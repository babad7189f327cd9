"""ds-lora: exact, PEFT-compatible LoRA over any linear layer."""

from ds_lora.protocol import LinearLike

__version__ = "0.1.0"

__all__ = ["LinearLike", "__version__"]
