"""Quantized checkpoints in safetensors, with the recipe in the metadata.

The file holds the model's ``state_dict`` (quantized buffers as stored, float params
as they are) and two metadata keys: ``ds_quant.format`` ("1") and ``ds_quant.recipe``,
JSON mapping each quantized layer's name to its config, shapes, bias and float dtype.
Loading rebuilds those layers empty from the recipe and assigns the stored tensors:
nothing is re-quantized and no float weight of a quantized layer is ever allocated
(build the float skeleton under ``torch.device("meta")``).

A file that is not such a checkpoint, a recipe entry with a missing or mistyped field, an
unknown config or dtype, and a quantized tensor stored with another dtype than its layer
holds (an INT8 weight replaced by float32) are refused at load with a ``ValueError``
naming the file and the entry.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ds_quant.config import config_from_dict
from ds_quant.linear import DTYPE_NAMES, QuantizedLinear
from ds_quant.quantize import LAYER_FOR_CONFIG_NAME, _replace

FORMAT_KEY = "ds_quant.format"
RECIPE_KEY = "ds_quant.recipe"
FORMAT_VERSION = "1"


def quantization_recipe(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each quantized layer's name -> its recipe (config, shapes, bias, float dtype)."""
    return {
        name: module.recipe()
        for name, module in model.named_modules()
        if isinstance(module, QuantizedLinear)
    }


def save_quantized(
    model: nn.Module, path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """Write ``model``'s state dict and quantization recipe to ``path`` atomically
    (a temp file in the same directory, then ``os.replace``)."""
    recipe = quantization_recipe(model)
    if not recipe:
        raise ValueError("model has no quantized layers: run quantize_ or calibrate first")
    tensors: dict[str, torch.Tensor] = {}
    # (storage address) -> [(first byte, end byte, key)] of the tensors saved from it
    spans: dict[int, list[tuple[int, int, str]]] = {}
    for key, value in model.state_dict().items():
        if value.device.type == "meta":
            raise ValueError(f"tensor {key!r} is on the meta device: nothing to save")
        # Tensors whose bytes overlap (tied weights, also through a transpose or a
        # slice) are refused: a load could not tie them again. Disjoint views of one
        # buffer (experts stacked for decoding) are saved as copies of their own.
        if value.numel():
            size = value.element_size()
            first = value.storage_offset() * size
            end = first + size * (
                1 + sum((n - 1) * st for n, st in zip(value.shape, value.stride()))
            )
            taken = spans.setdefault(value.untyped_storage().data_ptr(), [])
            for a, b, other in taken:
                if first < b and a < end:
                    raise ValueError(
                        f"tensor {key!r} shares memory with {other!r} (tied weights); "
                        "safetensors cannot store shared tensors: untie them before saving"
                    )
            taken.append((first, end, key))
        value = value.detach().contiguous().cpu()
        if value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone()
        tensors[key] = value
    meta = dict(metadata or {})
    meta[FORMAT_KEY] = FORMAT_VERSION
    meta[RECIPE_KEY] = json.dumps(recipe, sort_keys=True)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a saved model is for others to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open(path: str | os.PathLike[str], device: str = "cpu") -> Any:
    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as exc:  # SafetensorError, OSError: the message lacks the path
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def read_recipe(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The recipe stored in a checkpoint written by ``save_quantized``."""
    with _open(path) as f:
        meta = f.metadata() or {}
    if meta.get(FORMAT_KEY) != FORMAT_VERSION or RECIPE_KEY not in meta:
        raise ValueError(
            f"{path} is not a ds-quant checkpoint (metadata {FORMAT_KEY!r} = "
            f"{meta.get(FORMAT_KEY)!r}, expected {FORMAT_VERSION!r})"
        )
    try:
        recipe = json.loads(meta[RECIPE_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: metadata {RECIPE_KEY!r} is not valid JSON ({exc})") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: metadata {RECIPE_KEY!r} must map layer names to entries")
    return recipe


_ENTRY_FIELDS = {
    "in_features": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "out_features": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "bias": (lambda v: isinstance(v, bool), "true or false"),
    "dtype": (lambda v: v in DTYPE_NAMES, f"one of {sorted(DTYPE_NAMES)}"),
    "config": (lambda v: isinstance(v, dict), "a config object"),
}


def _checked_entry(path: Any, name: str, entry: Any) -> tuple[dict[str, Any], Any]:
    """A recipe entry with every field checked, and its rebuilt config."""
    where = f"{path}: recipe entry {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object, got {entry!r}")
    for field, (ok, allowed) in _ENTRY_FIELDS.items():
        if field not in entry:
            raise ValueError(f"{where} has no {field!r} field (expected {allowed})")
        if not ok(entry[field]):
            raise ValueError(f"{where}: {field}={entry[field]!r}, expected {allowed}")
    try:
        config = config_from_dict(entry["config"])
    except (ValueError, KeyError, TypeError) as exc:
        reason = exc.args[0] if exc.args else exc
        raise ValueError(f"{where}: config {entry['config']!r}: {reason}") from None
    if config.name not in LAYER_FOR_CONFIG_NAME:
        raise ValueError(f"{where}: config {config.name!r} has no quantized layer to load into")
    return entry, config


def load_quantized(
    model: nn.Module, path: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> nn.Module:
    """Load a ``save_quantized`` checkpoint into ``model`` (the float architecture,
    ideally built on the meta device) in place and return it.

    Quantized layers named in the recipe are replaced by empty quantized layers, then
    every tensor of the file is assigned (strictly: missing or unexpected keys raise).
    """
    recipe = read_recipe(path)
    for name, raw_entry in recipe.items():
        entry, config = _checked_entry(path, name, raw_entry)
        try:
            current = model.get_submodule(name)
        except AttributeError as err:
            raise KeyError(f"checkpoint quantizes {name!r}, which the model does not have") from err
        if not isinstance(current, nn.Linear):
            raise TypeError(
                f"checkpoint quantizes {name!r} but the model has a {type(current).__name__} there"
            )
        if (current.in_features, current.out_features) != (
            entry["in_features"],
            entry["out_features"],
        ):
            raise ValueError(
                f"layer {name!r}: checkpoint shape (in={entry['in_features']}, "
                f"out={entry['out_features']}) does not match the model's "
                f"(in={current.in_features}, out={current.out_features})"
            )
        layer_cls = LAYER_FOR_CONFIG_NAME[config.name]
        layer = layer_cls.empty(
            entry["in_features"],
            entry["out_features"],
            entry["bias"],
            config,
            DTYPE_NAMES[entry["dtype"]],
            device="meta",
        )
        if entry.get("input_scale"):
            layer.input_scale = torch.empty(entry["in_features"], device="meta")
        _replace(model, name, layer)
    expected = model.state_dict()  # the empty quantized layers' buffers, by key
    tensors: dict[str, torch.Tensor] = {}
    with _open(path, device=str(device)) as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            layer = key.rpartition(".")[0]
            want = expected.get(key)
            if layer in recipe and want is not None and tensor.dtype != want.dtype:
                raise ValueError(
                    f"{path}: tensor {key!r} of quantized layer {layer!r} is stored as "
                    f"{tensor.dtype}, but its {recipe[layer]['config'].get('name')!r} layer "
                    f"holds {want.dtype}"
                )
            # Tensors at odd file offsets may be misaligned for SIMD kernels: copy them.
            if tensor.numel() and tensor.data_ptr() % 64:
                tensor = tensor.clone()
            tensors[key] = tensor
    model.load_state_dict(tensors, strict=True, assign=True)
    return model
