"""One token's routed experts as products over stacked weights, for compiled CPU steps.

A batch-1 decode step reads its k routed experts' weights once. Run as the eager loop
inside the compiled graph (``ds_model::routed_experts``), each expert costs one-row
matmuls and about 100 us of Python per layer: 40% of the compiled 110M V3 step at batch
1 (bf16 and INT8, ``torch.profiler``). Here the experts' weights are stacked per layer,
gate/up (experts, 2 * intermediate, hidden) and down (experts, hidden, intermediate),
and the token's k experts are indexed inside multiply-and-sum products accumulated in
float32 (as ``ds_model.matvec`` does for dense layers): inductor reads the chosen
experts' bytes in place, with no copy and no host read of the routing. INT8 / INT4
experts run ds-quant's CPU decode kernel instead where it is built
(``ds_quant.kernels.experts_gemv``: the chosen experts' stored bytes, read in place).

``Stacked`` holds one such weight with what dequantizes it: nothing (float weights),
per-output-channel scales (ds-quant INT8 weight-only), or per-group scales and zero
points over two 4-bit values per byte (ds-quant INT4 weight-only, W = (q - zero) *
scale). ``stack_quantized`` re-lays ds-quant INT8 / INT4 experts' buffers as views of
stacked ones (values, names and state-dict entries unchanged, no memory added);
``RoutedExperts.stack_weights`` does the same for float weights.
"""

from __future__ import annotations

from typing import NamedTuple

import ds_quant
import torch
import torch.nn.functional as F
from ds_quant.kernels import experts_gemv, experts_gemv_takes
from torch import nn

from ds_model.matvec import stored

__all__ = ["Stacked", "one_token_experts", "quantized_expert_layers", "stack_quantized"]

QUANTIZED_TYPES = (ds_quant.Int8WeightOnlyLinear, ds_quant.Int4WeightOnlyLinear)


class Stacked(NamedTuple):
    """One stacked weight (experts, out, in) or, INT4, (experts, out, in // 2) uint8; its
    scales (experts, out) INT8 or (experts, out, groups) INT4; INT4's zero points."""

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    group_size: int = 0


def quantized_expert_layers(experts: nn.ModuleList) -> list[tuple[nn.Module, ...]] | None:
    """Every expert's (gate, up, down) if all are bias-free, unhooked CPU ds-quant INT8 or
    INT4 weight-only layers of one type on their default kernels, gate and up of one
    shape and every expert alike (INT4: one group size, whole groups, no activation
    scales), else None."""
    layers = [(e.gate_proj, e.up_proj, e.down_proj) for e in experts]
    if not layers:
        return None
    kind = type(layers[0][0])
    if kind not in QUANTIZED_TYPES:
        return None
    gate_shape, down_shape = _shape(layers[0][0]), _shape(layers[0][2])
    for expert, triple in zip(experts, layers):
        for module in (expert, *triple):
            if module._forward_hooks or module._forward_pre_hooks:
                return None
        for layer, shape in zip(triple, (gate_shape, gate_shape, down_shape)):
            if not (
                type(layer) is kind
                and _shape(layer) == shape
                and layer.bias is None
                and layer.backend == "auto"
                and getattr(layer, "input_scale", None) is None
                and layer.weight.device.type == "cpu"
            ):
                return None
    if kind is ds_quant.Int4WeightOnlyLinear and any(
        shape[0] % shape[2] for shape in (gate_shape, down_shape)
    ):
        return None
    return layers


def _shape(layer: nn.Module) -> tuple[int, int, int]:
    """(in_features, out_features, INT4 group size or 0)."""
    group = layer.config.group_size if type(layer) is ds_quant.Int4WeightOnlyLinear else 0
    return layer.in_features, layer.out_features, group


def _buffers(layer: nn.Module) -> tuple[torch.Tensor, ...]:
    if type(layer) is ds_quant.Int8WeightOnlyLinear:
        return layer.weight, layer.weight_scale
    return layer.weight, layer.weight_scale, layer.weight_zero


def layer_tensors(layers) -> tuple[torch.Tensor, ...]:
    return tuple(t for triple in layers for layer in triple for t in _buffers(layer))


def stack_quantized(layers) -> tuple[Stacked, Stacked] | None:
    """Re-lay the experts' quantized buffers as views of stacked gate/up and down
    buffers; returns them, or None (nothing changed) where a view would start at an
    address the eager INT8 kernel refuses (64-byte alignment)."""
    gate0, _, down0 = layers[0]
    int4 = type(gate0) is ds_quant.Int4WeightOnlyLinear
    inter = gate0.out_features
    if not int4 and (inter * gate0.in_features) % 64:
        return None
    names = ("weight", "weight_scale", "weight_zero") if int4 else ("weight", "weight_scale")
    with torch.inference_mode(False), torch.no_grad():
        gate_up = [
            torch.stack([torch.cat((getattr(g, n), getattr(u, n))) for g, u, _ in layers])
            for n in names
        ]
        down = [torch.stack([getattr(d, n) for _, _, d in layers]) for n in names]
    for e, (gate, up, d) in enumerate(layers):
        for n, g_u, dn in zip(names, gate_up, down):
            setattr(gate, n, g_u[e, :inter])
            setattr(up, n, g_u[e, inter:])
            setattr(d, n, dn[e])
    if int4:
        for layer in (layer for triple in layers for layer in triple):
            # The layer's CPU op layout is keyed on its buffers' addresses: rebuilt here,
            # not on the first decode step that meets the expert.
            layer.prepack()
    return (
        Stacked(*gate_up, group_size=_shape(gate0)[2]),
        Stacked(*down, group_size=_shape(down0)[2]),
    )


def _products(row: torch.Tensor, stacked: Stacked, chosen: torch.Tensor) -> torch.Tensor:
    """(k, in) float32 rows (or (1, in), shared) by the chosen experts' weights -> (k, out)
    float32."""
    if stacked.scale is not None and experts_gemv_takes(row, stacked.weight, stacked.group_size):
        # ds-quant's CPU decode kernel on the chosen experts' stored bytes. With it (here
        # and in the dense layers) whole compiled 110M V3 INT4 steps ran at 2.60-2.72x
        # fp32's, without it (these loops) at 2.28-2.36x; INT8 2.24-2.71x against
        # 2.53-2.56x (DS_QUANT_CPU_GEMV=1 / 0 alternating, docs/benchmarks.md).
        return experts_gemv(
            row, stacked.weight, stacked.scale, stacked.zero, chosen, stacked.group_size
        )
    w = stacked.weight[chosen]
    if stacked.zero is None:
        y = (row[:, None, :] * w.float()).sum(-1)
        return y if stacked.scale is None else y * stacked.scale[chosen]
    # INT4: sum over a group of (q - zero) * scale * x = scale * (sum q x - zero * sum x).
    k, out, half = w.shape
    groups = 2 * half // stacked.group_size
    x = row.view(row.shape[0], 1, groups, stacked.group_size)
    q = w.view(k, out, groups, stacked.group_size // 2).to(torch.int32)
    # Byte j holds values 2j (low nibble) and 2j + 1 (high): ds_quant.pack_int4.
    dot = ((q & 15).float() * x[..., 0::2] + (q >> 4).float() * x[..., 1::2]).sum(-1)
    return (stacked.scale[chosen] * (dot - stacked.zero[chosen] * x.sum(-1))).sum(-1)


def one_token_experts(
    x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up: Stacked, down: Stacked
) -> torch.Tensor:
    """The routed sum for one token ``x`` (1, hidden): its k experts (``idx`` (1, k),
    ``weights`` (1, k)) over the stacked weights. Results are rounded to ``x.dtype``
    where the eager experts round them."""
    chosen = idx[0]
    row = stored(x.float())  # (1, hidden)
    gate, up = _products(row, gate_up, chosen).to(x.dtype).chunk(2, -1)
    act = stored((F.silu(gate) * up).float())  # (k, intermediate)
    y = _products(act, down, chosen).to(x.dtype)  # (k, hidden)
    return (y * weights[0, :, None].to(x.dtype)).sum(0, keepdim=True)
