"""Batch-1 matmul latency and decode-like tokens/s of each recipe versus bf16, on CPU.

"Decode-like": one token (batch 1) at a time through the linear layers of ``--layers``
transformer blocks (q, k, v, o, gate, up, down), the part of a decode step that
weight quantization changes; attention over the cache and sampling are excluded.
Activations are bf16 in every row. Medians over ``--repeats`` runs.
Run: uv run --frozen python packages/ds-quant/benchmarks/bench_cpu.py
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import machine, median_seconds
from ds_quant import (
    Fp8BlockConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    quantize_,
)
from torch import nn

RECIPES = [
    ("INT8 weight-only", Int8WeightOnlyConfig(), None),
    ("INT8 W8A8 dynamic", Int8DynamicActivationInt8WeightConfig(), None),
    ("INT4 g128 (packed CPU op)", Int4WeightOnlyConfig(group_size=128), "auto"),
    ("INT4 g128 (dequantize+matmul)", Int4WeightOnlyConfig(group_size=128), "reference"),
    ("FP8 128x128 (dequantize+matmul)", Fp8BlockConfig(), None),
]


class Blocks(nn.Module):
    def __init__(self, layers: int, d: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(layers):
            shapes = [(d, d)] * 4 + [(d, hidden), (d, hidden), (hidden, d)]
            self.layers.append(
                nn.ModuleList(nn.Linear(i, o, bias=False, dtype=torch.bfloat16) for i, o in shapes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for q, k, v, o, gate, up, down in self.layers:
            x = x + o(q(x) + k(x) * 0.01 + v(x) * 0.01)
            x = x + down(torch.nn.functional.silu(gate(x)) * up(x))
        return x


def set_backend(model: nn.Module, backend: str | None) -> None:
    if backend is None:
        return
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=11008)
    parser.add_argument("--decode-dim", type=int, default=2048)
    parser.add_argument("--decode-hidden", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"machine: {machine()}\n")

    print(f"### batch-1 matmul, bf16 activations, median of {args.repeats}\n")
    print("| recipe | shape (out x in) | ms | speed vs bf16 |")
    print("| --- | --- | ---: | ---: |")
    for out_f, in_f in [(args.dim, args.dim), (args.hidden, args.dim)]:
        base = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        x = torch.randn(1, in_f, dtype=torch.bfloat16)
        with torch.no_grad():
            t_bf16 = median_seconds(lambda base=base, x=x: base(x), args.repeats)
            base32 = copy.deepcopy(base).float()
            x32 = x.float()
            t_fp32 = median_seconds(lambda m=base32, x=x32: m(x), args.repeats)
            rows = [("bf16 nn.Linear", t_bf16), ("fp32 nn.Linear", t_fp32)]
            for label, config, backend in RECIPES:
                q = quantize_(base, config)
                set_backend(q, backend)
                rows.append((label, median_seconds(lambda q=q, x=x: q(x), args.repeats)))
        for label, t in rows:
            print(f"| {label} | {out_f} x {in_f} | {t * 1e3:.3f} | {t_bf16 / t:.2f}x |")

    print(
        f"\n### decode-like tokens/s: {args.layers} blocks, d={args.decode_dim}, "
        f"hidden={args.decode_hidden}, batch 1, {args.tokens} tokens per timing\n"
    )
    print("| recipe | tokens/s | vs bf16 |")
    print("| --- | ---: | ---: |")
    base = Blocks(args.layers, args.decode_dim, args.decode_hidden)
    x = torch.randn(1, args.decode_dim, dtype=torch.bfloat16) * 0.1

    def decode(model: nn.Module) -> float:
        def run() -> None:
            h = x
            for _ in range(args.tokens):
                h = model(h) * 0.01  # feed the output back, as decode does

        with torch.no_grad():
            return args.tokens / median_seconds(run, args.repeats, warmup=1)

    tps_bf16 = decode(base)
    print(f"| bf16 nn.Linear | {tps_bf16:.1f} | 1.00x |")
    for label, config, backend in RECIPES:
        if "dequantize+matmul" in label:  # too slow per token to be a decode option here
            continue
        q = quantize_(copy.deepcopy(base), config)
        set_backend(q, backend)
        tps = decode(q)
        print(f"| {label} | {tps:.1f} | {tps / tps_bf16:.2f}x |")
        del q


if __name__ == "__main__":
    main()
