"""``quantize_(model, config, filter_fn=None)``: swap linear layers in place, torchao-style.

A handler registry keyed by config type maps ``(nn.Linear, config) -> QuantizedLinear``;
``register_quant_handler`` adds one for a new config type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ds_quant.config import (
    Fp8BlockConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from ds_quant.linear import QuantizedLinear
from ds_quant.linear_fp8 import Fp8BlockLinear
from ds_quant.linear_int4 import Int4WeightOnlyLinear
from ds_quant.linear_int8 import Int8DynamicActivationInt8WeightLinear, Int8WeightOnlyLinear

Handler = Callable[[nn.Linear, Any], nn.Module]
FilterFn = Callable[[nn.Module, str], bool]

_HANDLERS: dict[type, Handler] = {}
# Layer classes a checkpoint can name, by config name (see serialization).
LAYER_FOR_CONFIG_NAME: dict[str, type[QuantizedLinear]] = {}


class AlreadyQuantizedError(ValueError):
    """Raised when asked to quantize a layer that is already quantized."""


def register_quant_handler(config_type: type, handler: Handler) -> None:
    """Make ``quantize_`` turn an ``nn.Linear`` into ``handler(linear, config)`` for
    configs of ``config_type`` (replacing any handler registered for that type)."""
    if not isinstance(config_type, type):
        raise TypeError(f"config_type must be a class, got {config_type!r}")
    _HANDLERS[config_type] = handler


for _layer in (
    Int8WeightOnlyLinear,
    Int8DynamicActivationInt8WeightLinear,
    Int4WeightOnlyLinear,
    Fp8BlockLinear,
):
    register_quant_handler(_layer.config_type, _layer.from_float)
    LAYER_FOR_CONFIG_NAME[_layer.config_type.name] = _layer

SUPPORTED_CONFIGS = (
    Int8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int4WeightOnlyConfig,
    Fp8BlockConfig,
)


def handler_for(config: Any) -> Handler:
    """The registered handler for ``config``'s type, or a TypeError naming the known ones."""
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = sorted(t.__name__ for t in _HANDLERS)
        raise TypeError(
            f"unknown quantization config {config!r} (type {type(config).__name__}); "
            f"registered config types: {known}"
        )
    return handler


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Quantize every ``nn.Linear``."""
    return isinstance(module, nn.Linear)


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_(model: nn.Module, config: Any, filter_fn: FilterFn | None = None) -> nn.Module:
    """Quantize ``model`` in place and return it.

    Every submodule for which ``filter_fn(module, fully_qualified_name)`` is true (by
    default: every ``nn.Linear``) is replaced by the layer the handler for
    ``type(config)`` builds. ``model`` itself may be an ``nn.Linear``; then the
    quantized layer is returned (and ``model`` is left as it was).

    Raises TypeError for an unknown config or a selected module that is not an
    ``nn.Linear``, and ``AlreadyQuantizedError`` for a selected layer already quantized.
    """
    handler = handler_for(config)
    filter_fn = filter_fn or default_filter
    targets = []
    for fqn, module in model.named_modules():
        if not filter_fn(module, fqn):
            continue
        if isinstance(module, QuantizedLinear):
            raise AlreadyQuantizedError(
                f"module {fqn or '<root>'!r} is already quantized ({type(module).__name__}, "
                f"{module.config}); quantize the float model instead"
            )
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"filter_fn selected module {fqn or '<root>'!r} of type "
                f"{type(module).__name__}; only nn.Linear layers can be quantized"
            )
        targets.append(fqn)
    if "" in targets:
        return handler(model, config)  # type: ignore[arg-type]
    for fqn in targets:
        _replace(model, fqn, handler(model.get_submodule(fqn), config))  # type: ignore[arg-type]
    return model
