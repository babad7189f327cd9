"""One client through the in-process engine against ``ds_model.generate`` (eager).

The same model object serves both: ``build_engine`` loads it (the built-in model by
default), one greedy request at a time streams through ``Engine.submit`` /
``Engine.stream`` (scheduler, paged runner, sampler, detokenizer; no HTTP), and
``ds_model.generate`` decodes the same prompt. Neither stops at EOS, so both produce
``--max-tokens`` tokens. Tokens/s per request (prefill included), medians of
``--repeats`` rounds, the two interleaved in each round; also the share of the engine's
wall time spent inside ``runner.step`` (the rest is scheduling, sampling,
detokenizing and handing each delta to the event loop). Run:

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-serve/benchmarks/bench_engine.py \
        [--model PATH] [--max-tokens 128] [--prompt-len 32]
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
from ds_serve import SamplingParams, build_engine


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


async def engine_run(engine, prompt: list[int], max_tokens: int) -> tuple[float, float, list[int]]:
    """(tokens/s, share of the wall time in runner.step, tokens)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engine.runner.seconds = 0.0
    start = time.perf_counter()
    request_id = engine.submit(prompt, params)
    tokens: list[int] = []
    async for delta in engine.stream(request_id):
        tokens.extend(delta.token_ids)
    wall = time.perf_counter() - start
    return len(tokens) / wall, engine.runner.seconds / wall, tokens


def generate_run(model, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    config, tokenizer = model.config, model.tokenizer
    model.config = dataclasses.replace(config, eos_token_id=None)
    model.tokenizer = None  # its EOS id would stop generate early
    try:
        start = time.perf_counter()
        tokens = ds_model.generate(model, prompt, max_new_tokens=max_tokens)
        return len(tokens) / (time.perf_counter() - start), list(tokens)
    finally:
        model.config, model.tokenizer = config, tokenizer


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory; default: built-in")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = build_engine(args.model, device="cpu")
    model = engine.runner.model
    engine.runner = TimedRunner(engine.runner)
    engine.start(asyncio.get_running_loop())
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (args.prompt_len,), generator=gen).tolist()
    await engine_run(engine, prompt, 8)  # warm-up
    generate_run(model, prompt, 8)
    served, plain, shares = [], [], []
    for _ in range(args.repeats):
        rate, share, served_tokens = await engine_run(engine, prompt, args.max_tokens)
        served.append(rate)
        shares.append(share)
        rate, plain_tokens = generate_run(model, prompt, args.max_tokens)
        plain.append(rate)
        if served_tokens != plain_tokens:
            raise SystemExit("greedy outputs differ between the engine and generate")
    engine.shutdown()
    s, g = statistics.median(served), statistics.median(plain)
    print(
        f"\none client, {args.prompt_len}-token prompt, {args.max_tokens} new tokens, "
        f"{model.dtype}, {args.threads} thread(s), torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}\n"
    )
    share = statistics.median(shares)
    print("| path | tokens/s | vs generate | runner.step share of wall time |")
    print("|---|---:|---:|---:|")
    print(f"| ds_model.generate (eager) | {g:.1f} | 1.00x | |")
    print(f"| Engine, in-process | {s:.1f} | {s / g:.2f}x | {share:.0%} |")


if __name__ == "__main__":
    asyncio.run(main())
