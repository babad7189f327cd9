"""RMSNorm on ds-quant's one-pass CPU kernel against torch's ops, in one run: one norm
call, and eager greedy decode of a model.

- ``call``: one ``RMSNorm`` of a decode row (``(1, 1, hidden)``) per width, through
  ``ds_quant.kernels.cpu_gemv.rms_norm`` and through the module's torch ops
  (``RMSNorm.cpu_kernel = False``), interleaved; microseconds a call, median of
  ``--repeats``.
- ``decode``: ``ds_model.generate`` of ``--tokens`` tokens from a 32-token prompt
  (EOS ignored), eager, with the model's norms on the kernel and on torch's ops in
  alternating repeats; tokens/s, and the median of the repeats' own ratios.

The model is the shipped ``models/ds-tiny-coder`` unless ``--model`` names another
checkpoint directory. Run:

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-model/benchmarks/bench_norm.py \
        [--model DIR] [--dtypes float32 bfloat16] [--repeats 9]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import ds_model
import torch
from bench_cpu_decode import machine
from ds_model.norm import RMSNorm
from ds_quant.kernels import cpu_gemv


def per_call(norm: RMSNorm, x: torch.Tensor, calls: int = 2000) -> float:
    for _ in range(100):
        norm(x)
    start = time.perf_counter()
    for _ in range(calls):
        norm(x)
    return (time.perf_counter() - start) / calls * 1e6


def decode_rate(model, prompt: list[int], tokens: int) -> float:
    start = time.perf_counter()
    ds_model.generate(model, prompt, max_new_tokens=tokens)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: shipped)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 4096, 7168])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if not cpu_gemv.available():
        raise SystemExit("ds-quant's CPU kernel is not built on this machine: nothing to compare")
    path = args.model or ds_model.find_default_model()
    print(f"machine: {machine()}; model {path}; median of {args.repeats}")
    print("\n| dtype | what | kernel | torch's ops | speedup |")
    print("|---|---|---:|---:|---:|")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        with torch.inference_mode():
            for width in args.widths:
                norm = RMSNorm(width).to(dtype)
                x = torch.randn(1, 1, width, dtype=dtype)
                times = {True: [], False: []}
                for _ in range(args.repeats):
                    for on in (True, False):
                        RMSNorm.cpu_kernel = on
                        times[on].append(per_call(norm, x))
                RMSNorm.cpu_kernel = True
                on, off = statistics.median(times[True]), statistics.median(times[False])
                print(
                    f"| {name} | call, width {width} | {on:.1f} us | {off:.1f} us | {off / on:.2f}x |"
                )
        model = ds_model.from_pretrained(path, dtype=name)
        model.config = dataclasses.replace(model.config, eos_token_id=None)
        prompt = list(range(5, 37))
        decode_rate(model, prompt, 8)
        rates = {True: [], False: []}
        for _ in range(args.repeats):
            for on in (True, False):
                RMSNorm.cpu_kernel = on
                rates[on].append(decode_rate(model, prompt, args.tokens))
        RMSNorm.cpu_kernel = True
        ratio = statistics.median(a / b for a, b in zip(rates[True], rates[False]))
        on, off = statistics.median(rates[True]), statistics.median(rates[False])
        print(f"| {name} | eager decode, tokens/s | {on:.1f} | {off:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
