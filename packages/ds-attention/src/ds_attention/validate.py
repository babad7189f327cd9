"""Input checks shared by every backend: one place that turns user arguments into a MaskSpec.

Every failure is a ``ValueError`` (or ``TypeError`` for a wrong Python type) naming the
argument, the value it got and what is allowed: never a silent wrong answer.
"""

from __future__ import annotations

import itertools

import torch

from ds_attention.protocol import MaskSpec

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _check_tensor(name: str, t: object, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dims (batch, seqlen, heads, head_dim), "
            f"got shape {tuple(t.shape)}"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{name}.dtype {t.dtype} is not supported; allowed: float16, bfloat16, float32"
        )
    return t


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q: (batch, seqlen_q, heads, d_qk); k: (batch, seqlen_k, kv_heads, d_qk);
    v: (batch, seqlen_k, kv_heads, d_v)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, _, h, d_qk = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(
            f"batch mismatch: q has {b}, k has {k.shape[0]}, v has {v.shape[0]}; they must be equal"
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k seqlen {k.shape[1]} != v seqlen {v.shape[1]}; they must be equal")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k heads {k.shape[2]} != v heads {v.shape[2]}; they must be equal")
    if k.shape[3] != d_qk:
        raise ValueError(
            f"k head_dim {k.shape[3]} != q head_dim {d_qk}; q and k must share head_dim"
        )
    h_kv = k.shape[2]
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(
            f"q heads ({h}) must be a positive multiple of k/v heads ({h_kv}) "
            "for grouped-query attention"
        )
    for name, d in (("q/k head_dim", d_qk), ("v head_dim", v.shape[3])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} is {d}; allowed: 1..{MAX_HEAD_DIM}")


def normalize_window(window: object) -> tuple[int | None, int | None] | None:
    """``None`` -> no window; ``w`` -> ``(w, w)``; ``(left, right)`` with ``None`` = unbounded."""
    if window is None:
        return None
    if isinstance(window, bool):
        raise TypeError(f"window must be None, an int or a (left, right) tuple, got {window!r}")
    if isinstance(window, int):
        window = (window, window)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None, an int or a (left, right) pair, got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            out.append(None)
            continue
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"window {side} must be an int >= 0 or None, got {w!r}")
        if w < 0:
            raise ValueError(f"window {side} must be >= 0 (or None for unbounded), got {w}")
        out.append(int(w))
    return (out[0], out[1])


def _check_cu(name: str, cu: object, total: int) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D int tensor, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.numel() < 2 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name} must be a 1-D int32/int64 tensor of num_seqs + 1 cumulative lengths, "
            f"got shape {tuple(cu.shape)} dtype {cu.dtype}"
        )
    values = cu.tolist()
    if values[0] != 0 or values[-1] != total or any(a > b for a, b in itertools.pairwise(values)):
        raise ValueError(
            f"{name} must start at 0, never decrease and end at the packed length {total}, "
            f"got {values}"
        )
    return cu.to(torch.int32)


def make_mask_spec(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: object = None,
    block_mask: torch.Tensor | None = None,
    block_size: int = 64,
    cu_seqlens: object = None,
) -> MaskSpec:
    """Checks the arguments of :func:`ds_attention.attention` and returns one MaskSpec."""
    check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    win = normalize_window(window)
    cu_q = cu_k = None
    if cu_seqlens is not None:
        if q.shape[0] != 1:
            raise ValueError(
                f"with cu_seqlens, sequences are packed along dim 1 and batch must be 1, "
                f"got q batch {q.shape[0]}"
            )
        if isinstance(cu_seqlens, (tuple, list)):
            if len(cu_seqlens) != 2:
                raise ValueError(
                    "cu_seqlens must be a tensor or a (cu_seqlens_q, cu_seqlens_k) pair"
                )
            cu_q = _check_cu("cu_seqlens_q", cu_seqlens[0], q.shape[1])
            cu_k = _check_cu("cu_seqlens_k", cu_seqlens[1], k.shape[1])
        else:
            cu_q = _check_cu("cu_seqlens", cu_seqlens, q.shape[1])
            cu_k = cu_q if q.shape[1] == k.shape[1] else None
            if cu_k is None:
                raise ValueError(
                    f"one cu_seqlens needs q and k of equal packed length, got {q.shape[1]} and "
                    f"{k.shape[1]}; pass (cu_seqlens_q, cu_seqlens_k)"
                )
        if cu_q.numel() != cu_k.numel():
            raise ValueError(
                f"cu_seqlens_q has {cu_q.numel() - 1} sequences, cu_seqlens_k has "
                f"{cu_k.numel() - 1}; they must match"
            )
        cu_q, cu_k = cu_q.to(q.device), cu_k.to(q.device)
    if block_mask is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"block_size must be an int, got {block_size!r}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            raise ValueError(
                "block_mask must be a bool tensor (batch, heads, q_blocks, k_blocks), got "
                f"{type(block_mask).__name__}"
                + (f" of dtype {block_mask.dtype}" if isinstance(block_mask, torch.Tensor) else "")
            )
        if cu_q is not None:
            lens_q = (cu_q[1:] - cu_q[:-1]).tolist()
            lens_k = (cu_k[1:] - cu_k[:-1]).tolist()
            batch, max_q, max_k = len(lens_q), max(lens_q), max(lens_k)
        else:
            batch, max_q, max_k = q.shape[0], q.shape[1], k.shape[1]
        heads = q.shape[2]
        nq, nk = -(-max_q // block_size), -(-max_k // block_size)
        bm = block_mask
        if (
            bm.dim() != 4
            or bm.shape[0] not in (1, batch)
            or bm.shape[1] not in (1, heads)
            or bm.shape[2] != nq
            or bm.shape[3] != nk
        ):
            raise ValueError(
                f"block_mask must have shape (1 or {batch}, 1 or {heads}, {nq}, {nk}) = "
                f"(batch, heads, ceil(seqlen_q / {block_size}), ceil(seqlen_k / {block_size})), "
                f"got {tuple(bm.shape)}"
            )
        block_mask = bm.to(q.device)
    return MaskSpec(
        causal=causal,
        window=win,
        block_mask=block_mask,
        block_size=block_size,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
    )


def check_softmax_scale(softmax_scale: object, d_qk: int) -> float:
    if softmax_scale is None:
        return d_qk**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be > 0, got {softmax_scale}")
    return float(softmax_scale)
