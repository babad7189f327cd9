"""Builders of a training run's parts from the rest of the stack: the model (loaded by
ds-model, its base quantized for QLoRA by ds-quant, LoRA injected by ds-lora), its
tokenizer and its optimizer (ds-optim).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from ds_model.training.config import TrainingConfig
from ds_model.training.tokenize import ByteTokenizer

__all__ = [
    "apply_lora",
    "base_directory",
    "build_optimizer",
    "load_model",
    "quantize_for_qlora",
    "resolve_tokenizer",
]


def load_model(source: Any) -> nn.Module:
    """A checkpoint directory or preset name through ``ds_model.from_pretrained``."""
    if isinstance(source, nn.Module):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"model must be an nn.Module, a checkpoint path or a preset name, got "
            f"{type(source).__name__}"
        )
    import ds_model

    loader = getattr(ds_model, "from_pretrained", None)
    if loader is None:
        raise ValueError(f"model={source!r}: this ds-model has no from_pretrained to load it")
    return loader(os.fspath(source), dtype=torch.float32)


def resolve_tokenizer(tokenizer: Any, source: Any, model: nn.Module) -> Any:
    """The tokenizer given (an object, ``"bytes"`` or a path ds-model can load), else the
    model's own (``model.tokenizer``), else the checkpoint directory's, else (for
    random-weight presets only) bytes."""
    if isinstance(tokenizer, str) and tokenizer == "bytes":
        return ByteTokenizer()
    if isinstance(tokenizer, (str, os.PathLike)):
        import ds_model

        return ds_model.load_tokenizer(os.fspath(tokenizer))
    if tokenizer is not None:
        return tokenizer
    own = getattr(model, "tokenizer", None)
    if own is not None:
        return own
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        import ds_model

        if ds_model.Tokenizer.available(source):
            return ds_model.load_tokenizer(os.fspath(source))
        raise ValueError(
            f"model={os.fspath(source)!r} has no tokenizer.json or tokenizer.model; pass "
            "tokenizer= (a tokenizer, a path, or 'bytes' for UTF-8 bytes) / --tokenizer"
        )
    vocab = _vocab_size(model)
    if vocab is not None and vocab >= ByteTokenizer.vocab_size:
        warnings.warn(
            "no tokenizer given and the model has none: using ByteTokenizer (UTF-8 bytes); "
            "pass tokenizer= to train with a real one",
            stacklevel=3,
        )
        return ByteTokenizer()
    raise ValueError(
        "no tokenizer: pass tokenizer= (anything with encode(text) -> list[int]); the model's "
        f"vocabulary ({vocab}) is too small for the byte fallback ({ByteTokenizer.vocab_size})"
    )


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None:
        return int(vocab)
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return int(module.num_embeddings)
    return None


# ------------------------------------------------------------------ LoRA / QLoRA
def _lora():
    try:
        import ds_lora
    except ImportError as e:  # pragma: no cover - ds-lora is a dependency
        raise ValueError("LoRA training needs ds-lora") from e
    return ds_lora


def apply_lora(model: nn.Module, lora_config: Any) -> nn.Module:
    """Inject the adapter in place; only adapter parameters stay trainable."""
    ds_lora = _lora()
    if not isinstance(lora_config, ds_lora.LoraConfig):
        raise TypeError(
            f"lora_config must be a ds_model.LoraConfig (ds_lora.LoraConfig), got "
            f"{type(lora_config).__name__}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    # In place (not the LoraModel wrapper), so parameter names, the model's own
    # save_pretrained and the tensor-parallel plan's layer names stay as they were.
    wrapped = ds_lora.inject(model, lora_config)
    if not any(p.requires_grad for p in wrapped.parameters()):
        raise ValueError(
            f"lora_config.target_modules={lora_config.target_modules!r} matched no layer"
        )
    return wrapped


def quantize_for_qlora(model: nn.Module, group_size: int = 64) -> nn.Module:
    """QLoRA's frozen base: every linear layer except the output head to INT4 (W4A16)."""
    from ds_quant import Int4WeightOnlyConfig, quantize_

    head = _output_head(model)

    def keep_float(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and module is not head

    quantize_(model, Int4WeightOnlyConfig(group_size=group_size), filter_fn=keep_float)
    return model


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        return getter()
    return getattr(model, "lm_head", None)


def base_directory(source: Any) -> str | None:
    """The absolute path of a model given as a checkpoint directory, else None."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        return os.path.abspath(source)
    return None


# -------------------------------------------------------------------- optimizer
def build_optimizer(model: nn.Module, args: TrainingConfig) -> torch.optim.Optimizer:
    """The optimizer ``args`` names (see :mod:`ds_model.training.optimizer`)."""
    from ds_model.training import optimizer

    return optimizer.build_optimizer(model, args)
