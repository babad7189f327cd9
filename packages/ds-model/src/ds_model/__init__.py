"""ds-model: the DeepSeek model family (LLM/Coder, V2, V3) for loading, generation and training."""

from ds_model.protocol import CausalLM, ModelRunnerProtocol

__version__ = "0.1.0"

__all__ = ["CausalLM", "ModelRunnerProtocol", "__version__"]
