"""Mixed-adapter batches (S-LoRA / Punica's BGMV, in plain torch): every row of a batch
names its own adapter, and one forward serves them all with two gathered batched matmuls
instead of one forward per adapter.

Adapters of different rank are zero-padded to the largest rank (the zero rows and columns
add nothing), and one all-zero slot at index ``n`` stands for "no adapter", so rows
without an adapter need no masking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ds_lora.base import base_weight

if TYPE_CHECKING:
    from ds_lora.layer import LoraLinear


@dataclass(frozen=True)
class StackedAdapters:
    """The adapters of one layer, stacked for gathering.

    ``a``: (n + 1, r_max, in_features); ``b_scaled``: (n + 1, out_features, r_max), already
    multiplied by each adapter's scaling; ``dora_scale``: (n + 1, out_features), DoRA's
    ``m / ||W + s B A||`` (1 for plain LoRA and for the empty slot), or ``None`` when no
    adapter in the stack uses DoRA. Slot ``n`` is all zeros: no adapter.
    """

    a: torch.Tensor
    b_scaled: torch.Tensor
    dora_scale: torch.Tensor | None


def stack_adapters(layer: LoraLinear, names: tuple[str, ...]) -> StackedAdapters:
    """Stack ``layer``'s adapters in the order of ``names`` (absent ones become zeros)."""
    present = [n for n in names if n in layer.lora_A]
    ref = layer.lora_A[present[0]].weight if present else None
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    r_max = max((layer.lora_A[n].weight.shape[0] for n in present), default=1)
    n = len(names)
    a = torch.zeros(n + 1, r_max, layer.in_features, dtype=dtype, device=device)
    b = torch.zeros(n + 1, layer.out_features, r_max, dtype=dtype, device=device)
    dora = None
    if any(name in layer.lora_magnitude_vector for name in present):
        dora = torch.ones(n + 1, layer.out_features, dtype=dtype, device=device)
    weight = None
    with torch.no_grad():
        for slot, name in enumerate(names):
            if name not in layer.lora_A:
                continue
            wa = layer.lora_A[name].weight
            wb = layer.lora_B[name].weight
            r = wa.shape[0]
            a[slot, :r] = wa
            b[slot, :, :r] = wb * layer.scaling[name]
            if name in layer.lora_magnitude_vector:
                if weight is None:
                    weight = base_weight(layer.base_layer).to(dtype)
                norm = torch.linalg.vector_norm(weight + layer.scaling[name] * (wb @ wa), dim=1)
                dora[slot] = layer.lora_magnitude_vector[name].weight / norm
    return StackedAdapters(a=a, b_scaled=b, dora_scale=dora)


def mixed_lora_delta(
    x: torch.Tensor,
    base_result: torch.Tensor,
    stacked: StackedAdapters,
    row_index: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """What the adapters add to the base output, row by row, in two gathered bmm's.

    x: (batch, ..., in_features); base_result: (batch, ..., out_features), the base layer's
    output (bias included); row_index: (batch,) int64 slots into ``stacked``; bias: the base
    layer's bias (out_features,) or ``None``. Returns (batch, ..., out_features) in the
    adapters' dtype. No dropout: this is the serving path.
    """
    batch = x.shape[0]
    a = stacked.a.index_select(0, row_index)  # (batch, r_max, in)
    b = stacked.b_scaled.index_select(0, row_index)  # (batch, out, r_max)
    rows = x.reshape(batch, -1, x.shape[-1]).to(a.dtype)  # (batch, tokens, in)
    delta = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2))
    if stacked.dora_scale is not None:
        scale = stacked.dora_scale.index_select(0, row_index).unsqueeze(1)  # (batch, 1, out)
        base = base_result.reshape(batch, -1, base_result.shape[-1]).to(delta.dtype)
        if bias is not None:
            base = base - bias.to(delta.dtype)
        delta = (scale - 1) * base + scale * delta
    return delta.reshape(*base_result.shape[:-1], delta.shape[-1])


def mixed_lora_delta_reference(
    x: torch.Tensor,
    base_result: torch.Tensor,
    stacked: StackedAdapters,
    row_index: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The same as ``mixed_lora_delta`` one row at a time: the ground truth tests compare to."""
    out = []
    for i in range(x.shape[0]):
        slot = int(row_index[i])
        xi = x[i].reshape(-1, x.shape[-1]).to(stacked.a.dtype)
        d = (xi @ stacked.a[slot].T) @ stacked.b_scaled[slot].T
        if stacked.dora_scale is not None:
            s = stacked.dora_scale[slot]
            base = base_result[i].reshape(-1, base_result.shape[-1]).to(d.dtype)
            if bias is not None:
                base = base - bias.to(d.dtype)
            d = (s - 1) * base + s * d
        out.append(d.reshape(*base_result.shape[1:-1], d.shape[-1]))
    return torch.stack(out)
