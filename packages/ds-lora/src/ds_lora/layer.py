"""``LoraLinear``: a LoRA/DoRA wrapper around one ``LinearLike`` layer, put in its place.

Module names follow PEFT (``base_layer``, ``lora_A.<adapter>``, ``lora_B.<adapter>``,
``lora_dropout.<adapter>``, ``lora_magnitude_vector.<adapter>``), so parameter names and
checkpoint keys are the same in both libraries.

Shapes: ``x`` is ``(..., in_features)``; ``lora_A.weight`` ``(r, in_features)``;
``lora_B.weight`` ``(out_features, r)``; output ``(..., out_features)``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ds_lora.base import base_weight, call_base, device_of, is_quantized, rebuild_quantized
from ds_lora.config import LoraConfig
from ds_lora.dora import DoraMagnitude, dora_delta, weight_row_norm
from ds_lora.errors import AdapterNotFoundError, AdapterStateError, QuantizedMergeWarning
from ds_lora.lora_fn import lora_delta
from ds_lora.mixed import (
    RowPlan,
    StackedAdapters,
    mixed_lora_forward,
    plan_rows,
    stack_adapters,
)


class LoraLinear(nn.Module):
    """LoRA adapters around ``base_layer``: ``y = base(x) + s * B(A(dropout(x)))`` for the
    active adapter (DoRA: see ``ds_lora.dora``). Several named adapters can live side by side;
    one is active at a time, or each batch row picks its own (``set_row_adapters``)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapters: list[str] = []
        self._merge_norms: dict[str, torch.Tensor] = {}
        self._base_generation = 0
        self._row_index: torch.Tensor | None = None
        self._row_names: tuple[str, ...] = ()
        self._row_plan: RowPlan | None = None
        self._stack_cache: tuple[tuple, StackedAdapters, list[torch.Tensor]] | None = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        """Create adapter ``name`` so that it starts as a no-op (B = 0)."""
        if name in self.lora_A:
            raise AdapterStateError(f"adapter {name!r} already exists on this layer")
        device = device_of(self.base_layer)
        weight = getattr(self.base_layer, "weight", None)
        quantized = is_quantized(self.base_layer)
        dtype = (
            weight.dtype
            if not quantized and isinstance(weight, torch.Tensor) and weight.is_floating_point()
            else torch.float32
        )
        r = config.r
        # nn.Linear's own init is PEFT's default for A: kaiming_uniform_(a=sqrt(5)).
        lora_a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        if config.init == "gaussian":
            nn.init.normal_(lora_a.weight, std=1.0 / r)
        # B starts at zero; skip the random init it would get and overwrite.
        lora_b = nn.Linear(r, self.out_features, bias=False, device="meta", dtype=dtype)
        lora_b = lora_b.to_empty(device=device)
        nn.init.zeros_(lora_b.weight)
        self.lora_A[name] = lora_a
        self.lora_B[name] = lora_b
        self.lora_dropout[name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.scaling[name] = config.scaling
        if config.use_dora:
            with torch.no_grad():
                norm = torch.linalg.vector_norm(base_weight(self.base_layer).to(dtype), dim=1)
            self.lora_magnitude_vector[name] = DoraMagnitude(norm.detach().clone())
        self._stack_cache = None

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is merged; unmerge before deleting it")
        for table in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in table:
                del table[name]
        self.scaling.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None
        self._stack_cache = None

    def _require(self, name: str) -> None:
        if name not in self.lora_A:
            raise AdapterNotFoundError(
                f"adapter {name!r} is not on this layer; it has {self.adapter_names}"
            )

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B @ A``: (out_features, in_features), in float32 (merging precision)."""
        self._require(name)
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        return (b @ a) * self.scaling[name]

    # --- forward -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = call_base(self.base_layer, x, *args, **kwargs)
        if self._row_index is not None:
            return self._mixed_forward(x, result)
        name = self.active_adapter
        if self.disabled or name is None or name in self.merged_adapters or name not in self.lora_A:
            return result
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        scaling = self.scaling[name]
        if name not in self.lora_magnitude_vector:
            # x goes in as it is (no per-layer copy); lora_delta picks the compute dtype,
            # autocast's under autocast, and saves x itself for the backward.
            delta = lora_delta(x, lora_a.weight, lora_b.weight, scaling, dropout)
            return result + delta.to(result.dtype)
        x_lora = x.to(lora_a.weight.dtype)
        weight = base_weight(self.base_layer).to(lora_a.weight.dtype)
        with torch.no_grad():
            norm = weight_row_norm(weight, lora_b.weight @ lora_a.weight, scaling)
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result = result.to(x_lora.dtype)
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base_result = base_result - bias.to(base_result.dtype)
        else:  # PEFT's choice: under dropout, the base term sees the dropped input too
            x_lora = dropout(x_lora)
            base_result = nn.functional.linear(x_lora, weight)
        lora_result = lora_b(lora_a(x_lora))
        magnitude = self.lora_magnitude_vector[name].weight
        delta = dora_delta(base_result, lora_result, magnitude, norm, scaling)
        return result + delta.to(result.dtype)

    # --- mixed-adapter batches -----------------------------------------------------------

    def row_adapters_state(self) -> tuple[tuple[str, ...], torch.Tensor | None, RowPlan | None]:
        """The arguments of the last ``set_row_adapters`` call (to restore it later)."""
        return self._row_names, self._row_index, self._row_plan

    def set_row_adapters(
        self,
        names: tuple[str, ...],
        row_index: torch.Tensor | None,
        plan: RowPlan | None = None,
    ) -> None:
        """Serve one batch with a different adapter per row.

        ``names``: the adapter vocabulary; ``row_index``: (batch,) int64, ``row_index[i]`` in
        ``[0, len(names)]`` picks ``names[row_index[i]]`` for row ``i`` and ``len(names)``
        means no adapter. Adapters of ``names`` absent from this layer act as no adapter here.
        ``None`` switches back to the single active adapter. ``plan``: the rows grouped by
        adapter (``ds_lora.mixed.plan_rows``); ``adapter_batch`` builds it once for all
        layers, and it is built here when not given.
        """
        if row_index is not None and self.merged_adapters:
            raise AdapterStateError(
                f"cannot serve a mixed-adapter batch while {self.merged_adapters} are merged "
                "into the base weight; unmerge first"
            )
        if row_index is not None and plan is None:
            plan = plan_rows(row_index, len(names))
        self._row_names = tuple(names)
        self._row_index = row_index
        self._row_plan = plan if row_index is not None else None

    def _stack_key(self) -> tuple[tuple, list[torch.Tensor]]:
        """What the stacked adapters depend on, as a tuple of plain values (compared in C),
        plus the tensors it names by ``id`` (the cache holds them, so no id is reused)."""
        # This runs in every mixed forward of every layer, so it reads the parameter dicts
        # directly instead of going through nn.Module.__getattr__.
        names = self._row_names
        a_modules = self.lora_A._modules
        b_modules = self.lora_B._modules
        magnitudes = self.lora_magnitude_vector._modules
        key: list = [names, self._base_generation]
        tensors: list[torch.Tensor] = []
        for name in names:
            a_module = a_modules.get(name)
            if a_module is None:
                continue
            key += (name, self.scaling[name])
            tensors += (a_module._parameters["weight"], b_modules[name]._parameters["weight"])
            magnitude = magnitudes.get(name)
            if magnitude is not None:
                tensors.append(magnitude._parameters["weight"])
                if not is_quantized(self.base_layer):
                    tensors.append(self.base_layer.weight)
        for t in tensors:
            key += (id(t), t.data_ptr(), t._version)
        return tuple(key), tensors

    def _stacked(self) -> StackedAdapters:
        key, tensors = self._stack_key()
        cache = self._stack_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        stacked = stack_adapters(self, self._row_names)
        self._stack_cache = (key, stacked, tensors)
        return stacked

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        plan = self._row_plan
        if x.shape[0] != plan.row_index.shape[0]:
            raise ValueError(
                f"mixed-adapter batch: {plan.row_index.shape[0]} row adapters were given but "
                f"this layer's input has {x.shape[0]} rows (x.shape={tuple(x.shape)}); give one "
                "adapter per leading row of the input"
            )
        if plan.row_index.device != x.device:
            plan = plan_rows(plan.row_index.to(x.device), len(self._row_names))
            self._row_plan = plan
        bias = getattr(self.base_layer, "bias", None)
        return mixed_lora_forward(x, result, self._stacked(), plan, bias)

    # --- merging -------------------------------------------------------------------------

    def _write_weight(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        base = self.base_layer
        if not is_quantized(base):
            base.weight.data.copy_(weight.to(base.weight.dtype))
        elif callable(getattr(base, "requantize", None)):
            base.requantize(weight)
        else:
            self.base_layer = rebuild_quantized(base, weight.to(dtype))
        self._base_generation += 1
        self._stack_cache = None

    def _check_mergeable(self) -> None:
        base = self.base_layer
        if not is_quantized(base):
            base_weight(base)  # raises a clear TypeError when there is no float weight
            return
        if callable(getattr(base, "requantize", None)):
            how = "re-quantized in place through requantize(weight)"
        elif callable(getattr(type(base), "from_float", None)) and hasattr(base, "config"):
            how = (
                f"re-quantized into a new {type(base).__name__} through from_float(linear, "
                "config) (state beyond the config, such as calibration scales, is not kept)"
            )
        else:
            raise TypeError(
                f"cannot merge into {type(base).__name__}: a quantized base must offer "
                "requantize(weight), or a from_float(linear, config) classmethod and a "
                "config attribute, to take the merged weight (see ds_lora.Requantizable)"
            )
        warnings.warn(
            f"merging LoRA into quantized {type(base).__name__}: the weight is dequantized, "
            f"updated and {how}, so the result differs from base + adapter by the "
            "quantization error",
            QuantizedMergeWarning,
            stacklevel=4,
        )

    def merge(self, names: list[str]) -> None:
        """Fold adapters into the base weight (in order); already merged ones are skipped."""
        todo = [n for n in names if n in self.lora_A and n not in self.merged_adapters]
        if not todo:
            return
        self._check_mergeable()
        with torch.no_grad():
            original = base_weight(self.base_layer)
            weight = original.float()
            for name in todo:
                updated = weight + self.delta_weight(name)
                if name in self.lora_magnitude_vector:
                    norm = torch.linalg.vector_norm(updated, dim=1)
                    magnitude = self.lora_magnitude_vector[name].weight.float()
                    self._merge_norms[name] = norm
                    updated = (magnitude / norm).unsqueeze(1) * updated
                weight = updated
                self.merged_adapters.append(name)
            self._write_weight(weight, original.dtype)

    def unmerge(self) -> None:
        """Undo every merge, newest first; exact up to float rounding on a float base."""
        if not self.merged_adapters:
            return
        self._check_mergeable()
        with torch.no_grad():
            original = base_weight(self.base_layer)
            weight = original.float()
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name in self.lora_magnitude_vector:
                    norm = self._merge_norms.pop(name)
                    magnitude = self.lora_magnitude_vector[name].weight.float()
                    weight = weight / (magnitude / norm).unsqueeze(1)
                weight = weight - self.delta_weight(name)
            self._write_weight(weight, original.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters={self.adapter_names}, active={self.active_adapter!r}, "
            f"merged={self.merged_adapters}"
        )
