"""The stable interface of ds-lora: what a layer must offer to carry an adapter.

``LinearLike`` is what LoRA wraps. A float layer (``nn.Linear``) exposes its weight as
``.weight``; a quantized layer instead offers ``dequantize()`` (``QuantizedLinearLike``),
and if it also offers ``requantize(weight)`` (``Requantizable``) adapters can be merged into
it. ds-quant's quantized linear satisfies these structurally, without importing ds-lora.

``MixedAdapterLayer`` is the other direction: what a LoRA layer offers for batches in
which each row has its own adapter. ``LoraLinear`` implements it; ``adapter_batch`` and
``adapter_rows`` drive it, and a model uses those two rather than the methods.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class LinearLike(Protocol):
    """Anything LoRA can wrap: ``nn.Linear`` and any quantized linear that offers
    ``dequantize()`` (ds-quant's ``QuantizedLinear`` does, without importing ds-lora).

    ``x``: (..., in_features) -> (..., out_features).
    """

    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class QuantizedLinearLike(LinearLike, Protocol):
    """A linear layer whose weight is stored in some non-float form.

    ``dequantize()`` returns the weight as a float tensor of shape
    ``(out_features, in_features)`` on the layer's device. ds-lora calls it for DoRA's weight
    norm and for merging; the forward pass only calls the layer itself. An optional ``bias``
    attribute (a tensor of shape ``(out_features,)`` or ``None``) is honoured when present.
    """

    def dequantize(self) -> torch.Tensor: ...


@runtime_checkable
class Requantizable(QuantizedLinearLike, Protocol):
    """A quantized linear that can take a new float weight: the hook merging uses.

    ``requantize(weight)`` receives a float tensor of shape ``(out_features, in_features)``
    and replaces the layer's stored quantized weight in place, keeping its own format
    (bit width, group size, scales dtype, device). Afterwards ``dequantize()`` returns the
    quantization of ``weight`` and the layer's forward uses it. It returns nothing.
    Without this method ds-lora falls back to a ``from_float(linear, config)`` classmethod
    plus a ``config`` attribute (ds-quant's ``QuantizedLinear`` offers these): it builds a
    new layer from an ``nn.Linear`` holding the merged weight and puts it in place of the
    old one; anything the config does not describe (e.g. calibration scales) is lost.
    With neither, ``merge`` on a quantized base raises ``TypeError``.
    """

    def requantize(self, weight: torch.Tensor) -> None: ...


@runtime_checkable
class MixedAdapterLayer(Protocol):
    """A layer that serves a batch whose rows use different adapters.

    ``set_row_adapters(names, row_index, plan=None)``: ``names`` is the adapter
    vocabulary and ``row_index`` a (rows,) int64 tensor, ``row_index[i]`` in
    ``[0, len(names)]`` picking ``names[row_index[i]]`` for row ``i`` of the layer's
    input (``len(names)``: no adapter); ``row_index=None`` goes back to the single
    active adapter. ``plan``: the rows grouped by adapter, built when not given.
    ``row_adapters_state()`` returns the last call's ``(names, row_index, plan)``, so a
    caller can restore it.
    """

    def row_adapters_state(self) -> tuple[tuple[str, ...], torch.Tensor | None, Any]: ...

    def set_row_adapters(
        self, names: tuple[str, ...], row_index: torch.Tensor | None, plan: Any = None
    ) -> None: ...
