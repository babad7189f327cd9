"""GPU: batch-1 matmul and decode-like tokens/s of the Triton W4A16 layer versus bf16
(goal: INT4 decode >= 1.8x bf16), and torchao's int4 weight-only in the same run when
torchao is installed. Needs CUDA and triton. Run once, on an H100, before the split-K
matrix-vector kernels (``kernels/triton_gemv.py``) existed; see docs/benchmarks.md.
Run: uv run --frozen python packages/ds-quant/benchmarks/bench_gpu.py [--sweep]
(``--sweep``: time the decode GEMV kernels' block and split choices instead, each
checked against the reference; ``--smoke``: that sweep at a tiny shape on CPU through
the Triton interpreter, to prove the script runs; its timings mean nothing.)
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

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


def sweep(repeats: int, device: str = "cuda", shapes=((11008, 4096), (4096, 11008))) -> None:
    """Time the decode GEMV kernels' (BLOCK_N, target programs) choices at one row on
    the 4096 x 11008 and 11008 x 4096 shapes against bf16 ``F.linear``, each checked
    against the reference; prints one table per kernel and shape, fastest first."""
    import functools
    import itertools

    import torch.nn.functional as F
    from ds_quant.kernels import w4a16_matmul_reference
    from ds_quant.kernels.reference import int8_weight_matmul_reference
    from ds_quant.kernels.triton_gemv import int8_gemv_triton, w4a16_gemv_triton
    from ds_quant.primitives import pack_int4, quantize_int4, quantize_int8_per_channel

    configs = list(itertools.product((32, 64, 128), (256, 512, 1024, 2048)))
    for n, k in shapes:
        w = torch.randn(n, k, device=device) * 0.02
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        wb = w.to(torch.bfloat16)
        t_bf16 = median_seconds(lambda wb=wb, x=x: F.linear(x, wb), repeats)
        q, scale, zero = quantize_int4(w, 128)
        packed = pack_int4(q)
        q8, s8 = quantize_int8_per_channel(w)
        kernels = {
            "INT4 g128": (
                functools.partial(w4a16_gemv_triton, x, packed, scale, zero, 128, k),
                w4a16_matmul_reference(x.float(), packed, scale, zero, 128, k),
                packed.numel() + 2 * scale.numel() * 4,
            ),
            "INT8": (
                functools.partial(int8_gemv_triton, x, q8, s8),
                int8_weight_matmul_reference(x.float(), q8, s8),
                q8.numel() + s8.numel() * 4,
            ),
        }
        for name, (run, ref, nbytes) in kernels.items():
            rows = []
            for bn, pr in configs:
                try:
                    err = float((run(bn, pr).float() - ref).abs().max() / ref.abs().max())
                    t = median_seconds(lambda bn=bn, pr=pr, run=run: run(bn, pr), repeats)
                except Exception as exc:  # report a config that fails, do not hide it
                    rows.append((float("inf"), f"| {bn} | {pr} | failed: {exc!r:.60} | | | |"))
                    continue
                verdict = "ok" if err < 1e-2 else f"WRONG (rel err {err:.2e})"
                rows.append((t, f"| {bn} | {pr} | {verdict} | {t * 1e6:.1f} | "
                                f"{nbytes / t / 1e9:.0f} | {t_bf16 / t:.2f}x |"))  # fmt: skip
            print(f"\n{name}, {n} x {k}, batch 1 (bf16 F.linear: {t_bf16 * 1e6:.1f} us)\n")
            print("| BLOCK_N | target programs | check | us | GB/s | vs bf16 |")
            print("| ---: | ---: | --- | ---: | ---: | ---: |")
            for _, line in sorted(rows, key=lambda r: r[0]):
                print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=11008)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="tune the decode GEMV kernels")
    parser.add_argument(
        "--smoke", action="store_true", help="--sweep at tiny shapes on CPU (interpreter)"
    )
    args = parser.parse_args()
    if args.smoke:  # proves the sweep runs; its timings mean nothing
        sweep(1, "cpu", ((40, 256),))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    if args.sweep:
        print(f"machine: {machine()}")
        sweep(args.repeats)
        return
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
