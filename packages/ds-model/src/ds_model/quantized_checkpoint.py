"""Quantized checkpoints: a ds-quant model saved and loaded back without a float detour.

``save_pretrained`` of a model whose linear layers ds-quant quantized writes
``model.safetensors`` in ds-quant's format (``ds_quant.save_quantized``: the stored
quantized tensors as they are, the per-layer recipe in the file's metadata; one file,
never sharded) and records the recipe in ``config.json``, in the spirit of
transformers' ``quantization_config``::

    "quantization_config": {
      "quant_method": "ds_quant", "format_version": "1",
      "method": "int4_weight_only", "bits": 4, "group_size": 32,
      "config": {"name": "int4_weight_only", "group_size": 32, "symmetric": false},
      "module_configs": {"lm_head": {"name": "int8_weight_only"}},
      "modules_to_not_convert": []
    }

``method`` / ``config`` is the recipe most layers use, ``module_configs`` the layers
quantized otherwise, ``modules_to_not_convert`` the linear layers left in float.
Loading builds the model on the meta device, checks this block field by field and
against the file's own recipe (a mismatch is refused naming the field), and assigns the
stored tensors through ``ds_quant.load_quantized``: nothing is dequantized or
requantized, so the loaded model computes exactly what the saved one did.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds_model.config import ConfigError, ModelConfig

__all__ = [
    "QUANT_METHOD",
    "checked_block",
    "is_quantized",
    "is_quantized_checkpoint",
    "load_quantized_pretrained",
    "quantization_config_block",
    "save_quantized_weights",
    "saved_method",
]

QUANT_METHOD = "ds_quant"
FORMAT_VERSION = "1"
WEIGHTS_FILE = "model.safetensors"
# Weight bits of each ds-quant recipe (W8A8 also quantizes activations to 8 bits).
BITS = {
    "int8_weight_only": 8,
    "int8_dynamic_activation_int8_weight": 8,
    "int4_weight_only": 4,
    "fp8_block": 8,
}


def _quantized_layers(model: nn.Module) -> dict[str, Any]:
    from ds_quant import QuantizedLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def is_quantized(model: nn.Module) -> bool:
    """Whether any linear layer of ``model`` is a ds-quant layer."""
    return bool(_quantized_layers(model))


def quantization_config_block(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` that ``config.json`` records for ``model``."""
    layers = _quantized_layers(model)
    configs = {name: layer.config.to_dict() for name, layer in layers.items()}
    counts = Counter(json.dumps(c, sort_keys=True) for c in configs.values())
    main = json.loads(counts.most_common(1)[0][0])
    block: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "method": main["name"],
        "bits": BITS.get(main["name"]),
    }
    block.update({k: v for k, v in main.items() if k != "name"})
    block["config"] = main
    block["module_configs"] = {n: c for n, c in sorted(configs.items()) if c != main}
    block["modules_to_not_convert"] = sorted(
        n for n, m in model.named_modules() if isinstance(m, nn.Linear)
    )
    return block


def save_quantized_weights(model: nn.Module, path: Path) -> dict[str, Any]:
    """Write ``path/model.safetensors`` in ds-quant's format; return the config block.

    A tied LM head that stayed float is written as its own copy (safetensors stores no
    shared tensors) and tied again at load."""
    import ds_quant

    tied = _tied_float_head(model)
    if tied:
        embedding = model.lm_head.weight
        model.lm_head.weight = nn.Parameter(embedding.detach().clone(), requires_grad=False)
    try:
        ds_quant.save_quantized(model, path / WEIGHTS_FILE, metadata={"format": "pt"})
        block = quantization_config_block(model)
    finally:
        if tied:
            model.lm_head.weight = embedding
    return block


def _tied_float_head(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    return (
        isinstance(head, nn.Linear)
        and model.config.tie_word_embeddings
        and head.weight is model.model.embed_tokens.weight
    )


def is_quantized_checkpoint(config: ModelConfig) -> bool:
    """Whether ``config.json`` says the weights are in ds-quant's format."""
    block = config.extra.get("quantization_config")
    return isinstance(block, dict) and block.get("quant_method") == QUANT_METHOD


def _field_error(config_file: Path, field: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{config_file}: quantization_config.{field}={value!r}: expected {allowed}")


def checked_block(config_file: Path, block: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The block's main ds-quant config and its per-module configs, every field checked."""
    import ds_quant

    def config_of(field: str, value: Any) -> Any:
        if not isinstance(value, dict):
            raise _field_error(config_file, field, value, "a ds-quant config object")
        try:
            return ds_quant.config_from_dict(value)
        except (KeyError, ValueError, TypeError) as exc:
            reason = exc.args[0] if exc.args else exc
            raise ConfigError(
                f"{config_file}: quantization_config.{field}={value!r}: {reason}"
            ) from None

    version = block.get("format_version")
    if version != FORMAT_VERSION:
        raise _field_error(config_file, "format_version", version, repr(FORMAT_VERSION))
    method = block.get("method")
    if method not in BITS:
        raise _field_error(config_file, "method", method, f"one of {sorted(BITS)}")
    main = config_of("config", block.get("config"))
    if main.name != method:
        raise _field_error(config_file, "config", block.get("config"), f"a {method!r} config")
    if block.get("bits") != BITS[method]:
        raise _field_error(config_file, "bits", block.get("bits"), f"{BITS[method]} for {method}")
    for key, value in main.to_dict().items():
        if key != "name" and block.get(key) != value:
            raise _field_error(config_file, key, block.get(key), f"{value!r} (as in its config)")
    others = block.get("module_configs", {})
    if not isinstance(others, dict):
        raise _field_error(config_file, "module_configs", others, "an object {module: config}")
    module_configs = {
        name: config_of(f"module_configs[{name!r}]", value) for name, value in others.items()
    }
    floats = block.get("modules_to_not_convert", [])
    if not isinstance(floats, list) or not all(isinstance(n, str) for n in floats):
        raise _field_error(config_file, "modules_to_not_convert", floats, "a list of module names")
    return main, module_configs


def _check_against_recipe(config_file: Path, weights: Path, block: dict[str, Any]) -> None:
    """config.json's block and the weights file's own recipe must describe the same layers."""
    import ds_quant

    main, module_configs = checked_block(config_file, block)
    recipe = ds_quant.read_recipe(weights)
    for name, entry in recipe.items():
        stored = entry.get("config") if isinstance(entry, dict) else None
        expected = module_configs.get(name, main)
        if stored != expected.to_dict():
            field = f"module_configs[{name!r}]" if name in module_configs else "config"
            raise ConfigError(
                f"{config_file}: quantization_config.{field} says {name!r} is "
                f"{expected.to_dict()}, but {weights.name} stores it as {stored}"
            )
    for name in module_configs:
        if name not in recipe:
            raise ConfigError(
                f"{config_file}: quantization_config.module_configs names {name!r}, which "
                f"{weights.name} does not quantize"
            )
    for name in block.get("modules_to_not_convert", []):
        if name in recipe:
            raise ConfigError(
                f"{config_file}: quantization_config.modules_to_not_convert names {name!r}, "
                f"which {weights.name} stores quantized"
            )


def saved_method(config: ModelConfig) -> Any:
    """The main ds-quant config a quantized checkpoint was saved with (unchecked block)."""
    import ds_quant

    return ds_quant.config_from_dict(config.extra["quantization_config"]["config"])


def load_quantized_pretrained(
    path: Path,
    config: ModelConfig,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str,
) -> nn.Module:
    """The model of a quantized checkpoint directory, its quantized tensors as stored.

    ``dtype``: the float parts (embeddings, norms, float layers, biases) and the
    quantized layers' activation dtype; ``None`` keeps what was saved."""
    import ds_quant

    from ds_model.model import DeepSeekForCausalLM

    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"{path}: config.json records a ds-quant checkpoint, but {WEIGHTS_FILE} is missing"
        )
    _check_against_recipe(path / "config.json", weights, config.extra["quantization_config"])
    with torch.device("meta"):
        model = DeepSeekForCausalLM(config)
    try:
        ds_quant.load_quantized(model, weights, device=device)
    except (KeyError, TypeError, RuntimeError) as exc:  # a file that is not this model's
        reason = exc.args[0] if exc.args else exc
        raise ConfigError(
            f"{weights}: does not fit the model config.json describes: {reason}"
        ) from None
    if config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.reset_rope()
    if dtype is not None:
        _set_float_dtype(model, dtype)
    return model


def _set_float_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the float parameters to ``dtype``; quantized tensors stay as stored, their
    layers compute in ``dtype``. The router's correction bias stays float32."""
    from ds_quant import QuantizedLinear

    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.orig_dtype = dtype
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().to(dtype))
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                module._parameters[name] = nn.Parameter(
                    param.detach().to(dtype), requires_grad=param.requires_grad
                )
        for name, buffer in module.named_buffers(recurse=False):
            keep = name == "e_score_correction_bias" or name in module._non_persistent_buffers_set
            if buffer.is_floating_point() and not keep:
                module._buffers[name] = buffer.to(dtype)
    if model.config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.model.embed_tokens.weight
