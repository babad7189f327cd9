"""Training tokens/s and held-out loss of each attention pattern against dense attention,
on the architecture of the shipped model (models/ds-tiny-coder/config.json: MLA +
DeepSeekMoE) at a 4K context, in the same run on the same tokens.

Every pattern starts from the same weights (the dense model's; a pattern's own
parameters, NSA's compression and gate or the gated pattern's gate, from the same
seed) and trains the same ``--steps`` batches of one ``--context``-token sequence with
AdamW; the patterns take turns step by step, so machine load falls on all of them
alike. Tokens/s is the median over the steps after the first of each pattern; the
held-out loss is the mean next-token loss over ``--context`` tokens of the shipped
model's held-out sample after training. Training text: this repository's Python
sources, tokenized with the shipped tokenizer. One torch thread.

    uv run --frozen python packages/ds-model/benchmarks/bench_attention_patterns.py
        [--steps 4] [--context 4096]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import ds_model
import torch
from ds_model import ModelConfig

ROOT = Path(__file__).resolve().parents[3]
MODEL_DIR = ROOT / "models" / "ds-tiny-coder"

# The published shapes of each pattern at a 4K context (NSA: Yuan et al.'s block 64,
# 16 selected blocks, 512-token window; block-sparse keeps a quarter of the blocks).
PATTERNS = {
    "dense": {"kind": "dense"},
    "sliding_window": {"kind": "sliding_window", "window": 512},
    "dynamic_window": {"kind": "dynamic_window"},
    "block_sparse": {"kind": "block_sparse", "sparse_ratio": 0.25, "block_size": 64},
    "nsa": {"kind": "nsa", "block_size": 64, "num_selected": 16, "window": 512},
    "gated": {"kind": "gated"},
}


def tokens(tokenizer, texts: list[str], count: int) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        if len(ids) >= count:
            break
    return torch.tensor(ids[:count])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(1)

    raw = json.loads((MODEL_DIR / "config.json").read_text())
    raw["max_position_embeddings"] = max(args.context, raw["max_position_embeddings"])
    tokenizer = ds_model.load_tokenizer(MODEL_DIR)
    sources = sorted((ROOT / "packages").glob("*/src/**/*.py"))
    train = tokens(tokenizer, [p.read_text() for p in sources], args.steps * args.context)
    if train.numel() < args.steps * args.context:
        raise SystemExit(f"only {train.numel()} training tokens; lower --steps or --context")
    batches = train.view(args.steps, 1, args.context)
    heldout_texts = [
        json.loads(line)["text"]
        for line in (MODEL_DIR / "heldout-sample.jsonl").read_text().splitlines()
    ]
    heldout = tokens(tokenizer, heldout_texts, args.context)[None]

    dense = ds_model.from_config(ModelConfig.from_dict(raw), seed=0)
    models, optimizers, times = {}, {}, {name: [] for name in PATTERNS}
    for name, pattern in PATTERNS.items():
        model = ds_model.from_config(ModelConfig.from_dict({**raw, "attention": pattern}), seed=0)
        model.load_state_dict(dense.state_dict(), strict=False)
        models[name] = model.train()
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-3)

    for step in range(args.steps):
        for name, model in models.items():
            start = time.perf_counter()
            loss = model(batches[step], labels=batches[step]).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - start)
            print(f"step {step} {name:15s} loss {loss.item():.3f} {times[name][-1]:.2f}s")

    losses = {}
    with torch.no_grad():
        for name, model in models.items():
            losses[name] = model.eval()(heldout, labels=heldout).loss.item()

    base = statistics.median(times["dense"][1:]) if args.steps > 1 else times["dense"][0]
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"context {args.context}, {args.steps} steps, heldout {heldout.shape[1]} tokens")  # fmt: skip
    print("| pattern | train tokens/s | vs dense | held-out loss |")
    print("|---|---:|---:|---:|")
    for name in PATTERNS:
        sec = statistics.median(times[name][1:]) if args.steps > 1 else times[name][0]
        print(f"| {name} | {args.context / sec:,.0f} | {base / sec:.2f}x | {losses[name]:.3f} |")


if __name__ == "__main__":
    main()
