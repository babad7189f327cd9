"""The engine in a process of its own against the engine in the server's process, in one run.

Two servers on ``bench_serve.py``'s random DeepSeek-V3-shaped checkpoint, each a
``python -m ds_serve.cli`` subprocess: ``--engine-process`` (the default: HTTP in one
process, the engine in another) and ``--no-engine-process`` (the engine as a thread of
the HTTP process); the same engine in this process without HTTP; and sequential
``ds_model.generate`` in this process, one request at a time (8 requests). Every round
runs each of them, the levels' loads (concurrent streaming clients, 64 output tokens,
greedy) and the sequential requests interleaved, so that the machine's drift over the
run (this host's memory bandwidth moves by a quarter within minutes) falls on all of
them alike. Tokens/s are medians of ``--repeats`` rounds; each ratio is the median of
the rounds' own ratios.

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-serve/benchmarks/bench_engine_process.py \
        [--levels 1,8,32] [--repeats 5] [--compile]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
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

MODES = {"engine process": "--engine-process", "engine thread": "--no-engine-process"}


async def measure(args, levels, urls, engine, prompt_list, prompt_ids, sequential):
    for url in urls.values():
        await run_level(url, prompt_list, 2, 1, 8)  # warm-up
    engine.start(asyncio.get_running_loop())
    await engine_level(engine, prompt_ids, 2, 1, 8)
    rates: dict[tuple[str, int], list[float]] = {}
    itls: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        rates.setdefault(("sequential", 1), []).append(sequential())
        for clients in levels:
            per_client = max(1, 8 // clients) if clients < 8 else 2
            for mode, url in urls.items():
                rate, _, itl = await run_level(
                    url, prompt_list, clients, per_client, args.max_tokens
                )
                rates.setdefault((mode, clients), []).append(rate)
                itls.setdefault((mode, clients), []).extend(itl)
            rate = await engine_level(engine, prompt_ids, clients, per_client, args.max_tokens)
            rates.setdefault(("in-process engine", clients), []).append(rate)
    return rates, itls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-requests", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="compiled decode steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]
    import ds_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-v3"
        build_checkpoint(path)
        tokenizer = ds_model.Tokenizer.from_dir(path)
        prompt_list = prompts(tokenizer, 128, args.prompt_len)
        prompt_ids = [tokenizer.encode(p) for p in prompt_list]

        model = ds_model.from_pretrained(path, dtype="float32")
        base = [tokenizer.encode(p) for p in prompt_list[: args.baseline_requests]]

        def sequential() -> float:
            start, tokens = time.perf_counter(), 0
            for ids in base:
                out = ds_model.generate(
                    model, ids, max_new_tokens=args.max_tokens, compile=args.compile
                )
                tokens += len(out)
            return tokens / (time.perf_counter() - start)

        sequential()  # warm-up (and, with --compile, the compile)
        engine = in_process_engine(path, "cpu", args.compile)
        servers, urls = [], {}
        try:
            for mode, flag in MODES.items():
                port = free_port()
                extra = (flag, "--compile") if args.compile else (flag,)
                servers.append(start_server(path, port, args.threads, "cpu", extra))
                urls[mode] = f"http://127.0.0.1:{port}"
            rates, itls = asyncio.run(
                measure(args, levels, urls, engine, prompt_list, prompt_ids, sequential)
            )
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=60)
            engine.shutdown()
    runs = rates[("sequential", 1)]
    seq = statistics.median(runs)
    label = "generate(compile=True)" if args.compile else "generate"
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} thread(s) per process; decode steps "
        f"{'compiled' if args.compile else 'eager'}; median of {args.repeats} rounds\n"
        f"sequential ds_model.{label}: {seq:.1f} tokens/s (rounds: "
        f"{', '.join(f'{r:.1f}' for r in runs)})\n"
    )
    print(
        f"| clients | mode | tokens/s | vs sequential {label} | vs engine thread "
        "| HTTP/SSE overhead | ITL p50 (ms) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for clients in levels:
        inproc = rates[("in-process engine", clients)]
        thread = rates[("engine thread", clients)]
        for mode in (*MODES, "in-process engine"):
            mine = rates[(mode, clients)]
            served = mode in MODES
            overhead = f"{1 - _paired(mine, inproc):.0%}" if served else ""
            itl = f"{pct(itls[(mode, clients)], 50) * 1e3:.1f}" if served else ""
            print(
                f"| {clients} | {mode} | {statistics.median(mine):.1f} | "
                f"{_paired(mine, runs):.2f}x | {_paired(mine, thread):.2f}x | {overhead} | {itl} |"
            )


def _paired(rates: list[float], baseline: list[float]) -> float:
    """The median over rounds of each round's ratio: the machine's drift between rounds
    cancels out."""
    return statistics.median(a / b for a, b in zip(rates, baseline))


if __name__ == "__main__":
    main()
