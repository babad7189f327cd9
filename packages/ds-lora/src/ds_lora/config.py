"""``LoraConfig``: a small immutable description of one adapter, validated on construction,
and its translation to and from PEFT's ``adapter_config.json``."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ds_lora.errors import LoraConfigError

ALL_LINEAR = "all-linear"
_BIAS = ("none", "all", "lora_only")
_INIT = ("default", "gaussian")

# PEFT fields ds-lora does not implement, with the values that mean "feature off". A file
# that turns one on is refused rather than loaded into something that computes differently.
_PEFT_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "fan_in_fan_out": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "layers_pattern": (None, [], ""),
    "lora_bias": (False, None),
    "exclude_modules": (None, [], ""),
    "layer_replication": (None,),
    "trainable_token_indices": (None,),
    "target_parameters": (None, []),
    "use_qalora": (False, None),
    "use_bdlora": (None, False),
    "alora_invocation_tokens": (None,),
}


@dataclass(frozen=True)
class LoraConfig:
    """One LoRA (or DoRA) adapter.

    ``target_modules``: a list of names, each matching a module whose full dotted name equals
    it or ends with ``"." + name`` (PEFT's rule); or a regex string that must match a full
    module name (``re.fullmatch``); or ``"all-linear"``: every linear layer except the output
    layer. ``scaling`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
    ``bias``: which base biases train too (``"none"``, ``"all"``, ``"lora_only"``: the
    biases of wrapped layers). ``modules_to_save``: names (same rule as a target list) of
    modules trained in full, as a per-adapter copy. ``init``: ``"default"`` (A Kaiming-uniform,
    B zeros) or ``"gaussian"`` (A normal with std 1/r, B zeros); both start as a no-op.
    """

    r: int = 16
    lora_alpha: float = 32
    target_modules: Sequence[str] | str = ("q_proj", "v_proj")
    lora_dropout: float = 0.1
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: Sequence[str] | None = None
    init: Literal["default", "gaussian"] = "default"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoraConfigError(f"r must be a positive int, got r={self.r!r}")
        alpha = self.lora_alpha
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise LoraConfigError(
                f"lora_alpha must be a finite number > 0, got lora_alpha={alpha!r}"
            )
        p = self.lora_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise LoraConfigError(
                f"lora_dropout must be a number in [0, 1), got lora_dropout={p!r}"
            )
        if self.bias not in _BIAS:
            raise LoraConfigError(f"bias must be one of {_BIAS}, got bias={self.bias!r}")
        if self.init not in _INIT:
            raise LoraConfigError(f"init must be one of {_INIT}, got init={self.init!r}")
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise LoraConfigError(
                    f"{flag} must be True or False, got {flag}={getattr(self, flag)!r}"
                )
        object.__setattr__(self, "target_modules", _check_targets(self.target_modules))
        if self.modules_to_save is not None:
            mts = self.modules_to_save
            if isinstance(mts, str) or not all(isinstance(n, str) and n for n in mts):
                raise LoraConfigError(
                    "modules_to_save must be None or a list of non-empty module names, "
                    f"got modules_to_save={mts!r}"
                )
            object.__setattr__(self, "modules_to_save", tuple(mts))

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` (rsLoRA)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT reads for this adapter."""
        targets = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "revision": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "modules_to_save": None if self.modules_to_save is None else list(self.modules_to_save),
            "init_lora_weights": True if self.init == "default" else "gaussian",
            "fan_in_fan_out": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Read a PEFT ``adapter_config.json`` dict. Unknown keys are ignored; PEFT features
        ds-lora does not implement are refused with the field and its value named."""
        if data.get("peft_type") != "LORA":
            raise LoraConfigError(
                f"adapter_config.json: peft_type must be 'LORA', got {data.get('peft_type')!r}"
            )
        for key, off in _PEFT_OFF_VALUES.items():
            if key in data and data[key] not in off:
                raise LoraConfigError(
                    f"adapter_config.json: {key}={data[key]!r} is a PEFT feature ds-lora does "
                    f"not implement (supported: {off!r})"
                )
        targets = data.get("target_modules")
        if targets is None:
            raise LoraConfigError(
                "adapter_config.json: target_modules is null (PEFT's per-architecture default); "
                "ds-lora needs the module names written out"
            )
        init = data.get("init_lora_weights", True)
        if init is True or init is False:
            init_name = "default"  # False only changes the (overwritten) start values
        elif init == "gaussian":
            init_name = "gaussian"
        else:
            raise LoraConfigError(
                f"adapter_config.json: init_lora_weights={init!r} is not supported "
                "(supported: true, false, 'gaussian'); methods such as PiSSA/OLoRA rewrite the "
                "base weights, which a plain adapter file cannot carry"
            )
        return cls(
            r=data.get("r", 8),
            lora_alpha=data.get("lora_alpha", 8),
            target_modules=targets,
            lora_dropout=data.get("lora_dropout", 0.0),
            bias=data.get("bias", "none"),
            use_rslora=data.get("use_rslora", False),
            use_dora=data.get("use_dora", False),
            modules_to_save=data.get("modules_to_save"),
            init=init_name,
        )


def _check_targets(targets: Sequence[str] | str) -> tuple[str, ...] | str:
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            return targets
        try:
            re.compile(targets)
        except re.error as exc:
            raise LoraConfigError(
                f"target_modules={targets!r} is neither 'all-linear' nor a valid regex: {exc}"
            ) from None
        return targets
    if (
        not isinstance(targets, Sequence | set | frozenset)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        raise LoraConfigError(
            "target_modules must be a non-empty list of module names, a regex string or "
            f"'all-linear', got target_modules={targets!r}"
        )
    return tuple(targets)
