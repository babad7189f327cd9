"""Batch decode step: the serving runner's paged step against ``generate``'s step.

Both run one decode token for each of ``--batch`` sequences that already hold
``context - 1`` cached tokens, on the same model in the same process:

- ``runner``: ``ModelRunner.step`` over the paged block pool (what ds-serve runs);
- ``generate``: ``ds_model.generate``'s eager step, the model over a ``StaticKVCache``.

Each timed step rewrites the same position, so the context stays fixed. Figures are
medians of ``--repeats`` rounds of ``--steps`` steps, the two paths interleaved. Prints
a markdown table with the runner/generate ratio and each context's step over the first
context's. Run:

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-model/benchmarks/bench_paged_decode.py \
        [--model models/ds-tiny-coder] [--contexts 32 256 960] [--batch 8]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import ds_model
import torch
from ds_model.cache import StaticKVCache

ROOT = Path(__file__).resolve().parents[3]


def runner_step(model, batch: int, context: int, block_size: int):
    """A closure running one paged batch decode step at ``context``."""
    blocks_per_seq = -(-context // block_size)
    runner = ds_model.ModelRunner(model, num_blocks=batch * blocks_per_seq, block_size=block_size)
    tables = [list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) for s in range(batch)]
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (batch, context - 1), generator=gen).tolist()
    runner.step(prompts, [0] * batch, tables)
    last = [[p[-1]] for p in prompts]
    positions = [context - 1] * batch
    return lambda: runner.step(last, positions, tables)


def generate_step(model, batch: int, context: int):
    """A closure running ``generate``'s eager decode step at ``context``."""
    config = model.config
    cache = StaticKVCache(config, batch, context, model.dtype, model.device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, context - 1), generator=gen)
    with torch.inference_mode():
        model(ids, cache=cache, logits_to_keep=1)
    token = ids[:, -1]
    positions = torch.full((batch, 1), context - 1, dtype=torch.long)

    def step():
        with torch.inference_mode():
            cache.length = context - 1
            hidden = model.model(token[:, None], positions, cache=cache.writer(1), history=True)
            cache.length += 1
            return model.lm_head(hidden[:, -1])

    return step


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "ds-tiny-coder"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 256, 960])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", help="float32 is what ds-serve runs on CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = ds_model.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    rows = []
    for context in args.contexts:
        paged = runner_step(model, args.batch, context, args.block_size)
        static = generate_step(model, args.batch, context)
        paged(), static()  # warm-up
        runner_t, generate_t = [], []
        for _ in range(args.repeats):
            runner_t.append(timed(paged, args.steps))
            generate_t.append(timed(static, args.steps))
        rows.append((context, statistics.median(runner_t), statistics.median(generate_t)))
    print(
        f"\nbatch-{args.batch} decode step, {Path(args.model).name}, {model.dtype}, "
        f"{args.threads} thread(s), block_size {args.block_size}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}\n"
    )
    print(
        "| context | runner step (ms) | generate step (ms) | runner / generate | runner / runner@first |"
    )
    print("|---:|---:|---:|---:|---:|")
    first = rows[0][1]
    for context, r, g in rows:
        print(f"| {context} | {r * 1e3:.2f} | {g * 1e3:.2f} | {r / g:.2f}x | {r / first:.2f}x |")


if __name__ == "__main__":
    main()
