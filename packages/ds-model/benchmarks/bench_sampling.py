"""The batched sampler against a per-row loop, in the same run.

The baseline is the loop a server without a batched sampler runs: for each sampled row,
filter top-k / top-p on that row and draw with the row's own ``torch.Generator``
(the shape of ds-serve's sampler before it used ``ds_model.sampling``). The batched
sampler does the same work as whole-tensor operations over the rows. Rows per step
1, 8, 32, 128 at a 32,000-token vocabulary; temperature 0.8, top-p 0.95, top-k 50.

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-model/benchmarks/bench_sampling.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial

import torch
from ds_model.sampling import SamplingParams, sample


def per_row_loop(logits: torch.Tensor, generators: list[torch.Generator]) -> list[int]:
    out = []
    for row, generator in zip(logits.float(), generators):
        row = row / 0.8
        kth = torch.topk(row, 50).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
        ordered, order = torch.sort(row, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= 0.95
        ordered = ordered.masked_fill(drop, float("-inf"))
        row = torch.empty_like(row).scatter_(0, order, ordered)
        out.append(int(torch.multinomial(torch.softmax(row, -1), 1, generator=generator)))
    return out


def timed(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"# {platform.machine()}, torch threads={torch.get_num_threads()}, vocab={args.vocab}")
    print("| rows | per-row loop (ms) | batched (ms) | speed-up |")
    print("|---:|---:|---:|---:|")
    for rows in (1, 8, 32, 128):
        logits = torch.randn(rows, args.vocab) * 3
        params = [
            SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=i) for i in range(rows)
        ]
        generators = [torch.Generator().manual_seed(i) for i in range(rows)]
        outputs = [[0] * 7 for _ in range(rows)]
        loop, batched = [], []
        for _ in range(3):  # interleaved rounds
            loop.append(timed(partial(per_row_loop, logits, generators), args.repeats))
            batched.append(timed(partial(sample, logits, params, output_ids=outputs), args.repeats))
        a, b = statistics.median(loop) * 1e3, statistics.median(batched) * 1e3
        print(f"| {rows} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
