"""The HTTP/SSE overhead against ``--stream-interval`` and the HTTP stack, in one run.

One server per interval and stack (``python -m ds_serve.cli ... --stream-interval k
--http H --loop L``, each a subprocess; ``--stacks h11/asyncio,httptools/uvloop``) on ``bench_serve.py``'s random DeepSeek-V3-shaped checkpoint, and the same
engine in this process without HTTP; per round, every server and then the in-process
engine serve the same load (``clients`` concurrent streams, 2 requests each, 64 output
tokens, greedy). Overhead = 1 - server / in-process; ITL is the gap between streamed
events at the client (an event carries up to k tokens). Medians of ``--repeats`` rounds.

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-serve/benchmarks/bench_stream_interval.py \
        [--intervals 1,2,4] [--stacks auto/auto] [--clients 32] [--compile]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

import torch
from common import (
    build_checkpoint,
    engine_level,
    free_port,
    in_process_engine,
    pct,
    prompts,
    run_level,
    start_server,
)


async def measure(args, urls, engine, prompt_list, prompt_ids):
    for url in urls.values():
        await run_level(url, prompt_list, 2, 1, 8)  # warm-up
    engine.start(asyncio.get_running_loop())
    await engine_level(engine, prompt_ids, 2, 1, 8)
    rates = {k: [] for k in [*urls, "in-process"]}
    gaps = {k: [] for k in urls}
    for _ in range(args.repeats):
        for k, url in urls.items():
            rate, _, itl = await run_level(url, prompt_list, args.clients, 2, args.max_tokens)
            rates[k].append(rate)
            gaps[k] += itl
        rate = await engine_level(engine, prompt_ids, args.clients, 2, args.max_tokens)
        rates["in-process"].append(rate)
    return rates, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", default="1,2,4")
    parser.add_argument(
        "--stacks", default="auto/auto", help="HTTP/loop pairs, e.g. h11/asyncio,httptools/uvloop"
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="compiled decode steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    intervals = [int(k) for k in args.intervals.split(",")]
    stacks = args.stacks.split(",")
    from ds_model import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-v3"
        build_checkpoint(path)
        tokenizer = Tokenizer.from_dir(path)
        prompt_list = prompts(tokenizer, 128, 32)
        prompt_ids = [tokenizer.encode(p) for p in prompt_list]
        compiled = ("--compile",) if args.compile else ()
        servers, urls = [], {}
        try:
            for k in intervals:
                for stack in stacks:
                    http, loop = stack.split("/")
                    port = free_port()
                    extra = (*compiled, "--stream-interval", str(k), "--http", http, "--loop", loop)
                    servers.append(start_server(path, port, 1, "cpu", extra))
                    urls[k, stack] = f"http://127.0.0.1:{port}"
            engine = in_process_engine(path, "cpu", args.compile)
            try:
                rates, gaps = asyncio.run(measure(args, urls, engine, prompt_list, prompt_ids))
            finally:
                engine.shutdown()
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=60)
    median = {k: statistics.median(v) for k, v in rates.items()}
    inproc = median["in-process"]
    steps = "compiled" if args.compile else "eager"
    print(
        f"\n{args.clients} streaming clients, {args.max_tokens} output tokens, {steps} decode "
        f"steps, median of {args.repeats}, load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| stream interval | HTTP / loop | server tok/s | in-process engine tok/s "
        "| HTTP/SSE overhead | ITL p50 between events (ms) |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for k, stack in urls:
        rate = median[k, stack]
        print(
            f"| {k} | {stack} | {rate:.1f} | {inproc:.1f} | {1 - rate / inproc:.0%} "
            f"| {pct(gaps[k, stack], 50) * 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()
