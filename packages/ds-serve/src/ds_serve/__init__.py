"""ds-serve: an OpenAI-compatible server with continuous batching on the DeepSeek stack."""

from ds_serve.protocol import EngineProtocol

__version__ = "0.1.0"

__all__ = ["EngineProtocol", "__version__"]
