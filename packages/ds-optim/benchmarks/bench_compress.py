"""Compress + decompress throughput of the gradient compressors (GB/s of fp32 input).

Usage: uv run --frozen python packages/ds-optim/benchmarks/bench_compress.py
Measures on CUDA too when a GPU is present. Baseline in the same run: a plain
fp32 -> bf16 -> fp32 cast of the same tensor (the cheapest 2x "compression").
"""

from __future__ import annotations

import argparse

import torch
from _common import machine, median_time
from ds_optim import Int4GradientCompressor, Int8GradientCompressor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=1 << 22)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"Machine: {machine()}; {args.numel / 1e6:.1f}M fp32 elements "
        f"({args.numel * 4 / 2**20:.0f} MiB), median of {args.repeats}\n"
    )
    print(
        "| device | compressor | wire bytes vs fp32 | compress+decompress GB/s | vs bf16 cast round trip |"
    )
    print("| --- | --- | ---: | ---: | ---: |")
    for device in devices:
        x = torch.randn(args.numel, device=device)
        gb = x.numel() * 4 / 1e9
        cast = median_time(lambda: x.to(torch.bfloat16).float(), args.repeats)  # noqa: B023
        print(f"| {device} | bf16 cast (baseline) | 2.00x | {gb / cast:.2f} | 1.00x |")
        for cls in (Int4GradientCompressor, Int8GradientCompressor):
            for sr, ef in ((True, True), (False, False)):
                comp = cls(128, stochastic_rounding=sr, error_feedback=ef)

                def run(comp=comp) -> None:
                    comp.decompress(comp.compress(x, key=0))  # noqa: B023

                t = median_time(run, args.repeats)
                ratio = x.numel() * 4 / comp.compress(x, key=1).nbytes
                name = f"{cls.__name__}(sr={sr}, ef={ef})"
                print(f"| {device} | {name} | {ratio:.2f}x | {gb / t:.2f} | {cast / t:.2f}x |")


if __name__ == "__main__":
    main()
