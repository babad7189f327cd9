"""A LoRA adapter in PEFT's format: the default adapter's checkpoint keys, its tensors
(live or gathered from shards), and ``adapter_model.safetensors`` +
``adapter_config.json`` written and read back."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

__all__ = ["adapter_keys", "adapter_state", "load_adapter_state", "write_adapter"]


def adapter_keys(model: nn.Module) -> dict[str, str]:
    """{PEFT checkpoint key: this model's parameter name} for the default adapter."""
    from ds_lora import adapter_tensors

    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for key, tensor in adapter_tensors(model, "default").items():
        if id(tensor) in names:
            out[key] = names[id(tensor)]
    return out


def adapter_state(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """{PEFT checkpoint key: CPU tensor} of the default adapter.

    ``state`` maps parameter names to (gathered, full) tensors when the live parameters
    are sharded; ``None`` reads the live model. A pipeline stage returns its own layers'
    part; the stages' parts together are the whole adapter."""
    live = dict(model.named_parameters())
    out = {}
    for key, name in adapter_keys(model).items():
        t = state[name] if state is not None else live[name]
        out[key] = t.detach().to("cpu").contiguous().clone()
    return out


def write_adapter(
    model: nn.Module, directory: str, tensors: dict[str, torch.Tensor], base: str | None = None
) -> None:
    """``tensors`` (from :func:`adapter_state`) in PEFT's format: ``adapter_model.safetensors``
    + ``adapter_config.json`` (the config of ``model``'s default adapter). ``base``: the
    base checkpoint's directory, recorded as ``base_model_name_or_path`` so the adapter
    folder alone can be served (``ds-serve DIR``) or loaded by PEFT."""
    from ds_lora import adapter_configs
    from safetensors.torch import save_file

    config = adapter_configs(model)["default"].to_peft_dict()
    if base is not None:
        config["base_model_name_or_path"] = base
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_adapter_state(
    model: nn.Module, directory: str, partial: bool = False
) -> dict[str, torch.Tensor]:
    """{parameter name: tensor} from a PEFT-format adapter written by :func:`write_adapter`.
    ``partial``: ``model`` is one pipeline stage, holding part of the adapter; the file's
    other tensors are skipped (every tensor the stage has must still be in the file)."""
    from ds_model.training.checkpoint import load_weights

    saved = load_weights(os.path.join(directory, "adapter_model.safetensors"))
    keys = adapter_keys(model)
    missing = sorted(set(keys) - set(saved))
    extra = [] if partial else sorted(set(saved) - set(keys))
    if missing or extra:
        raise ValueError(
            f"{directory}: adapter does not fit the model (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    return {name: saved[key] for key, name in keys.items()}
