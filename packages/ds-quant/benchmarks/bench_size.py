"""Model bytes of each quantization recipe versus bf16 (goal: INT4 g128 <= 0.3x).

Measured on the linear layers of one transformer block at DeepSeek-LLM-7B-like sizes
(d=4096, hidden=11008): bytes of the state dict, which is what a checkpoint holds.
Run: uv run --frozen python packages/ds-quant/benchmarks/bench_size.py
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import machine, state_bytes
from ds_quant import (
    Fp8BlockConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    quantize_,
)
from torch import nn


def block(d: int, hidden: int) -> nn.Module:
    names = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d)}
    names |= {"gate": (d, hidden), "up": (d, hidden), "down": (hidden, d)}
    return nn.ModuleDict(
        {n: nn.Linear(i, o, bias=False, dtype=torch.bfloat16) for n, (i, o) in names.items()}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=11008)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = block(args.dim, args.hidden)
    bf16 = state_bytes(base)
    rows = [("bf16", bf16)]
    for label, config in [
        ("INT8 weight-only", Int8WeightOnlyConfig()),
        ("INT8 W8A8 dynamic", Int8DynamicActivationInt8WeightConfig()),
        ("INT4 g128 asym", Int4WeightOnlyConfig(group_size=128)),
        ("INT4 g32 asym", Int4WeightOnlyConfig(group_size=32)),
        ("FP8 128x128 blocks", Fp8BlockConfig()),
    ]:
        rows.append((label, state_bytes(quantize_(copy.deepcopy(base), config))))
    print(f"machine: {machine()}")
    print(f"linear layers of one block, d={args.dim}, hidden={args.hidden}\n")
    print("| recipe | bytes | vs bf16 |")
    print("| --- | ---: | ---: |")
    for label, n in rows:
        print(f"| {label} | {n:,} | {n / bf16:.3f}x |")


if __name__ == "__main__":
    main()
