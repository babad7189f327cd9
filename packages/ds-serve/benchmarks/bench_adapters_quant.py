"""What LoRA adapters and quantization cost a serving run: output tokens/s and inter-token
latency of ds-serve at N concurrent streaming clients, on the same random
DeepSeek-V3-shaped checkpoint as bench_serve.py, in one run:

- ``plain``: no adapters (the baseline every ratio is against);
- ``lora, base only``: the same server with 4 adapters loaded, every request for the base
  model (each step still names a ``None`` adapter per row: the mixed-adapter path);
- ``lora, mixed``: requests round-robin over the base model and the 4 adapters, so every
  batch mixes five models;
- ``bf16``: no adapters, ``--dtype bfloat16``;
- ``int8`` / ``int4``: no adapters, ``--quantization int8`` / ``int4``.

``--compile`` starts every server with ``--compile`` (decode steps through
``torch.compile``, built before the server listens).

Adapters: rank 16, random non-zero B, on every linear layer but kv_b_proj (the numbers
in docs/benchmarks.md were taken that way, when ds-model's runner could not yet mix
adapters on it). Median of ``--repeats``.

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-serve/benchmarks/bench_adapters_quant.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    SHAPE,
    build_checkpoint,
    free_port,
    pct,
    prompts,
    run_level,
    start_server,
)

TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj", "gate_proj", "up_proj"]
TARGETS += ["down_proj"]
ADAPTERS = ("a0", "a1", "a2", "a3")


def write_adapters(path: Path, out: Path) -> list[str]:
    import ds_lora
    import ds_model

    flags = []
    for i, name in enumerate(ADAPTERS):
        model = ds_model.from_pretrained(path, dtype="float32")
        ds_lora.inject(model, ds_lora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        ds_lora.save_adapter(model, out / name)
        flags += ["--lora", f"{name}={out / name}"]
    return flags


def measure(path, port, args, extra, models, prompt_list, levels):
    server = start_server(path, port, args.threads, "cpu", tuple(extra))
    url = f"http://127.0.0.1:{port}"
    out = {}
    try:
        asyncio.run(run_level(url, prompt_list, 2, 1, 8, models))  # warm-up
        for clients in levels:
            runs = [
                asyncio.run(run_level(url, prompt_list, clients, 2, args.max_tokens, models))
                for _ in range(args.repeats)
            ]
            itl = [t for r in runs for t in r[2]]
            out[clients] = (statistics.median(r[0] for r in runs), pct(itl, 50))
    finally:
        server.terminate()
        server.wait(timeout=60)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="8,32")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default=None, help="comma-separated subset, plain first")
    parser.add_argument("--compile", action="store_true", help="serve with --compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]
    import ds_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-v3"
        build_checkpoint(path)
        lora_flags = write_adapters(path, Path(tmp))
        prompt_list = prompts(ds_model.Tokenizer.from_dir(path), 128, args.prompt_len)
        modes = {
            "plain": ([], (None,)),
            "lora, base only": (lora_flags, (None,)),
            "lora, mixed": (lora_flags, (None, *ADAPTERS)),
            "bf16": (["--dtype", "bfloat16"], (None,)),
            "int8": (["--quantization", "int8"], (None,)),
            "int4": (["--quantization", "int4"], (None,)),
        }
        if args.modes:
            modes = {mode: modes[mode] for mode in ["plain", *args.modes.split(",")]}
        compile_flag = ["--compile"] if args.compile else []
        results = {
            mode: measure(
                path, free_port(), args, [*extra, *compile_flag], models, prompt_list, levels
            )
            for mode, (extra, models) in modes.items()
        }

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} thread(s) per process, CPU"
    )
    print(
        f"model: random DeepSeek-V3-shaped ({SHAPE['hidden_size']} hidden, "
        f"{SHAPE['num_hidden_layers']} layers), activations in each mode's dtype; prompts ~{args.prompt_len} "
        f"tokens, {args.max_tokens} output tokens, greedy; median of {args.repeats}; "
        f"decode steps {'compiled' if args.compile else 'eager'}\n"
    )
    print("| mode | clients | output tok/s | vs plain | ITL p50 (ms) |")
    print("|---|---|---|---|---|")
    for mode, by_level in results.items():
        for clients, (tps, itl) in by_level.items():
            ratio = tps / results["plain"][clients][0]
            print(f"| {mode} | {clients} | {tps:.1f} | {ratio:.2f}x | {itl * 1e3:.1f} |")


if __name__ == "__main__":
    main()
