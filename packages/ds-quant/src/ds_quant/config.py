"""The quantization recipes: small frozen configs, validated on construction.

Each config has a stable ``name`` (written into checkpoint metadata) and round-trips
through ``to_dict`` / ``config_from_dict`` so a saved checkpoint says how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Fp8BlockConfig",
    "Int4WeightOnlyConfig",
    "Int8DynamicActivationInt8WeightConfig",
    "Int8WeightOnlyConfig",
    "config_from_dict",
]


class _ConfigBase:
    name: str

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain JSON-able data, with its ``name``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
        return {"name": self.name, **fields}


@dataclass(frozen=True)
class Int8WeightOnlyConfig(_ConfigBase):
    """INT8 weights, symmetric, one scale per output channel; activations stay float."""

    name = "int8_weight_only"


@dataclass(frozen=True)
class Int8DynamicActivationInt8WeightConfig(_ConfigBase):
    """W8A8: INT8 weights (per output channel) and INT8 activations with one scale per
    token, computed at run time from the token's absolute maximum."""

    name = "int8_dynamic_activation_int8_weight"


def _check_group_size(group_size: object) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 2 or group_size & (group_size - 1):
        raise ValueError(
            f"group_size must be a power of two >= 2 (e.g. 32, 64, 128, 256), got {group_size}"
        )


@dataclass(frozen=True)
class Int4WeightOnlyConfig(_ConfigBase):
    """W4A16: 4-bit weights, two per byte, one scale and one zero point per
    ``group_size`` consecutive input channels of each output channel.

    ``symmetric=False`` (the default) maps each group's [min, max] onto 0..15 with a
    floating zero point; ``symmetric=True`` maps [-amax, amax] onto -8..7 (zero point 8).
    """

    group_size: int = 128
    symmetric: bool = False

    name = "int4_weight_only"

    def __post_init__(self) -> None:
        _check_group_size(self.group_size)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {self.symmetric!r}")


@dataclass(frozen=True)
class Fp8BlockConfig(_ConfigBase):
    """DeepSeek-V3's FP8 format: ``float8_e4m3fn`` weights with one float32 scale per
    ``block`` = (rows, cols) tile, stored as ``weight_scale_inv`` (the factor that
    multiplies the FP8 value back to the real weight)."""

    block: tuple[int, int] = (128, 128)

    name = "fp8_block"

    def __post_init__(self) -> None:
        block = tuple(self.block) if isinstance(self.block, list | tuple) else self.block
        if (
            not isinstance(block, tuple)
            or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):
            raise ValueError(f"block must be two positive ints (rows, cols), got {self.block!r}")
        object.__setattr__(self, "block", block)


_BY_NAME: dict[str, type[_ConfigBase]] = {
    c.name: c
    for c in (
        Int8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int4WeightOnlyConfig,
        Fp8BlockConfig,
    )
}


def config_from_dict(data: dict[str, Any]) -> Any:
    """Rebuild a config from ``to_dict()`` output (e.g. a checkpoint's metadata)."""
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"a config dict needs a 'name' key, got {data!r}")
    kwargs = dict(data)
    name = kwargs.pop("name")
    if name not in _BY_NAME:
        raise KeyError(f"unknown quantization config name {name!r}; known: {sorted(_BY_NAME)}")
    cls = _BY_NAME[name]
    if "block" in kwargs:
        kwargs["block"] = tuple(kwargs["block"])
    return cls(**kwargs)
