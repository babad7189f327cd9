"""ds-serve: an OpenAI-compatible server with continuous batching on the DeepSeek stack.

``create_app(model_path, **engine_options)`` returns an ASGI app with ``.run(host, port)``;
``ds-serve [MODEL_PATH]`` is the same from the command line.
"""

from ds_serve.app import App
from ds_serve.default_model import DefaultModelNotFound, find_default_model
from ds_serve.engine import Delta, Engine, EngineClosed
from ds_serve.errors import APIError
from ds_serve.protocol import EngineProtocol
from ds_serve.sampling import SamplingParams
from ds_serve.server import ENGINE_OPTIONS, build_engine, create_app

__version__ = "0.2.0"

__all__ = [
    "ENGINE_OPTIONS",
    "APIError",
    "App",
    "DefaultModelNotFound",
    "Delta",
    "Engine",
    "EngineClosed",
    "EngineProtocol",
    "SamplingParams",
    "__version__",
    "build_engine",
    "create_app",
    "find_default_model",
]
