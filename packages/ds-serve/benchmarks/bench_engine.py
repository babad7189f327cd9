"""The in-process engine against ``ds_model.generate``: one client, and concurrent ones.

``build_engine`` loads the model (the built-in model by default) and the same model
object serves both: greedy requests stream through ``Engine.submit`` /
``Engine.stream`` (scheduler, paged runner, sampler, detokenizer; no HTTP), and
``ds_model.generate`` decodes the same prompts one at a time (sequential generate).
Nothing stops at EOS, so every request produces ``--max-tokens`` tokens. Per round, the
modes run interleaved; figures are medians of ``--repeats`` rounds:

- one client: tokens/s per request (prefill included), and the share of the engine's
  wall time spent inside ``runner.step`` (the rest is scheduling, sampling,
  detokenizing and handing deltas to the event loop);
- ``--clients 8,32``: total output tokens/s of that many concurrent requests;
- ``--compile``: a second engine whose decode steps run compiled per batch-size bucket
  (``decode_steps="compile"``, on its own copy of the model, compiled before timing)
  against ``generate(compile=True)`` on that copy.

Greedy outputs of the engine and ``generate`` are checked equal. Run:

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-serve/benchmarks/bench_engine.py \
        [--model PATH] [--max-tokens 128] [--prompt-len 32] [--clients 8,32] [--compile]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import platform
import statistics
import time

import ds_model
import torch
from common import stream_all
from ds_serve import build_engine


class TimedRunner:
    """Wraps the engine's runner, summing the wall time of its steps."""

    def __init__(self, runner) -> None:
        self.runner, self.seconds = runner, 0.0

    def step(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.runner.step(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


async def engine_run(engine, prompts: list[list[int]], max_tokens: int):
    """All ``prompts`` at once: (total tokens/s, share of the wall time in runner.step,
    each request's tokens)."""
    engine.runner.seconds = 0.0
    outputs, wall = await stream_all(engine, prompts, max_tokens)
    return sum(map(len, outputs)) / wall, engine.runner.seconds / wall, outputs


def generate_run(model, prompt: list[int], max_tokens: int, compile: bool = False):
    config, tokenizer = model.config, model.tokenizer
    model.config = dataclasses.replace(config, eos_token_id=None)
    model.tokenizer = None  # its EOS id would stop generate early
    try:
        start = time.perf_counter()
        tokens = ds_model.generate(model, prompt, max_new_tokens=max_tokens, compile=compile)
        return len(tokens) / (time.perf_counter() - start), list(tokens)
    finally:
        model.config, model.tokenizer = config, tokenizer


def start_engine(path, compiled: bool):
    options = {"decode_steps": "compile"} if compiled else {}
    engine = build_engine(path, device="cpu", **options)
    engine.runner = TimedRunner(engine.runner)
    engine.start(asyncio.get_running_loop())
    return engine


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory; default: built-in")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients", default="", help="concurrency levels, e.g. 8,32")
    parser.add_argument("--compile", action="store_true", help="also the compiled decode steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.clients.split(",") if c]
    engines = {"eager": start_engine(args.model, compiled=False)}
    if args.compile:
        engines["compiled"] = start_engine(args.model, compiled=True)
    models = {name: e.runner.runner.model for name, e in engines.items()}
    gen = torch.Generator().manual_seed(0)
    vocab = models["eager"].config.vocab_size
    prompts = [
        torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist()
        for _ in range(max([1, *levels]))
    ]
    for name, engine in engines.items():  # warm-up (and generate's compile)
        await engine_run(engine, prompts[:1], 8)
        generate_run(models[name], prompts[0], 8, compile=name == "compiled")
    rates: dict[tuple[str, str, int], list[float]] = {}
    shares: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            rate, share, (served,) = await engine_run(engine, prompts[:1], args.max_tokens)
            rates.setdefault(("engine", name, 1), []).append(rate)
            shares.setdefault(name, []).append(share)
            rate, plain = generate_run(models[name], prompts[0], args.max_tokens, name != "eager")
            rates.setdefault(("generate", name, 1), []).append(rate)
            if served != plain:
                raise SystemExit(f"greedy outputs differ between the {name} engine and generate")
            for clients in levels:
                rate, _, _ = await engine_run(engine, prompts[:clients], args.max_tokens)
                rates.setdefault(("engine", name, clients), []).append(rate)
    for engine in engines.values():
        engine.shutdown()
    median = {key: statistics.median(values) for key, values in rates.items()}
    eager, compiled = median[("generate", "eager", 1)], median.get(("generate", "compiled", 1))
    print(
        f"\n{args.prompt_len}-token prompts, {args.max_tokens} new tokens each, "
        f"{models['eager'].dtype}, {args.threads} thread(s), torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, median of {args.repeats}\n"
    )
    print(
        "| path | steps | clients | tokens/s | vs generate | vs generate(compile=True) | runner.step share |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for (kind, name, clients), rate in median.items():
        label = "ds_model.generate" if kind == "generate" else "Engine, in-process"
        vs_compiled = f"{rate / compiled:.2f}x" if compiled else ""
        share = (
            f"{statistics.median(shares[name]):.0%}" if kind == "engine" and clients == 1 else ""
        )
        print(
            f"| {label} | {name} | {clients} | {rate:.1f} | {rate / eager:.2f}x | "
            f"{vs_compiled} | {share} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
