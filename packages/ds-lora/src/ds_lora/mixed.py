"""Mixed-adapter batches (S-LoRA / Punica's BGMV, in plain torch): every row of a batch
names its own adapter, and one forward serves them all with two gathered batched matmuls
instead of one forward per adapter.

Adapters of different rank are zero-padded to the largest rank (the zero rows and columns
add nothing), and one all-zero slot at index ``n`` stands for "no adapter", so rows
without an adapter need no masking.

Two ways to compute the same delta, picked per layer call by ``mixed_lora_forward``:

- gathered (Punica's BGMV): gather A and B once per row and run two ``bmm``. It
  materializes ``rows × r × (in + out)`` weight values, which is cheap when each row has
  many tokens or the batch is small.
- grouped (Punica/S-LoRA's SGMV): a loop over the distinct adapters of the batch (never
  over rows): each takes its rows with one ``index_select``, runs two plain matmuls and
  adds its result back with ``index_add``. No weight is copied per row, which is what
  packed ``(tokens, hidden)`` inputs (one row per token) and large batches need.
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
    multiplied by each adapter's scaling (both are transposed views of contiguous
    ``(n + 1, in, r_max)`` and ``(n + 1, r_max, out)`` storage); ``dora_scale``: (n + 1, out_features), DoRA's
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
    # Stored transposed, so that the matmuls read ``a.transpose(1, 2)`` (n + 1, in, r_max)
    # and ``b.transpose(1, 2)`` (n + 1, r_max, out) contiguously.
    a = torch.zeros(n + 1, layer.in_features, r_max, dtype=dtype, device=device).transpose(1, 2)
    b = torch.zeros(n + 1, r_max, layer.out_features, dtype=dtype, device=device).transpose(1, 2)
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


@dataclass(frozen=True)
class RowPlan:
    """How the rows of one mixed batch group by adapter, worked out once per batch (on the
    host) and shared by every layer.

    ``row_index``: (rows,) int64 slots, ``len(names)`` meaning no adapter;
    ``groups``: for each distinct adapter slot present, ``(slot, rows)`` with ``rows`` an
    int64 tensor of the row positions that use it (rows without an adapter are in no group);
    ``max_group``: the size of the largest group (1 when every row has its own adapter);
    ``slot_range``: ``(start, stop)`` when row ``i`` uses slot ``start + i`` (rows in slot
    order, one per adapter), so the gathered path can slice the stacks instead of copying.
    """

    row_index: torch.Tensor
    groups: tuple[tuple[int, torch.Tensor], ...]
    max_group: int
    slot_range: tuple[int, int] | None = None


def plan_rows(row_index: torch.Tensor, no_adapter_slot: int) -> RowPlan:
    """Group ``row_index`` (rows,) by slot; ``no_adapter_slot`` rows join no group."""
    # Tensor ops, not a loop over rows: a paged runner plans one row per cached context
    # token (tens of thousands) for MLA's kv_b_proj every step.
    host = row_index.cpu()
    num = host.numel()
    counts = torch.bincount(host, minlength=no_adapter_slot + 1).tolist()
    order = torch.argsort(host, stable=True).to(row_index.device)  # rows grouped by slot
    groups, start = [], 0
    for slot, count in enumerate(counts):
        if count and slot != no_adapter_slot:
            groups.append((slot, order[start : start + count]))
        start += count
    first = int(host[0]) if num else 0
    consecutive = num > 0 and bool(torch.equal(host, torch.arange(first, first + num)))
    return RowPlan(
        row_index=row_index,
        groups=tuple(groups),
        max_group=max((len(rows) for _, rows in groups), default=0),
        slot_range=(first, first + num) if consecutive else None,
    )


# The gathered path copies rows × r_max × (in + out) weight values per layer call; above this
# many (1 MiB of float32) and with rows sharing adapters, the grouped path was faster in
# bench_mixed_packed.py on CPU (32 packed tokens at 1024 wide: 5.7 ms against 11.8 ms).
GATHER_LIMIT = 1 << 18


def choose_strategy(x: torch.Tensor, stacked: StackedAdapters, plan: RowPlan) -> str:
    """``"gathered"`` or ``"grouped"`` for this layer call (see the module docstring)."""
    if stacked.dora_scale is not None or plan.max_group <= 1:
        return "gathered"  # DoRA needs the per-row scale; one row per adapter: same copies
    rows = x.shape[0]
    r_max, in_features = stacked.a.shape[1:]
    gathered = rows * r_max * (in_features + stacked.b_scaled.shape[1])
    return "grouped" if gathered > GATHER_LIMIT else "gathered"


def mixed_lora_forward(
    x: torch.Tensor,
    base_result: torch.Tensor,
    stacked: StackedAdapters,
    plan: RowPlan,
    bias: torch.Tensor | None,
    strategy: str | None = None,
) -> torch.Tensor:
    """``base_result`` plus each row's adapter delta: the output of a wrapped layer.

    x: (rows, ..., in_features); base_result: (rows, ..., out_features), bias included;
    returns base_result's shape and dtype. ``strategy``: ``"gathered"``, ``"grouped"`` or
    ``None`` (``choose_strategy`` decides). Both give the same values up to float rounding.
    """
    if strategy is None:
        strategy = choose_strategy(x, stacked, plan)
    if strategy not in ("gathered", "grouped"):
        raise ValueError(f"strategy={strategy!r}; expected 'gathered', 'grouped' or None")
    if strategy == "grouped" and stacked.dora_scale is not None:
        raise ValueError("strategy='grouped' does not apply DoRA's per-row scale; use 'gathered'")
    rows = x.shape[0]
    dtype = stacked.a.dtype
    if strategy == "gathered":
        delta = mixed_lora_delta(x, base_result, stacked, plan.row_index, bias, plan.slot_range)
        return base_result + delta.to(base_result.dtype)
    out = base_result
    flat_x = x.reshape(rows, -1, x.shape[-1])
    for i, (slot, members) in enumerate(plan.groups):
        picked = flat_x.index_select(0, members).to(dtype)  # (group rows, tokens, in)
        delta = (picked @ stacked.a[slot].T) @ stacked.b_scaled[slot].T
        delta = delta.reshape(members.shape[0], *base_result.shape[1:]).to(base_result.dtype)
        # The first group copies the base output once; the rest add into that copy.
        out = out.index_add(0, members, delta) if i == 0 else out.index_add_(0, members, delta)
    return out


def mixed_lora_delta(
    x: torch.Tensor,
    base_result: torch.Tensor,
    stacked: StackedAdapters,
    row_index: torch.Tensor,
    bias: torch.Tensor | None,
    slot_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """What the adapters add to the base output, row by row, in two gathered bmm's.

    x: (batch, ..., in_features); base_result: (batch, ..., out_features), the base layer's
    output (bias included); row_index: (batch,) int64 slots into ``stacked``; bias: the base
    layer's bias (out_features,) or ``None``. Returns (batch, ..., out_features) in the
    adapters' dtype. No dropout: this is the serving path. ``slot_range``: ``(start, stop)``
    when ``row_index`` is ``arange(start, stop)``; the stacks are then sliced, not gathered.
    """
    batch = x.shape[0]
    a_t = stacked.a.transpose(1, 2)  # (n + 1, in, r_max), contiguous when stack_adapters made it
    b_t = stacked.b_scaled.transpose(1, 2)  # (n + 1, r_max, out)
    if slot_range is not None:
        a_t, b_t = a_t[slice(*slot_range)], b_t[slice(*slot_range)]
    else:
        a_t, b_t = a_t.index_select(0, row_index), b_t.index_select(0, row_index)
    rows = x.reshape(batch, -1, x.shape[-1]).to(a_t.dtype)  # (batch, tokens, in)
    delta = torch.bmm(torch.bmm(rows, a_t), b_t)
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
