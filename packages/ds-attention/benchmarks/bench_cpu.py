"""CPU benchmark: what a user without a GPU gets from ds_attention.attention().

Compares, in one run and per mask pattern, the default CPU dispatch (torch SDPA, a mask
passed only where needed), SDPA given a dense boolean mask, and the explicit-mask
float32 reference. Prints a markdown table with medians and ratios.

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-attention/benchmarks/bench_cpu.py
"""

from __future__ import annotations

import argparse

import ds_attention
import torch
import torch.nn.functional as F
from common import machine, median_ms, table
from ds_attention.masks import dense_mask
from ds_attention.validate import make_mask_spec, normalize_window


def measure(q, k, v, kw, mask, repeats):
    """Medians (ms) of attention() (default CPU dispatch), SDPA + bool mask, reference."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    t_dispatch = median_ms(lambda: ds_attention.attention(q, k, v, **kw), repeats)
    t_masked = median_ms(
        lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask), repeats
    )
    t_ref = median_ms(lambda: ds_attention.attention(q, k, v, backend="reference", **kw), repeats)
    return t_dispatch, t_masked, t_ref


def run(seqlens, batch, heads, head_dim, dtype, repeats):
    rows = []
    for s in seqlens:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch, s, heads, head_dim, generator=g).to(dtype) for _ in range(3))
        nb = -(-s // 64)
        block = torch.rand(1, 1, nb, nb, generator=g) < 0.25
        block |= torch.eye(nb, dtype=torch.bool)  # keep the diagonal so no row is empty
        patterns = {
            "dense causal": {"causal": True},
            "window 128": {"causal": True, "window": 128},
            "block-sparse 1/4": {"causal": True, "block_mask": block, "block_size": 64},
        }
        for name, kw in patterns.items():
            spec = make_mask_spec(q, k, v, **kw)
            mask = dense_mask(
                s, s, causal=spec.causal, window=normalize_window(kw.get("window")),
                block_mask=spec.block_mask, block_size=spec.block_size,
            )  # fmt: skip
            t_dispatch, t_masked, t_ref = measure(q, k, v, kw, mask, repeats)
            rows.append([
                name, str(s), f"{t_dispatch:.2f}", f"{t_masked:.2f}", f"{t_ref:.2f}",
                f"{t_masked / t_dispatch:.2f}x", f"{t_ref / t_dispatch:.2f}x",
            ])  # fmt: skip
    return rows


def decode_rows(batch, heads, kv_heads, head_dim, contexts, dtype, repeats, page=16):
    """Paged decode: the CPU default (live pages copied once, batched matmuls) vs the reference."""
    from ds_attention.decode import paged_decode_attention

    rows = []
    for ctx in contexts:
        g = torch.Generator().manual_seed(0)
        blocks = batch * ctx // page
        kc = torch.randn(blocks, page, kv_heads, head_dim, generator=g).to(dtype)
        vc = torch.randn(blocks, page, kv_heads, head_dim, generator=g).to(dtype)
        table_ = torch.randperm(blocks, generator=g).view(batch, -1).to(torch.int32)
        lens = torch.full((batch,), ctx, dtype=torch.int32)
        q = torch.randn(batch, heads, head_dim, generator=g).to(dtype)
        args = (q, kc, vc, table_, lens)
        t_torch = median_ms(lambda args=args: paged_decode_attention(*args), repeats)
        t_ref = median_ms(
            lambda args=args: paged_decode_attention(*args, backend="reference"), repeats
        )
        rows.append([str(batch), str(ctx), f"{heads}/{kv_heads}", f"{t_torch:.2f}",
                     f"{t_ref:.2f}", f"{t_ref / t_torch:.2f}x"])  # fmt: skip
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seqlens", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-only", action="store_true", help="only the paged-decode table")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    print(f"Machine: {machine()}; {a.dtype}; median of {a.repeats}\n")
    print("Paged decode, one token per sequence, head_dim 64, page 16:\n")
    dec = decode_rows(8, a.heads, 2, a.head_dim, [256, 1024, 4096], dtype, a.repeats)
    print(table(["batch", "context", "heads/kv", "default (torch) ms", "reference ms",
                 "reference / default"], dec))  # fmt: skip
    print()
    if a.decode_only:
        return
    rows = run(a.seqlens, a.batch, a.heads, a.head_dim, dtype, a.repeats)
    print(f"Prefill attention, batch {a.batch}, heads {a.heads}, head_dim {a.head_dim}, forward:\n")
    header = ["pattern", "seqlen", "attention() ms", "SDPA + bool mask ms", "reference ms",
              "bool-mask / attention()", "reference / attention()"]  # fmt: skip
    print(table(header, rows))


if __name__ == "__main__":
    main()
