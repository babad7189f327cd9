"""Hand-written backward passes for the blocks that hold most of training's activations.

Autograd saves every intermediate an op needs: an RMSNorm keeps its normalised input
beside its input, a SwiGLU MLP keeps ``gate``, ``silu(gate)``, ``up`` and their
product, and the routed-expert loop keeps each expert's gathered input rows, its
output and the weighted output too (``index_add``'s backward saves its source only to
read its shape). The functions here save the inputs alone and recompute the cheap
element-wise parts in backward, as torch.compile's partitioner does:

- ``rms_norm``: saves ``x`` and the per-row ``1 / rms``.
- ``swiglu``: saves ``gate(x)`` and ``up(x)`` besides ``x`` (shared with its other
  uses, except under autocast, where it is the bf16/fp16 copy the matmuls read).
- ``routed_experts``: saves each (token, expert) pair's ``gate`` and ``up`` rows and
  the sort order; inputs are re-gathered from ``x`` in backward. ``grouped_experts``
  is its form for torch.compile (two grouped matmuls, no data-dependent Python); it
  stacks the experts' weights inside, so the copies are not saved either.

Forward outputs are bit-identical to the module code they replace, which still runs
wherever these do not apply: no gradient needed, wrapped or hooked layers (LoRA,
quantized, observed), DTensor weights. Under torch.compile they are traced like any
autograd.Function, so the compiled graph saves what they save; ``routed_experts``, whose
loop reads the routing on the host, runs eagerly between graphs. Under autocast the
matrix multiplies take the autocast dtype, as ``F.linear`` would. The saving in
activation memory and the step time with and without are in docs/benchmarks.md.

They are used by the modules ``enable(model)`` marks (the Trainer does, unless
``TrainingConfig.lean_backward=False``); an unmarked model trains through autograd's
graph of the module code (same results within float rounding).

Tensor layouts: ``x`` (..., hidden); weights as ``nn.Linear`` stores them,
(out_features, in_features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "applies",
    "enable",
    "grouped_experts",
    "matmul_dtype",
    "rms_norm",
    "routed_experts",
    "row_bucket",
    "swiglu",
]


def enable(model: torch.nn.Module, on: bool = True) -> int:
    """Mark (or, ``on=False``, unmark) every RMSNorm, SwiGLU MLP and routed-expert block
    of ``model`` to train through the functions here; returns how many it set."""
    from ds_model.mlp import MLP
    from ds_model.moe import RoutedExperts
    from ds_model.norm import RMSNorm

    count = 0
    for module in model.modules():
        if isinstance(module, (MLP, RMSNorm, RoutedExperts)):
            module.lean_backward = on
            count += 1
    return count


def applies(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether the hand-written backward can run: a gradient is needed, and every tensor
    is a plain tensor (not a DTensor or other subclass, whose sharding the hand-written
    ops do not know)."""
    if not torch.is_grad_enabled():
        return False
    if not (x.requires_grad or any(t.requires_grad for t in tensors)):
        return False
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in (x, *tensors))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)`` over the last dim, computed in fp32 and cast back to
    ``x.dtype`` (the product with ``weight`` then in the promoted dtype), as
    ``ds_model.norm.RMSNorm`` does."""
    return _RMSNorm.apply(x, weight, eps)


def swiglu(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """``F.linear(silu(F.linear(x, gate)) * F.linear(x, up), down)``, bias-free."""
    x, weights = _autocast_inputs(x, (gate, up, down))
    with _no_autocast(x):
        return _SwiGLU.apply(x, *weights)


def routed_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    idx: torch.Tensor,
    experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Each token's ``k`` experts, weighted: ``x`` (tokens, hidden), ``weights``
    (tokens, k) routing weights, ``idx`` (tokens, k) expert ids, ``experts`` one
    (gate, up, down) weight triple per expert -> (tokens, hidden). Tokens are grouped
    by expert and each hit expert runs once on its rows (``RoutedExperts._looped``'s
    arithmetic)."""
    flat = [w for triple in experts for w in triple]
    mm_dtype = _autocast_dtype(x)  # read before autocast is switched off below
    with _no_autocast(x):
        return _RoutedExperts.apply(x, weights, idx, mm_dtype, *flat)


def grouped_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    idx: torch.Tensor,
    experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """``routed_experts`` with no data-dependent Python, for torch.compile: tokens sorted
    by expert and two grouped matmuls (``F.grouped_mm``) over the experts' weights,
    stacked inside the function (and again in backward) rather than saved."""
    flat = [w for triple in experts for w in triple]
    mm_dtype = _autocast_dtype(x)  # read before autocast is switched off below
    with _no_autocast(x):
        return _GroupedExperts.apply(x, weights, idx, mm_dtype, *flat)


# ------------------------------------------------------------------ autograd functions


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return h * rstd * weight  # F.rms_norm's order of operations
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        h = x.float()
        normed = h * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            if x.dtype == weight.dtype == torch.float32:
                per_row = grad * normed
            else:
                per_row = grad * normed.to(x.dtype)
            grad_weight = per_row.reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dx = rstd * (dn - normed * mean(dn * normed)): the mean as one dot per row
            # and the rest in place, fewer passes over memory than the plain expression.
            dn = (grad * weight).float()
            dot = torch.linalg.vecdot(dn, normed).unsqueeze(-1) / x.shape[-1]
            grad_x = torch.addcmul(dn, normed, dot, value=-1).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_w, up_w, down_w):
        g, u = F.linear(x, gate_w), F.linear(x, up_w)
        ctx.save_for_backward(x, g, u, gate_w, up_w, down_w)
        return F.linear(F.silu(g) * u, down_w)

    @staticmethod
    def backward(ctx, grad):
        x, g, u, gate_w, up_w, down_w = ctx.saved_tensors
        shape = x.shape
        x, g, u = x.reshape(-1, shape[-1]), g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])
        grad = grad.reshape(-1, grad.shape[-1])
        dx, dg_w, du_w, dd_w, _, _ = _swiglu_backward(
            x, g, u, grad, (gate_w, up_w, down_w), ctx.needs_input_grad
        )
        return (dx.view(shape) if dx is not None else None), dg_w, du_w, dd_w


class _RoutedExperts(torch.autograd.Function):
    # ``mm_dtype``: the matrix multiplies' dtype (autocast's), or None for x's. The
    # weighted sum accumulates in x's dtype, as the module loop does.
    @staticmethod
    def forward(ctx, x, weights, idx, mm_dtype, *flat):
        k, mm_dtype = idx.shape[1], mm_dtype or x.dtype
        experts = [w.to(mm_dtype) for w in flat]
        pairs = idx.reshape(-1)
        order = torch.argsort(pairs, stable=True)
        counts = torch.bincount(pairs, minlength=len(flat) // 3).tolist()
        token_of = order // k
        pair_weights = weights.reshape(-1)[order].to(x.dtype)
        groups = _groups(counts, row_bucket(x, mm_dtype))
        # One buffer for every pair's gate and one for its up rows, the same size each
        # step: per-expert tensors, whose sizes change with the routing, fragmented the
        # heap (a larger peak RSS, measured training LoRA on the shipped model's shape).
        padded = groups[-1][2].stop if groups else 0
        g_all = x.new_empty(padded, flat[0].shape[0], dtype=mm_dtype)
        u_all = torch.empty_like(g_all)
        out = torch.zeros_like(x)
        for e, sl, psl in groups:
            gate_w, up_w, down_w = experts[3 * e : 3 * e + 3]
            rows = token_of[sl]
            x_rows = _gather_rows(x, rows, psl, mm_dtype)
            g, u = g_all[psl], u_all[psl]
            torch.mm(x_rows, gate_w.t(), out=g)  # F.linear's kernel, written in place
            torch.mm(x_rows, up_w.t(), out=u)
            y = F.linear(F.silu(g) * u, down_w)[: rows.numel()]
            out.index_add_(0, rows, y * pair_weights[sl, None])
        ctx.groups, ctx.mm_dtype = groups, mm_dtype
        ctx.weights_shape, ctx.weights_dtype = weights.shape, weights.dtype
        ctx.save_for_backward(x, order, token_of, pair_weights, g_all, u_all, *flat)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, order, token_of, pair_weights, g_all, u_all, *flat = ctx.saved_tensors
        mm_dtype = ctx.mm_dtype
        experts = [w.to(mm_dtype) for w in flat]
        grad = grad.contiguous()
        need_x, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_w = ctx.needs_input_grad[4:]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_pairs = torch.zeros_like(pair_weights) if need_weights else None
        grad_flat: list[torch.Tensor | None] = [None] * len(flat)
        for e, sl, psl in ctx.groups:
            rows, count = token_of[sl], sl.stop - sl.start
            needs = (need_x, *need_w[3 * e : 3 * e + 3])
            x_rows = _gather_rows(x, rows, psl, mm_dtype) if needs[1] or needs[2] else None
            w = pair_weights[sl, None].to(mm_dtype)
            if psl.stop - psl.start > count:
                w = F.pad(w, (0, 0, 0, psl.stop - psl.start - count))
            dx, *weight_grads, h, dh = _swiglu_backward(
                x_rows,
                g_all[psl],
                u_all[psl],
                _gather_rows(grad, rows, psl, mm_dtype),
                experts[3 * e : 3 * e + 3],
                needs,
                w,
            )
            grad_flat[3 * e : 3 * e + 3] = _as_dtypes(weight_grads, flat[3 * e : 3 * e + 3])
            if need_weights:
                grad_pairs[sl] = (dh[:count] * h[:count]).sum(-1)
            if need_x:
                grad_x.index_add_(0, rows, dx[:count].to(x.dtype))
        grad_flat = _idle_as_zeros(grad_flat, flat, ctx.needs_input_grad[4:])
        return (grad_x, _unsort(grad_pairs, order, ctx), None, None, *grad_flat)


def _idle_as_zeros(grads: list, flat: list[torch.Tensor], needs) -> list:
    """An expert no token chose still gets a (zero) gradient where one is wanted: a
    data-parallel rank whose tokens left it idle must reduce the same gradients as the
    other ranks (FSDP2 reduce-scatters only the parameters that have one)."""
    return [
        torch.zeros_like(w) if g is None and need else g for g, w, need in zip(grads, flat, needs)
    ]


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matrix multiplies on ``x`` run in: autocast's if it is on, else x's."""
    return _autocast_dtype(x) or x.dtype


def row_bucket(x: torch.Tensor, mm_dtype: torch.dtype | None = None) -> int:
    """``routed_experts`` pads each expert's row count to a multiple of this. On CPU,
    bf16/fp16 matrix multiplies go through oneDNN, which builds (JIT-compiles and
    caches) a kernel per new shape, so a routing that gives experts new row counts every
    step made bf16 training slower than float32 and took far more memory (figures in
    docs/benchmarks.md). Padding with zero rows bounds the shapes at a few per expert.
    ``mm_dtype``: the matmuls' dtype, ``matmul_dtype(x)`` when None."""
    if x.is_cpu and (mm_dtype or matmul_dtype(x)) in (torch.bfloat16, torch.float16):
        return 64
    return 1


def _gather_rows(src, rows, padded: slice, dtype) -> torch.Tensor:
    """``src[rows]`` in ``dtype``, with zero rows appended up to the padded length."""
    picked = src[rows].to(dtype)
    extra = padded.stop - padded.start - rows.numel()
    return F.pad(picked, (0, 0, 0, extra)) if extra else picked


class _GroupedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, idx, mm_dtype, *flat):
        k, mm_dtype = idx.shape[1], mm_dtype or x.dtype
        gate_up, down = _stacked(flat, mm_dtype)
        pairs = idx.reshape(-1)
        order = torch.argsort(pairs, stable=True)
        token_of = order // k
        counts = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
        ones = torch.ones_like(pairs, dtype=torch.int32)
        offsets = counts.scatter_add_(0, pairs.to(torch.int32), ones).cumsum(0, dtype=torch.int32)
        pair_weights = weights.reshape(-1)[order].to(x.dtype)
        x_rows = x[token_of].to(mm_dtype)
        gu = F.grouped_mm(x_rows, gate_up.transpose(1, 2), offs=offsets)
        g, u = gu.chunk(2, dim=-1)
        y = F.grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=offsets)
        out = torch.zeros_like(x).index_add_(0, token_of, y * pair_weights[:, None])
        ctx.mm_dtype = mm_dtype
        ctx.weights_shape, ctx.weights_dtype = weights.shape, weights.dtype
        ctx.save_for_backward(x, order, token_of, offsets, pair_weights, gu, *flat)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, order, token_of, offsets, pair_weights, gu, *flat = ctx.saved_tensors
        mm_dtype = ctx.mm_dtype
        gate_up, down = _stacked(flat, mm_dtype)
        inter = down.shape[2]
        g, u = gu.chunk(2, dim=-1)
        sg = F.silu(g)
        h = sg * u
        grad_rows = grad[token_of].to(mm_dtype)
        dh_plain = F.grouped_mm(grad_rows, down, offs=offsets)
        w = pair_weights[:, None].to(mm_dtype)
        dh = dh_plain * w
        dgu = torch.cat((torch.ops.aten.silu_backward(dh * u, g), dh * sg), dim=-1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            dx_rows = F.grouped_mm(dgu, gate_up, offs=offsets).to(x.dtype)
            grad_x = torch.zeros_like(x).index_add_(0, token_of, dx_rows)
        grad_pairs = (dh_plain * h).sum(-1).to(x.dtype) if ctx.needs_input_grad[1] else None
        grad_flat: list[torch.Tensor | None] = [None] * len(flat)
        if any(ctx.needs_input_grad[4:]):
            # (experts, 2 * inter, hidden) and (experts, hidden, inter): per-group x^T y.
            d_gate_up = F.grouped_mm(dgu.t(), x[token_of].to(mm_dtype), offs=offsets)
            d_down = F.grouped_mm(grad_rows.t(), h * w, offs=offsets)
            for e in range(len(flat) // 3):
                grads = (d_gate_up[e, :inter], d_gate_up[e, inter:], d_down[e])
                grad_flat[3 * e : 3 * e + 3] = _as_dtypes(grads, flat[3 * e : 3 * e + 3])
        grad_flat = _idle_as_zeros(grad_flat, flat, ctx.needs_input_grad[4:])
        return (grad_x, _unsort(grad_pairs, order, ctx), None, None, *grad_flat)


def _unsort(grad_pairs, order, ctx):
    """Per-pair gradients in expert order -> the routing weights' (tokens, k) layout."""
    if grad_pairs is None:
        return None
    out = torch.empty_like(grad_pairs)
    out[order] = grad_pairs
    return out.view(ctx.weights_shape).to(ctx.weights_dtype)


def _as_dtypes(grads, like):
    return [None if g is None else g.to(t.dtype) for g, t in zip(grads, like)]


def _stacked(flat, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up, down) x experts -> gate/up (experts, 2 * inter, hidden) and down
    (experts, hidden, inter), in ``dtype``."""
    gate_up = torch.stack([torch.cat(flat[i : i + 2]) for i in range(0, len(flat), 3)])
    return gate_up.to(dtype), torch.stack(flat[2::3]).to(dtype)


def _swiglu_backward(x, g, u, grad, weights, needs, pair_weights=None):
    """Backward of ``w * F.linear(silu(g) * u, down_w)``, where ``g``, ``u`` are the gate
    and up projections of the rows ``x`` (all 2-D), ``weights`` = (gate_w, up_w,
    down_w), ``needs`` = which of (x, gate_w, up_w, down_w) need a gradient and ``w``
    = ``pair_weights`` (rows, 1), or 1 when None.

    Returns (dx, d gate_w, d up_w, d down_w, h, dh) with ``h = silu(g) * u`` and ``dh``
    its gradient before weighting, from which the caller forms the gradient of ``w``:
    ``rowsum(dh * h)``."""
    gate_w, up_w, down_w = weights
    need_x, need_g, need_u, need_d = needs
    sg = F.silu(g)
    h = sg * u
    dh_plain = torch.mm(grad, down_w)
    dh = dh_plain if pair_weights is None else dh_plain * pair_weights
    dd_w = None
    if need_d:
        dd_w = torch.mm(grad.t(), h if pair_weights is None else h * pair_weights)
    du = dh * sg
    dg = torch.ops.aten.silu_backward(dh * u, g)
    dg_w = torch.mm(dg.t(), x) if need_g else None
    du_w = torch.mm(du.t(), x) if need_u else None
    dx = torch.addmm(torch.mm(dg, gate_w), du, up_w) if need_x else None
    return dx, dg_w, du_w, dd_w, h, dh_plain


def _groups(counts: list[int], bucket: int = 1) -> list[tuple[int, slice, slice]]:
    """(expert, its slice of the expert-sorted pairs, its slice of buffers whose
    per-expert lengths are padded to a multiple of ``bucket``) for every hit expert."""
    out, start, padded = [], 0, 0
    for e, count in enumerate(counts):
        if count:
            length = -(-count // bucket) * bucket
            out.append((e, slice(start, start + count), slice(padded, padded + length)))
            start, padded = start + count, padded + length
    return out


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _autocast_inputs(x: torch.Tensor, weights):
    """Under autocast, cast the matrix-multiply operands as autocast would (the casts are
    ordinary differentiable ops outside the function); otherwise unchanged."""
    dtype = _autocast_dtype(x)
    if dtype is None:
        return x, list(weights)
    return x.to(dtype), [w.to(dtype) for w in weights]


def _no_autocast(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False)
