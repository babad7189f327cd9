"""GPU: batch-1 matmul and decode-like tokens/s of the Triton W4A16 layer versus bf16
(goal: INT4 decode >= 1.8x bf16), and torchao's int4 weight-only in the same run when
torchao is installed. Needs CUDA and triton. Run once, on an H100, before the split-K
matrix-vector kernels (``kernels/triton_gemv.py``) existed; see docs/benchmarks.md.
Run: uv run --frozen python packages/ds-quant/benchmarks/bench_gpu.py
"""

from __future__ import annotations

import argparse
import copy
import importlib.util

import torch
from bench_cpu import Blocks
from common import machine, median_seconds
from ds_quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
from torch import nn


def torchao_int4(model: nn.Module) -> nn.Module | None:
    if importlib.util.find_spec("torchao") is None:
        return None
    from torchao.quantization import Int4WeightOnlyConfig as AoInt4
    from torchao.quantization import quantize_ as ao_quantize_

    m = copy.deepcopy(model)
    ao_quantize_(m, AoInt4(group_size=128))
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=11008)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    torch.manual_seed(0)
    print(f"machine: {machine()}\n")
    base = Blocks(args.layers, args.dim, args.hidden).cuda()
    variants = {
        "bf16 nn.Linear": base,
        "ds-quant INT4 g128 (Triton)": quantize_(
            copy.deepcopy(base), Int4WeightOnlyConfig(group_size=128)
        ),
        "ds-quant INT8 weight-only (Triton GEMV at batch 1)": quantize_(
            copy.deepcopy(base), Int8WeightOnlyConfig()
        ),
    }
    ao = torchao_int4(base)
    if ao is not None:
        variants["torchao int4 weight-only g128"] = ao
    x = torch.randn(1, args.dim, device="cuda", dtype=torch.bfloat16) * 0.1

    print("| variant | batch-1 ms (one block's up proj) | decode tokens/s | vs bf16 |")
    print("| --- | ---: | ---: | ---: |")
    base_tps = None
    for label, model in variants.items():
        up = model.layers[0][5]

        def run(model: nn.Module = model) -> None:
            h = x
            for _ in range(args.tokens):
                h = model(h) * 0.01

        with torch.no_grad():
            t_mm = median_seconds(lambda up=up: up(x), args.repeats)
            tps = args.tokens / median_seconds(run, args.repeats, warmup=2)
        base_tps = base_tps or tps
        print(f"| {label} | {t_mm * 1e3:.3f} | {tps:.1f} | {tps / base_tps:.2f}x |")


if __name__ == "__main__":
    main()
