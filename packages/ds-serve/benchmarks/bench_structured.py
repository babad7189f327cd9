"""Decode throughput with ``response_format: json_schema`` versus unconstrained, in the
same run, at 8 and 32 concurrent requests on the built-in model.

The engine is driven in-process (its HTTP layer is the same in both modes). Every
request decodes exactly ``--max-tokens`` tokens in both modes: EOS is masked for both,
and the schema (an array of at least 100 records) cannot be complete sooner, so the two
modes do the same model work and differ only by the grammar: compiling it per request,
filling the token masks of the batch every step, applying them to the logits and
advancing each matcher. Greedy decoding. Modes alternate within each repeat; figures
are medians over ``--repeats``. On a shared machine the model step's time swings more
than the grammar costs, so the time spent masking (the engine's ``_allowed``: mask
fill, unpacking, applying) is also reported as a share of the constrained run's wall time.

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-serve/benchmarks/bench_structured.py
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time

import torch
from ds_serve.sampling import SamplingParams
from ds_serve.server import build_engine
from ds_serve.structured import GrammarSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "rows": {
            "type": "array",
            "minItems": 100,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 999},
                    "name": {"type": "string", "maxLength": 8},
                },
                "required": ["id", "name"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["rows"],
    "additionalProperties": False,
}
PROMPT = "# Answer in JSON: a list of records.\n"


def forbid_eos(engine) -> None:
    step, eos = engine.runner.step, list(engine.eos_token_ids)

    def step_without_eos(*args, **kwargs):
        logits = step(*args, **kwargs).clone()
        logits[:, eos] = float("-inf")
        return logits

    engine.runner.step = step_without_eos


def time_masking(engine) -> list[float]:
    """Accumulates the seconds the engine spends in ``_allowed`` into the returned cell."""
    spent = [0.0]
    allowed = engine._allowed

    def timed(*args):
        start = time.perf_counter()
        out = allowed(*args)
        spent[0] += time.perf_counter() - start
        return out

    engine._allowed = timed
    return spent


async def run(engine, concurrency: int, max_tokens: int, constrained: bool) -> float:
    """Output tokens/s of ``concurrency`` requests submitted at once."""
    prompt = engine.tokenizer.encode(PROMPT)
    queue: asyncio.Queue = asyncio.Queue()
    start = time.perf_counter()
    for _ in range(concurrency):
        grammar = None
        if constrained:
            grammar = engine.grammar_compiler.compile(GrammarSpec("json_schema", SCHEMA, True))
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        engine.submit(prompt, params, queue=queue, grammar=grammar)
    tokens, finished = 0, 0
    while finished < concurrency:
        delta = await queue.get()
        tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            finished += 1
            if delta.finish_reason != "length":
                raise RuntimeError(f"a request ended early ({delta.finish_reason})")
    elapsed = time.perf_counter() - start
    if tokens != concurrency * max_tokens:
        raise RuntimeError(f"decoded {tokens} tokens, expected {concurrency * max_tokens}")
    return tokens / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = build_engine(None, max_num_seqs=64)
    forbid_eos(engine)
    masking = time_masking(engine)
    engine.start(asyncio.get_running_loop())
    levels = [int(x) for x in args.levels.split(",")]
    await run(engine, 4, 8, True)  # warm-up: vocabulary read, first steps
    await run(engine, 4, 8, False)
    results: dict[tuple[int, bool], list[float]] = {}
    shares: dict[int, list[float]] = {}
    for repeat in range(args.repeats):
        for level in levels:
            # Alternate which mode goes first, so drift in the shared machine hits both.
            for constrained in (repeat % 2 == 0, repeat % 2 == 1):
                masking[0] = 0.0
                tps = await run(engine, level, args.max_tokens, constrained)
                results.setdefault((level, constrained), []).append(tps)
                if constrained:
                    wall = level * args.max_tokens / tps
                    shares.setdefault(level, []).append(masking[0] / wall)
    engine.shutdown()
    print(f"machine: {platform.machine()}, torch {torch.__version__}, 1 thread")
    print(f"built-in model, greedy, {args.max_tokens} tokens per request, {args.repeats} repeats\n")
    print("| concurrent | unconstrained tok/s | json_schema tok/s | ratio | masking share |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for level in levels:
        free = statistics.median(results[(level, False)])
        constrained = statistics.median(results[(level, True)])
        share = statistics.median(shares[level])
        print(
            f"| {level} | {free:.0f} | {constrained:.0f} | {constrained / free:.3f} | {share:.1%} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
