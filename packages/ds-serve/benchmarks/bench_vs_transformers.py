"""ds-serve against transformers' continuous batching on one llama-shaped checkpoint.

A random llama (GQA) checkpoint is saved once in Hugging Face's format (safetensors +
config.json, a SentencePiece tokenizer trained on local standard-library source); every
contender loads those same files. Each round sends the same ``--clients`` concurrent
requests (the same ~32-token prompts, ``--max-tokens`` new tokens each, greedy, EOS
ignored) to, in turn:

- transformers' continuous batching in this process: ``init_continuous_batching``
  (paged cache, SDPA attention; its background thread steps the batch) with batching
  limits matched to ds-serve's: ``max_batch_tokens`` = ``max_num_batched_tokens``,
  ``max_requests_per_batch`` = ``max_num_seqs``, ``page_size`` = ``block_size`` and
  ``num_blocks`` = the ds-serve engine's pool;
- ds-serve's engine in this process (no HTTP), eager decode steps;
- the same engine with decode steps compiled per batch-size bucket
  (``decode_steps="compile"``, compiled before timing);
- the ds-serve HTTP server (a ``python -m ds_serve.cli`` subprocess, eager steps)
  under that many concurrent streaming clients.

Output tokens/s = generated tokens over the wall time from submitting the first request
to the last one finishing. Contenders are interleaved within each round; figures are
medians of ``--repeats`` rounds; ratios are the median of the per-round ratios against
transformers (and their range).
Every process runs ``--threads`` torch threads (default 1). Greedy outputs of
transformers and of each engine are compared (same weights, same float32 math up to
summation order) and the share of identical requests printed.

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-serve/benchmarks/bench_vs_transformers.py

``--deepseek-v3`` only checks whether transformers' continuous batching runs the
DeepSeek-V3 (MLA) shape of ``bench_serve.py`` at all, and prints its error if not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import (
    MAX_NUM_BATCHED_TOKENS,
    MAX_NUM_SEQS,
    free_port,
    in_process_engine,
    start_server,
    stream_all,
    write_stdlib_tokenizer,
)
from common import prompts as prompt_texts

SHAPES = {
    # ~85M parameters: DeepSeek-LLM's layout (llama, GQA 3:1) at GPT-2-small width.
    "100m": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
    },
    # ~7M parameters, the size class of the other ds-serve tables (per-step overheads count).
    "small": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
    },
}
VOCAB = 4096
BLOCK_SIZE = 16


def build_checkpoint(path: Path, shape: dict) -> int:
    """Random llama weights saved by transformers; returns the parameter count."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        **shape,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    write_stdlib_tokenizer(path, VOCAB)
    return sum(p.numel() for p in model.parameters())


# ---- transformers' continuous batching ---------------------------------------------------


def start_transformers(path: Path, num_blocks: int, max_tokens: int):
    import transformers
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    generation = GenerationConfig(
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    batching = ContinuousBatchingConfig(
        page_size=BLOCK_SIZE,
        num_blocks=num_blocks,
        max_batch_tokens=MAX_NUM_BATCHED_TOKENS,
        max_requests_per_batch=MAX_NUM_SEQS,
    )
    manager = model.init_continuous_batching(
        generation_config=generation, continuous_batching_config=batching
    )
    manager.start()
    return manager


def transformers_run(manager, prompts: list[list[int]], max_tokens: int):
    """(output tokens/s, generated ids per prompt) of all ``prompts`` at once."""
    start = time.perf_counter()
    ids = manager.add_requests(inputs=prompts, max_new_tokens=max_tokens)
    results = {}
    while len(results) < len(ids):
        result = manager.get_result(timeout=600)
        if result is None:
            raise RuntimeError("transformers' continuous batching stopped answering")
        if result.error is not None:
            raise RuntimeError(f"transformers' continuous batching failed: {result.error}")
        if result.is_finished():
            results[result.request_id] = result.generated_tokens
    wall = time.perf_counter() - start
    outputs = [list(results[i]) for i in ids]
    return sum(map(len, outputs)) / wall, outputs


# ---- ds-serve: in-process engine and HTTP server -------------------------------------------


async def engine_run(engine, prompts: list[list[int]], max_tokens: int):
    """(output tokens/s, generated ids per prompt) of all ``prompts`` at once."""
    outputs, wall = await stream_all(engine, prompts, max_tokens)
    return sum(map(len, outputs)) / wall, outputs


async def server_run(url: str, prompts: list[str], max_tokens: int) -> float:
    """Output tokens/s (``usage.completion_tokens``) of one streaming client per prompt."""
    import httpx

    tokens = 0

    async def one(client, prompt: str) -> None:
        nonlocal tokens
        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        tokens += usage["completion_tokens"]

    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, p) for p in prompts))
        return tokens / (time.perf_counter() - start)


def transformers_on_deepseek_v3() -> str:
    """Whether transformers' continuous batching runs the DeepSeek-V3 shape of the other
    ds-serve tables (MLA) on this device: its two greedy requests' outcome, or the error."""
    import transformers
    from common import SHAPE
    from transformers import ContinuousBatchingConfig, GenerationConfig

    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        **SHAPE, num_key_value_heads=SHAPE["num_attention_heads"], max_position_embeddings=1024
    )
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    out = model.generate_batch(
        [[1, 5, 6, 7, 8, 9], [1, 10, 11, 12]],
        generation_config=GenerationConfig(
            max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=0
        ),
        continuous_batching_config=ContinuousBatchingConfig(
            page_size=BLOCK_SIZE, num_blocks=64, max_batch_tokens=256
        ),
    )
    errors = {r.error for r in out.values() if r.error is not None}
    if errors or len(out) != 2:
        return f"fails: {'; '.join(sorted(errors)) or 'requests missing'}"
    return f"works: {[r.generated_tokens for r in out.values()]}"


# ---- the run -------------------------------------------------------------------------------


async def measure(args, path: Path, levels: list[int]) -> tuple[dict, dict, int]:
    import ds_model

    tokenizer = ds_model.Tokenizer.from_dir(path)
    texts = prompt_texts(tokenizer, max(levels), args.prompt_len)
    prompts = [tokenizer.encode(t) for t in texts]
    loop = asyncio.get_running_loop()
    engines = {"eager": in_process_engine(path, "cpu", compiled=False, block_size=BLOCK_SIZE)}
    if not args.no_compile:
        engines["compiled"] = in_process_engine(path, "cpu", compiled=True, block_size=BLOCK_SIZE)
    for engine in engines.values():
        engine.start(loop)
    num_blocks = engines["eager"].runner.num_blocks
    manager = start_transformers(path, num_blocks, args.max_tokens)
    port = free_port()
    # A longer wait than start_server's default: the 100m shape's checkpoint loads slower.
    server = start_server(
        path, port, args.threads, "cpu", ("--block-size", str(BLOCK_SIZE)), ready_timeout=300
    )
    url = f"http://127.0.0.1:{port}"
    rates: dict[tuple[str, int], list[float]] = {}
    same: dict[tuple[str, int], float] = {}
    try:
        # warm-up: every contender once at the largest level
        transformers_run(manager, prompts[: max(levels)], 8)
        for engine in engines.values():
            await engine_run(engine, prompts[: max(levels)], 8)
        await server_run(url, texts[: max(levels)], 8)
        for round_ in range(args.repeats):
            for clients in levels:
                rate, hf_out = transformers_run(manager, prompts[:clients], args.max_tokens)
                rates.setdefault(("transformers", clients), []).append(rate)
                for name, engine in engines.items():
                    rate, ours = await engine_run(engine, prompts[:clients], args.max_tokens)
                    rates.setdefault((name, clients), []).append(rate)
                    if round_ == 0:
                        same[(name, clients)] = sum(a == b for a, b in zip(hf_out, ours)) / clients
                rate = await server_run(url, texts[:clients], args.max_tokens)
                rates.setdefault(("server", clients), []).append(rate)
                print(
                    f"round {round_ + 1}, {clients} clients: "
                    + ", ".join(f"{k[0]} {v[-1]:.1f}" for k, v in rates.items() if k[1] == clients),
                    f"(load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(timeout=60)
        manager.stop(block=True, timeout=30)
        for engine in engines.values():
            engine.shutdown()
    return rates, same, num_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="100m")
    parser.add_argument("--clients", default="8,32", help="concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled engine")
    parser.add_argument(
        "--deepseek-v3",
        action="store_true",
        help="only check whether transformers' continuous batching runs the V3 (MLA) shape",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.deepseek_v3:
        import transformers

        print(
            f"transformers {transformers.__version__}, continuous batching on DeepSeek-V3 "
            f"(MLA), CPU: {transformers_on_deepseek_v3()}"
        )
        return
    levels = [int(c) for c in args.clients.split(",") if c]
    import transformers

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-llama"
        params = build_checkpoint(path, SHAPES[args.shape])
        rates, same, num_blocks = asyncio.run(measure(args, path, levels))
    load_after = os.getloadavg()
    shape = SHAPES[args.shape]
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, {args.threads} "
        f"thread(s) per process; load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after"
    )
    print(
        f"model: random llama, {params / 1e6:.0f}M parameters (hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads / "
        f"{shape['num_key_value_heads']} kv heads, vocab {VOCAB}), float32; "
        f"~{args.prompt_len}-token prompts, {args.max_tokens} new tokens, greedy, EOS ignored; "
        f"median of {args.repeats}"
    )
    print(
        f"batching, both sides: {MAX_NUM_SEQS} sequences and {MAX_NUM_BATCHED_TOKENS} tokens per "
        f"step, {BLOCK_SIZE}-token blocks, {num_blocks} blocks; transformers: "
        f"init_continuous_batching, attn_implementation='sdpa'"
    )
    print(
        "requests whose greedy output is identical to transformers': "
        + ", ".join(f"{name} {share:.0%} at {c}" for (name, c), share in same.items())
        + "\n"
    )
    labels = {
        "transformers": "transformers continuous batching",
        "eager": "ds-serve engine, in-process, eager",
        "compiled": "ds-serve engine, in-process, compiled",
        "server": "ds-serve HTTP server (eager)",
    }
    print("| path | clients | output tok/s | vs transformers | per-round ratios |")
    print("|---|---:|---:|---:|---|")
    for clients in levels:
        base = rates[("transformers", clients)]
        for name, label in labels.items():
            if (name, clients) not in rates:
                continue
            runs = rates[(name, clients)]
            # Contenders alternate within a round, so a round's ratio sees the same load.
            ratios = [r / b for r, b in zip(runs, base)]
            spread = "" if name == "transformers" else f"{min(ratios):.2f}-{max(ratios):.2f}x"
            print(
                f"| {label} | {clients} | {statistics.median(runs):.1f} | "
                f"{statistics.median(ratios):.2f}x | {spread} |"
            )


if __name__ == "__main__":
    main()
