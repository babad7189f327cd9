"""Entry points: ``from_pretrained``, the published ``AutoModel.from_pretrained`` spelling and
``from_config`` for a fresh randomly initialised model (presets included)."""

from __future__ import annotations

import os
from typing import Any

import torch

from ds_model.config import ModelConfig
from ds_model.loading import from_pretrained
from ds_model.model import DeepSeekForCausalLM

__all__ = ["AutoModel", "from_config", "from_pretrained"]


def from_config(
    config: ModelConfig | str | dict[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int | None = 0,
    attention: Any = None,
) -> DeepSeekForCausalLM:
    """A randomly initialised model from a config, a ``config.json`` dict or a preset
    name (``"standard"``, ``"light"``, ``"tiny"``). ``attention``: the attention
    pattern in place of the config's, a kind name (``"dense"``, ``"sliding_window"``,
    ``"dynamic_window"``, ``"block_sparse"``, ``"nsa"``, ``"gated"``) or an object
    ``{"kind": ..., <parameters>}`` (see ``ds_model.attention_pattern``)."""
    if isinstance(config, str):
        config = ModelConfig.from_preset(config)
    elif isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    elif not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, dict or preset name, got {config!r}")
    if attention is not None:
        config = config.replace(attention=attention)
    model = DeepSeekForCausalLM(config).init_weights(seed=seed)
    return model.to(device=device, dtype=dtype).eval()


class AutoModel:
    """The published spelling: ``AutoModel.from_pretrained(path, device=...)``."""

    def __init__(self) -> None:
        raise TypeError("use AutoModel.from_pretrained(path) or ds_model.from_config(config)")

    @staticmethod
    def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> DeepSeekForCausalLM:
        return from_pretrained(path, **kwargs)

    @staticmethod
    def from_config(config: ModelConfig | str | dict[str, Any], **kwargs: Any):
        return from_config(config, **kwargs)
