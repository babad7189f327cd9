"""GPU benchmark of the Triton kernels against torch SDPA and FlexAttention (same run).

- dense causal: forward and forward+backward TFLOP/s and ms, vs SDPA's flash backend;
- sliding window and block-sparse (1/8 density): vs SDPA with a dense boolean mask and
  FlexAttention with the same block mask;
- paged decode: batch 64, context 4k, as a fraction of peak HBM bandwidth.

Goals: dense causal forward >= 0.8x SDPA; window 4k and block-sparse 1/8 at 32k
>= 5x SDPA-with-mask and >= FlexAttention; decode >= 60% of HBM bandwidth.

    uv run --frozen python packages/ds-attention/benchmarks/bench_gpu.py [--hbm-gbps 3350]

``--smoke`` runs tiny shapes on CPU (Triton interpreter) only to prove the script works;
its timings mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--tokens", type=int, default=65536, help="batch * seqlen per measurement")
    p.add_argument("--hidden", type=int, default=2048, help="heads = hidden // head_dim")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--density", type=float, default=1 / 8)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--hbm-gbps", type=float, default=3350.0, help="peak HBM GB/s (H100 SXM)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run through the interpreter")
    return p.parse_args()


ARGS = parse()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"

import ds_attention  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import attention_flops, machine, median_ms, table, visible_pairs  # noqa: E402
from ds_attention.masks import dense_mask  # noqa: E402

DEVICE = "cpu" if ARGS.smoke else "cuda"
DTYPE = torch.float32 if ARGS.smoke else torch.bfloat16


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION if DEVICE == "cuda" else SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def flex_fn(block_mask_bool, window, block_size, s, heads):
    """FlexAttention with the same pattern; None when unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    if window is not None:

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)
    else:
        table_ = block_mask_bool[0, 0]

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & table_[q_idx // block_size, kv_idx // block_size]

    bm = create_block_mask(mask_mod, 1, 1, s, s, device=DEVICE, BLOCK_SIZE=block_size)
    compiled = flex_attention if DEVICE == "cpu" else torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=bm)


def timed(fn, q, k, v, backward):
    if not backward:
        with torch.no_grad():
            return median_ms(lambda: fn(q, k, v), ARGS.repeats)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    dout = torch.randn_like(out)

    def step():
        o = fn(*leaves)
        o.backward(dout)

    return median_ms(step, ARGS.repeats)


def emit(row):
    """Print a table row as soon as it is measured, so a cut-off run still reports."""
    print("| " + " | ".join(row) + " |", flush=True)


def dense_causal_rows():
    for d in ARGS.head_dims:
        h = max(1, ARGS.hidden // d)
        for s in ARGS.seqlens:
            b = max(1, ARGS.tokens // s)
            q, k, v = (torch.randn(b, s, h, d, device=DEVICE, dtype=DTYPE) for _ in range(3))
            ours = lambda q, k, v: ds_attention.attention(q, k, v, causal=True, backend="triton")  # noqa: E731
            theirs = lambda q, k, v: sdpa_flash(  # noqa: E731
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            )
            pairs = b * h * s * (s + 1) // 2
            for bwd in (False, True):
                t_ours, t_sdpa = timed(ours, q, k, v, bwd), timed(theirs, q, k, v, bwd)
                fl = attention_flops(pairs, d, d, bwd)
                emit([
                    "dense causal", str(d), str(s), "fwd+bwd" if bwd else "fwd",
                    f"{t_ours:.2f}", f"{fl / t_ours / 1e9:.1f}", f"{t_sdpa:.2f}",
                    f"{fl / t_sdpa / 1e9:.1f}", f"{t_sdpa / t_ours:.2f}x", "-",
                ])  # fmt: skip


def sparse_rows():
    d = 128
    h = max(1, ARGS.hidden // d)
    bs = ARGS.block_size
    for s in ARGS.seqlens:
        q, k, v = (torch.randn(1, s, h, d, device=DEVICE, dtype=DTYPE) for _ in range(3))
        nb = -(-s // bs)
        g = torch.Generator().manual_seed(0)
        layout = torch.rand(1, 1, nb, nb, generator=g) < ARGS.density
        layout |= torch.eye(nb, dtype=torch.bool)
        layout = layout.to(DEVICE)
        patterns = {
            f"window {ARGS.window}": ({"causal": True, "window": ARGS.window}, ARGS.window, None),
            f"block-sparse {ARGS.density:g}": (
                {"causal": True, "block_mask": layout, "block_size": bs}, None, layout,
            ),
        }  # fmt: skip
        for name, (kw, window, bm) in patterns.items():
            mask = dense_mask(
                s, s, causal=True, window=(window, window) if window else None,
                block_mask=bm, block_size=bs, device=DEVICE,
            )  # fmt: skip
            pairs = visible_pairs(mask, 1, h, s, s)
            ours = lambda q, k, v, kw=kw: ds_attention.attention(q, k, v, backend="triton", **kw)  # noqa: E731
            masked = lambda q, k, v, m=mask: F.scaled_dot_product_attention(  # noqa: E731
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m
            )
            flex = flex_fn(bm, window, bs, s, h)
            for bwd in (False, True):
                fl = attention_flops(pairs, d, d, bwd)
                t_ours = timed(ours, q, k, v, bwd)
                t_mask = timed(masked, q, k, v, bwd)
                t_flex = None
                if flex is not None:
                    tflex = lambda q, k, v, f=flex: f(  # noqa: E731
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                    )
                    try:
                        t_flex = timed(tflex, q, k, v, bwd)
                    except Exception as exc:  # report, do not hide, a FlexAttention failure
                        print(f"FlexAttention failed for {name} s={s}: {exc}", file=sys.stderr)
                emit([
                    name, str(d), str(s), "fwd+bwd" if bwd else "fwd", f"{t_ours:.2f}",
                    f"{fl / t_ours / 1e9:.1f}", f"{t_mask:.2f}", f"{fl / t_mask / 1e9:.1f}",
                    f"{t_mask / t_ours:.2f}x",
                    f"{t_flex / t_ours:.2f}x" if t_flex is not None else "n/a",
                ])  # fmt: skip


def decode_rows():
    from ds_attention.decode import paged_decode_attention

    batch, ctx, heads, kv_heads, d, page = (64, 4096, 32, 8, 128, 16)
    if ARGS.smoke:
        batch, ctx, heads, kv_heads, d, page = (2, 64, 4, 2, 16, 16)
    blocks = batch * ctx // page
    kc = torch.randn(blocks, page, kv_heads, d, device=DEVICE, dtype=DTYPE)
    vc = torch.randn(blocks, page, kv_heads, d, device=DEVICE, dtype=DTYPE)
    table_ = torch.randperm(blocks, device=DEVICE).view(batch, -1).to(torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, heads, d, device=DEVICE, dtype=DTYPE)
    t = median_ms(lambda: paged_decode_attention(q, kc, vc, table_, lens, backend="triton"),
                  ARGS.repeats)  # fmt: skip
    gbytes = 2 * batch * ctx * kv_heads * d * kc.element_size() / 1e9
    gbps = gbytes / (t / 1e3)
    return [[str(batch), str(ctx), f"{heads}/{kv_heads}", str(d), f"{t:.3f}", f"{gbps:.0f}",
             f"{100 * gbps / ARGS.hbm_gbps:.0f}%"]]  # fmt: skip


def main():
    if ARGS.smoke:
        ARGS.seqlens, ARGS.head_dims, ARGS.tokens, ARGS.hidden = [64], [16], 64, 32
        ARGS.window, ARGS.block_size, ARGS.repeats = 16, 16, 1
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device (or --smoke for a CPU dry run)")
    print(f"Machine: {machine()}; {DTYPE}; median of {ARGS.repeats}\n")
    header = ["pattern", "head_dim", "seqlen", "pass", "ours ms", "ours TFLOP/s",
              "baseline ms", "baseline TFLOP/s", "baseline / ours", "FlexAttention / ours"]  # fmt: skip
    print("Baseline: SDPA flash backend (dense causal), SDPA + dense bool mask (others).\n")
    print(table(header, []))
    dense_causal_rows()
    sparse_rows()
    print()
    print(table(["batch", "context", "heads/kv", "head_dim", "decode ms", "GB/s", "of peak HBM"],
                decode_rows()))  # fmt: skip


if __name__ == "__main__":
    main()
