"""Serving throughput and latency: ds-serve at 1/8/32/64 concurrent streaming clients,
versus sequential ``ds_model.generate`` and transformers ``generate`` one request at a
time, on the same random DeepSeek-V3-shaped checkpoint in the same run.

The server runs as a subprocess (``python -m ds_serve.cli``) so that clients and engine
do not share a GIL; clients are asyncio + httpx streams. Per level: output tokens/s
(completion tokens from ``usage`` over wall time), time to first token p50/p99 and
inter-token latency p50/p99 (gaps between streamed chunks). Greedy decoding everywhere,
so every mode does the same work. Each figure is the median of ``--repeats`` runs; the
sequential baselines run ``--repeats`` times before the servers and again after them,
and the ratios are against the median of all those runs.

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-serve/benchmarks/bench_serve.py

``--compile`` serves with compiled decode steps and adds ``generate(compile=True)`` to
the sequential baselines; ``--in-process`` also drives the same engine in this process
without HTTP after each server run (the HTTP/SSE overhead column);
``--no-transformers`` skips that baseline; ``--stream-interval k`` is passed to the server
(k tokens per streamed event; the ITL columns then measure gaps between events).

Every process uses ``--threads`` torch threads (default 1: on a shared 2-core machine,
more threads per process spin against each other).
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
    SHAPE,
    build_checkpoint,
    engine_level,
    free_port,
    in_process_engine,
    pct,
    prompts,
    run_level,
    start_server,
)


def sequential_ds_model(path, prompt_list, max_tokens, device, compile=False):
    import ds_model

    model = ds_model.from_pretrained(path, dtype="float32", device=device)
    ids = [model.tokenizer.encode(p) for p in prompt_list]
    ds_model.generate(model, ids[0], max_new_tokens=4, compile=compile)  # warm-up
    start, tokens = time.perf_counter(), 0
    for row in ids:
        tokens += len(ds_model.generate(model, row, max_new_tokens=max_tokens, compile=compile))
    return tokens / (time.perf_counter() - start)


def sequential_transformers(path, prompt_list, max_tokens, tokenizer, device):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = model.to(device).eval()
    ids = [torch.tensor([tokenizer.encode(p)], device=device) for p in prompt_list]
    with torch.inference_mode():
        model.generate(ids[0], max_new_tokens=4, do_sample=False)
        start, tokens = time.perf_counter(), 0
        for row in ids:
            out = model.generate(
                row, max_new_tokens=max_tokens, do_sample=False, attention_mask=torch.ones_like(row)
            )
            tokens += out.shape[1] - row.shape[1]
    return tokens / (time.perf_counter() - start)


def sequential_baselines(args, path, base, tokenizer) -> tuple[list[float], ...]:
    """``--repeats`` runs of each sequential baseline (output tokens/s): ds_model
    ``generate``, ``generate(compile=True)`` with ``--compile``, and transformers unless
    ``--no-transformers``; an empty list for a baseline not run."""
    repeats = range(args.repeats)
    ds = [sequential_ds_model(path, base, args.max_tokens, args.device) for _ in repeats]
    compiled = []
    if args.compile:
        compiled = [
            sequential_ds_model(path, base, args.max_tokens, args.device, compile=True)
            for _ in repeats
        ]
    hf = []
    if not args.no_transformers:
        hf = [
            sequential_transformers(path, base, args.max_tokens, tokenizer, args.device)
            for _ in repeats
        ]
    return ds, compiled, hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="1,8,32,64")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-requests", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for every mode")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="serve with --compile (and run the in-process engine so); the sequential "
        "baselines add generate(compile=True)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="also the same engine in this process without HTTP, alternating with the "
        "server at each level: the HTTP/SSE overhead",
    )
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument(
        "--stream-interval", type=int, default=1, help="the server's --stream-interval"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]
    if args.compile:
        # Each compiled baseline run loads a new model, whose step compiles anew: past
        # dynamo's default of 8 per function the later runs would decode eagerly.
        torch._dynamo.config.recompile_limit = 64

    import ds_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-v3"
        build_checkpoint(path)
        tokenizer = ds_model.Tokenizer.from_dir(path)
        prompt_list = prompts(tokenizer, 128, args.prompt_len)
        prompt_ids = [tokenizer.encode(p) for p in prompt_list]
        base = prompt_list[: args.baseline_requests]
        before = sequential_baselines(args, path, base, tokenizer)
        engine = None
        if args.in_process:
            engine = in_process_engine(path, args.device, args.compile)
        port = free_port()
        extra = ("--compile",) if args.compile else ()
        extra += ("--stream-interval", str(args.stream_interval))
        server = start_server(path, port, args.threads, args.device, extra)
        url = f"http://127.0.0.1:{port}"
        try:
            rows = asyncio.run(measure(args, levels, url, prompt_list, prompt_ids, engine))
        finally:
            server.terminate()
            server.wait(timeout=60)
            if engine is not None:
                engine.shutdown()
        # The same baselines again after the servers: on a shared host the machine's speed
        # drifts over a run (a 1.7x swing of the sequential baseline between two runs of
        # this script 20 minutes apart), so each ratio is against the median of both.
        after = sequential_baselines(args, path, base, tokenizer)
    ds_tps, compiled_tps, hf_tps = (
        statistics.median(b + a) if b else None for b, a in zip(before, after)
    )

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} thread(s) per process, {device_name}"
    )
    print(
        f"model: random DeepSeek-V3-shaped ({SHAPE['hidden_size']} hidden, "
        f"{SHAPE['num_hidden_layers']} layers, {SHAPE['n_routed_experts']} experts), fp32; "
        f"prompts ~{args.prompt_len} tokens, {args.max_tokens} output tokens, greedy; "
        f"decode steps {'compiled' if args.compile else 'eager'}; median of {args.repeats}\n"
    )
    names = ("ds_model.generate", "ds_model.generate(compile=True)", "transformers generate")
    for name, runs_before, runs_after in zip(names, before, after):
        if runs_before:
            print(
                f"sequential {name}: {statistics.median(runs_before + runs_after):.1f} output "
                f"tokens/s (before the servers {statistics.median(runs_before):.1f}, after "
                f"{statistics.median(runs_after):.1f})"
            )
    print(
        "\n| clients | output tok/s | vs ds-model seq | vs generate(compile=True) seq "
        "| vs transformers seq | in-process engine tok/s | HTTP overhead | TTFT p50 (ms) "
        "| TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for clients, tps, inproc, t50, t99, i50, i99 in rows:
        vs_compiled = f"{tps / compiled_tps:.2f}x" if compiled_tps else ""
        vs_hf = f"{tps / hf_tps:.2f}x" if hf_tps else ""
        engine_tps = f"{inproc:.1f}" if inproc else ""
        overhead = f"{1 - tps / inproc:.0%}" if inproc else ""
        print(
            f"| {clients} | {tps:.1f} | {tps / ds_tps:.2f}x | {vs_compiled} | {vs_hf} | "
            f"{engine_tps} | {overhead} | {t50 * 1e3:.0f} | {t99 * 1e3:.0f} | "
            f"{i50 * 1e3:.1f} | {i99 * 1e3:.1f} |"
        )


async def measure(args, levels, url, prompt_list, prompt_ids, engine):
    """Per level: the server's runs, each followed by the in-process engine's (if any)."""
    await run_level(url, prompt_list, 2, 1, 8)  # warm-up
    if engine is not None:
        engine.start(asyncio.get_running_loop())
        await engine_level(engine, prompt_ids, 2, 1, 8)
    rows = []
    for clients in levels:
        per_client = max(1, 8 // clients) if clients < 8 else 2
        runs, inproc = [], []
        for _ in range(args.repeats):
            runs.append(await run_level(url, prompt_list, clients, per_client, args.max_tokens))
            if engine is not None:
                inproc.append(
                    await engine_level(engine, prompt_ids, clients, per_client, args.max_tokens)
                )
        tps = statistics.median(r[0] for r in runs)
        ttft = [t for r in runs for t in r[1]]
        itl = [t for r in runs for t in r[2]]
        engine_tps = statistics.median(inproc) if inproc else None
        rows.append(
            (clients, tps, engine_tps, pct(ttft, 50), pct(ttft, 99), pct(itl, 50), pct(itl, 99))
        )
    return rows


if __name__ == "__main__":
    main()
