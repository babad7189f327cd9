"""Which modules a ``LoraConfig`` targets, by PEFT's matching rules."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from torch import nn

from ds_lora.base import is_quantized
from ds_lora.config import ALL_LINEAR, LoraConfig
from ds_lora.errors import TargetModulesError
from ds_lora.layer import LoraLinear
from ds_lora.modules_to_save import ModulesToSaveWrapper

_SHOWN = 40


def iter_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without the root and without looking inside ds-lora's wrappers
    (a wrapped layer is reported once, under its original name)."""
    for name, child in model.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, LoraLinear | ModulesToSaveWrapper):
            yield from iter_modules(child, full)


def name_matches(name: str, targets: Sequence[str] | str) -> bool:
    """A regex string must match the whole name; a list entry must equal the name or be its
    dotted suffix (``"q_proj"`` matches ``"layers.0.attn.q_proj"``, not ``"xq_proj"``)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear``, a ``LoraLinear``, or a quantized linear (in/out features + dequantize)."""
    if isinstance(module, nn.Linear | LoraLinear):
        return True
    return (
        isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
        and callable(module)
        and is_quantized(module)
    )


def _output_layer_names(model: nn.Module) -> set[str]:
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in iter_modules(model):
        if name.rsplit(".", 1)[-1] == "lm_head":
            names.add(name)
        if out is not None and (
            module is out or (isinstance(module, LoraLinear) and module.base_layer is out)
        ):
            names.add(name)
    return names


def _describe(model: nn.Module) -> str:
    linear = [n for n, m in iter_modules(model) if is_linear_like(m)]
    short = sorted({n.rsplit(".", 1)[-1] for n in linear})
    shown = linear[:_SHOWN]
    more = f" ... and {len(linear) - _SHOWN} more" if len(linear) > _SHOWN else ""
    return f"the model's linear layers are named {short} (full names: {shown}{more})"


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules ``config.target_modules`` selects, in model order."""
    targets = config.target_modules
    if targets == ALL_LINEAR:
        excluded = _output_layer_names(model)
        found = [n for n, m in iter_modules(model) if is_linear_like(m) and n not in excluded]
    else:
        found = []
        for name, module in iter_modules(model):
            if not name_matches(name, targets):
                continue
            if not is_linear_like(module):
                raise TargetModulesError(
                    f"target_modules={targets!r} matches {name!r}, a {type(module).__name__}, "
                    "which LoRA cannot wrap: it needs nn.Linear or a quantized linear with "
                    "in_features, out_features and dequantize() (ds_lora.LinearLike)"
                )
            found.append(name)
    if not found:
        raise TargetModulesError(
            f"target_modules={targets!r} matches no module; {_describe(model)}"
        )
    return found


def find_modules_to_save(model: nn.Module, names: Sequence[str]) -> list[str]:
    found = [n for n, _ in iter_modules(model) if name_matches(n, names)]
    # A module inside another matched one is already covered by the outer copy.
    found = [n for n in found if not any(n.startswith(o + ".") for o in found)]
    missing = [t for t in names if not any(name_matches(n, [t]) for n in found)]
    if missing:
        all_names = [n for n, _ in iter_modules(model)]
        raise TargetModulesError(
            f"modules_to_save entries {missing} match no module; modules are "
            f"{all_names[:_SHOWN]}{' ...' if len(all_names) > _SHOWN else ''}"
        )
    return found
