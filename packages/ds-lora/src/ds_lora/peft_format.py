"""Save and load adapters in PEFT's on-disk format, so files move between the libraries.

A directory holds ``adapter_config.json`` (``LoraConfig.to_peft_dict``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight``,
``...lora_B.weight``, ``...lora_magnitude_vector`` (DoRA), ``<module path>.<param>`` for a
modules_to_save copy, and the trainable biases. Both files are written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ds_lora.config import LoraConfig
from ds_lora.errors import AdapterShapeError, LoraConfigError
from ds_lora.layer import LoraLinear
from ds_lora.modules_to_save import ModulesToSaveWrapper
from ds_lora.targeting import iter_modules
from ds_lora.tuner import (
    _require,
    bias_parameters,
    delete_adapter,
    frozen_adapters,
    inject,
    set_adapter,
    unwrap,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``{checkpoint key: the live model tensor}`` for one adapter, in PEFT's key names."""
    config = _require(model, adapter_name)
    root = unwrap(model)
    out: dict[str, torch.Tensor] = {}
    for name, module in iter_modules(root):
        if isinstance(module, LoraLinear) and adapter_name in module.lora_A:
            out[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A[adapter_name].weight
            out[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B[adapter_name].weight
            if adapter_name in module.lora_magnitude_vector:
                magnitude = module.lora_magnitude_vector[adapter_name].weight
                out[f"{PREFIX}{name}.lora_magnitude_vector"] = magnitude
            bias = getattr(module.base_layer, "bias", None)
            if config.bias == "lora_only" and isinstance(bias, nn.Parameter):
                out[f"{PREFIX}{name}.base_layer.bias"] = bias
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, tensor in (
                module.modules_to_save[adapter_name].state_dict(keep_vars=True).items()
            ):
                out[f"{PREFIX}{name}.{key}"] = tensor
    if config.bias == "all":
        for name, param in bias_parameters(root):
            out[f"{PREFIX}{name}"] = param
    return out


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a saved model is for others to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default"):
    """Write ``adapter_name`` to ``directory`` as ``adapter_config.json`` +
    ``adapter_model.safetensors`` (PEFT's format); returns the directory as a ``Path``."""
    config = _require(model, adapter_name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in adapter_tensors(model, adapter_name).items()
    }
    text = json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n"

    def write_json(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    _atomic_write(
        directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
    _atomic_write(directory / CONFIG_NAME, write_json)
    return directory


def read_config(directory: str | os.PathLike) -> LoraConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LoraConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LoraConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return LoraConfig.from_peft_dict(data)


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> nn.Module:
    """Add the adapter saved in ``directory`` (by ds-lora or PEFT) as ``adapter_name``.

    Every tensor in the file must have a place in the model and every adapter tensor of the
    model must be in the file, with equal shapes; otherwise nothing is added and the error
    names the keys (and both shapes). ``is_trainable=False`` (the default) loads it frozen,
    for inference, as PEFT does.
    """
    config = read_config(directory)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {str(directory)!r}")
    state = load_file(str(weights))
    inject(model, config, adapter_name)
    try:
        _copy_in(model, adapter_name, state, weights)
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    if not is_trainable:
        frozen_adapters(model).add(adapter_name)
    active = unwrap(model).__dict__.get("_ds_lora_active")
    if active == adapter_name:
        set_adapter(model, adapter_name)
    return model


def _copy_in(model: nn.Module, adapter_name: str, state: dict, source: Path) -> None:
    expected = adapter_tensors(model, adapter_name)
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        raise AdapterShapeError(
            f"{source} does not fit the model: keys in the file with no place in the model: "
            f"{unexpected[:20]}; adapter keys of the model missing from the file: {missing[:20]}"
        )
    for key, target in expected.items():
        value = state[key]
        if tuple(value.shape) != tuple(target.shape):
            raise AdapterShapeError(
                f"{source}: key {key!r} has shape {tuple(value.shape)} in the file but "
                f"{tuple(target.shape)} in the model"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key].to(dtype=target.dtype, device=target.device))
    for _, module in iter_modules(unwrap(model)):
        if isinstance(module, LoraLinear):
            module._stack_cache = None
