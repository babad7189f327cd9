"""Tensor-parallel serving on the CPU: the engine over two gloo ranks against one rank.

Both engines serve the same checkpoint (the built-in model by default, float32, one
torch thread per process) in one process, the TP=2 engine with the worker process it
starts itself; no HTTP. Each round sends ``--clients`` concurrent greedy requests of
``--max-tokens`` tokens (no EOS stop) to each engine in turn; output tokens/s is
completion tokens over the round's wall time. Medians of ``--repeats`` rounds, the two
engines interleaved in every round, and their ratio. On a shared machine a second
process also takes a second share of the cores, so the CPU time each engine spends per
output token (all its processes: this one's during its rounds, plus the worker's) is
printed beside the rates. Run:

    OMP_NUM_THREADS=1 uv run --frozen python \
        packages/ds-serve/benchmarks/bench_tensor_parallel.py [--model PATH] [--clients 1,8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time

import torch
from ds_serve import SamplingParams, build_engine

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"


def worker_cpu_seconds(engine) -> float:
    """User + system CPU seconds of the worker processes the engine started (Linux)."""
    ranks = getattr(engine.runner, "ranks", None)
    total = 0.0
    for proc in ranks.workers.values() if ranks is not None else ():
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def round_trip(
    engine, prompt: list[int], clients: int, max_tokens: int
) -> tuple[float, float]:
    """(output tokens/s, CPU ms per output token) of ``clients`` concurrent requests."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    async def one(i: int) -> int:
        request_id = engine.submit([*prompt, i + 3], params)
        return sum([len(d.token_ids) async for d in engine.stream(request_id)])

    start, cpu = time.perf_counter(), time.process_time() + worker_cpu_seconds(engine)
    tokens = sum(await asyncio.gather(*(one(i) for i in range(clients))))
    cpu = time.process_time() + worker_cpu_seconds(engine) - cpu
    return tokens / (time.perf_counter() - start), 1000 * cpu / tokens


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory; default: built-in")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    levels = [int(c) for c in args.clients.split(",")]
    options = {"device": "cpu", "dtype": "float32", "num_blocks": 256}
    engines = {
        1: build_engine(args.model, **options),
        2: build_engine(args.model, tensor_parallel_size=2, **options),
    }
    prompt = engines[1].tokenizer.encode(PROMPT)
    for engine in engines.values():
        engine.start()
        await round_trip(engine, prompt, max(levels), 8)  # warm-up
    rates: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for clients in levels:
            for tp, engine in engines.items():
                rate = await round_trip(engine, prompt, clients, args.max_tokens)
                rates.setdefault((clients, tp), []).append(rate)
    for engine in engines.values():
        engine.shutdown()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; ")
    print(f"{args.max_tokens} output tokens per request, median of {args.repeats}\n")
    print(
        "| clients | TP=1 tok/s | TP=2 tok/s | TP=2 / TP=1 "
        "| TP=1 CPU ms/token | TP=2 CPU ms/token | TP=2 / TP=1 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for clients in levels:
        one, two = ([statistics.median(m) for m in zip(*rates[(clients, tp)])] for tp in (1, 2))
        print(
            f"| {clients} | {one[0]:.1f} | {two[0]:.1f} | {two[0] / one[0]:.2f}x "
            f"| {one[1]:.1f} | {two[1]:.1f} | {two[1] / one[1]:.2f}x |"
        )


if __name__ == "__main__":
    asyncio.run(main())
