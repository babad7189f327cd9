"""The in-process engine against ``ds_model.generate``: one client, and concurrent ones.

``build_engine`` loads the model (the built-in model by default) and the same model
object serves both: greedy requests stream through ``Engine.submit`` /
``Engine.stream`` (scheduler, paged runner, sampler, detokenizer; no HTTP), and
``ds_model.generate`` decodes the same prompts one at a time (sequential generate).
Nothing stops at EOS, so every request produces ``--max-tokens`` tokens. Per round, the
modes run interleaved; tokens/s are medians of ``--repeats`` rounds, and each ratio
the median of the rounds' own ratios:

- one client: tokens/s per request (prefill included), and the share of the engine's
  wall time spent inside ``runner.step`` (the rest is scheduling, sampling,
  detokenizing and handing deltas to the event loop);
- ``--clients 8,32``: total output tokens/s of that many concurrent requests;
- ``--compile``: a second engine whose decode steps run compiled per batch-size bucket
  (``decode_steps="compile"``, on its own copy of the model, compiled before timing)
  against ``generate(compile=True)`` on a copy of that model with its weights laid
  row-major again (the compiled steps re-lay float32 weights input-major; a user's
  model, and generate's batch-1 compiled step, keep row-major).

``--shape NAME`` serves a random checkpoint of one of ds-model's CPU decode benchmark
shapes (``bench_cpu_decode.SHAPES``: ``v3-110M``, ``llama-134M``; the prompts are token
ids, so its tokenizer is one word per id) instead of the built-in model, and
``--quantization`` / ``--dtype`` go to ``build_engine`` as ds-serve's options of those
names: ``generate`` then runs on the engine's own (quantized) model, so both sides read
the same weights.

Greedy outputs of the engine and ``generate`` are checked equal up to a near-tie
(``check_same_greedy``). Run:

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-serve/benchmarks/bench_engine.py \
        [--model PATH | --shape v3-110M] [--quantization int8] [--dtype bfloat16] \
        [--max-tokens 128] [--prompt-len 32] [--clients 8,32] [--compile]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ds_model
import torch
from common import stream_all
from ds_model.layout import row_major_weights
from ds_serve import build_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ds-model" / "benchmarks"))
from bench_cpu_decode import SHAPES


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


def check_same_greedy(model, prompt: list[int], served: list[int], plain: list[int], name: str):
    """The engine's greedy tokens equal ``generate``'s, or part from them only at a
    near-tie: where they first differ, the model's logits for the two choices (over the
    prompt and the common prefix) are within rounding of each other (1e-4 of the largest
    logit in float32, 2^-7 in 16-bit floats). The paged and the contiguous attention sum
    in different orders, and random weights make such ties common."""
    if served == plain:
        return
    if len(served) != len(plain):
        raise SystemExit(f"the {name} engine gave {len(served)} tokens, generate {len(plain)}")
    i = next(k for k, (a, b) in enumerate(zip(served, plain)) if a != b)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + served[:i]])).logits[0, -1].float()
    gap = (logits[served[i]] - logits[plain[i]]).abs().item()
    rounding = 2**-7 if model.dtype in (torch.bfloat16, torch.float16) else 1e-4
    allowed = rounding * logits.abs().max().item()
    if gap > allowed:
        raise SystemExit(
            f"greedy outputs of the {name} engine and generate differ at token {i}: "
            f"{served[i]} against {plain[i]}, logits {gap:.3g} apart (a tie is within {allowed:.3g})"
        )
    print(f"note: the {name} engine and generate part at token {i} on a tie ({gap:.2g} apart)")


def random_checkpoint(shape: str, path: Path) -> None:
    """A random ``shape`` checkpoint (seed 0) and a tokenizer with one word per id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = dict(SHAPES[shape], bos_token_id=1, eos_token_id=2)
    ds_model.from_config(config, dtype=torch.float32, seed=0).save_pretrained(path)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    words.update({f"t{i}": i for i in range(3, config["vocab_size"])})
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (path / "tokenizer_config.json").write_text(json.dumps(special))


def start_engine(path, compiled: bool, **options):
    if compiled:
        options["decode_steps"] = "compile"
    engine = build_engine(path, device="cpu", **options)
    engine.runner = TimedRunner(engine.runner)
    engine.start(asyncio.get_running_loop())
    return engine


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="a model directory; default: built-in")
    source.add_argument("--shape", choices=list(SHAPES), help="a random checkpoint of this shape")
    parser.add_argument("--quantization", choices=["int8", "int4"], default=None)
    parser.add_argument("--dtype", default="auto", help="ds-serve's --dtype (auto: float32 on CPU)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients", default="", help="concurrency levels, e.g. 8,32")
    parser.add_argument("--compile", action="store_true", help="also the compiled decode steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.clients.split(",") if c]
    options = {"quantization": args.quantization, "dtype": args.dtype}
    with tempfile.TemporaryDirectory() as scratch:
        path = args.model
        if args.shape:
            path = Path(scratch)
            random_checkpoint(args.shape, path)
        engines = {"eager": start_engine(path, compiled=False, **options)}
        if args.compile:
            engines["compiled"] = start_engine(path, compiled=True, **options)
    models = {name: e.runner.runner.model for name, e in engines.items()}
    # generate's model for each engine: the eager engine's own; for the compiled one a
    # copy laid row-major again, as a user's model is (the engine's compiled steps re-lay
    # its float32 weights input-major, a layout batch-1 generate(compile=True) avoids).
    baselines = dict(models)
    if "compiled" in models:
        baselines["compiled"] = copy.deepcopy(models["compiled"])
        row_major_weights(baselines["compiled"])
    gen = torch.Generator().manual_seed(0)
    vocab = models["eager"].config.vocab_size
    prompts = [
        torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist()
        for _ in range(max([1, *levels]))
    ]
    for name, engine in engines.items():  # warm-up (and generate's compile)
        await engine_run(engine, prompts[:1], 8)
        generate_run(baselines[name], prompts[0], 8, compile=name == "compiled")
    rates: dict[tuple[str, str, int], list[float]] = {}
    shares: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            rate, share, (served,) = await engine_run(engine, prompts[:1], args.max_tokens)
            rates.setdefault(("engine", name, 1), []).append(rate)
            shares.setdefault(name, []).append(share)
            rate, plain = generate_run(
                baselines[name], prompts[0], args.max_tokens, name != "eager"
            )
            rates.setdefault(("generate", name, 1), []).append(rate)
            check_same_greedy(models[name], prompts[0], served, plain, name)
            for clients in levels:
                rate, _, _ = await engine_run(engine, prompts[:clients], args.max_tokens)
                rates.setdefault(("engine", name, clients), []).append(rate)
    for engine in engines.values():
        engine.shutdown()
    median = {key: statistics.median(values) for key, values in rates.items()}

    def vs(key, base) -> str:
        # The median of the rounds' own ratios: the host's drift between rounds (this
        # one's speed moves by up to 40% within minutes) falls on both sides of each.
        if base not in rates:
            return ""
        return f"{statistics.median(a / b for a, b in zip(rates[key], rates[base])):.2f}x"

    print(
        f"\n{args.shape or args.model or 'built-in model'}, {args.quantization or 'no'} "
        f"quantization, {args.prompt_len}-token prompts, {args.max_tokens} new tokens each, "
        f"{models['eager'].dtype}, {args.threads} thread(s), torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, median of {args.repeats}\n"
    )
    print(
        "| path | steps | clients | tokens/s | vs generate | vs generate(compile=True) | runner.step share |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for (kind, name, clients), rate in median.items():
        label = "ds_model.generate" if kind == "generate" else "Engine, in-process"
        key = (kind, name, clients)
        share = (
            f"{statistics.median(shares[name]):.0%}" if kind == "engine" and clients == 1 else ""
        )
        print(
            f"| {label} | {name} | {clients} | {rate:.1f} | {vs(key, ('generate', 'eager', 1))} | "
            f"{vs(key, ('generate', 'compiled', 1))} | {share} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
