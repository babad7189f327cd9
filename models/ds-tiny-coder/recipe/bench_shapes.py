"""Training tokens/s of candidate shapes for the built-in model, measured interleaved in
one process (the basis of the recipe's choice of shape: tokens per CPU-second).

    OMP_NUM_THREADS=1 uv run python models/ds-tiny-coder/recipe/bench_shapes.py

Each step: forward in bf16 autocast where the CPU multiplies bf16 natively (fp32
elsewhere), cross-entropy, backward, AdamW step, on a batch of 8 x 256 random tokens.
Prints parameters, bf16 size and the median tokens/s of each shape over --rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import ds_model
import torch
from ds_model.training.trainer import cpu_has_bf16

RECIPE = Path(__file__).resolve().parent
SHAPES = {
    "recipe config": {},
    "8 layers, 12 x 88 experts": {
        "num_hidden_layers": 8, "n_routed_experts": 12, "moe_intermediate_size": 88
    },
    "8 layers, 11 x 96 experts": {
        "num_hidden_layers": 8, "n_routed_experts": 11, "moe_intermediate_size": 96
    },
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="the first is warm-up")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds must be >= 2 (the first is warm-up), got {args.rounds}")
    torch.set_num_threads(args.threads)
    base = json.loads((RECIPE / "config.json").read_text())
    bf16 = cpu_has_bf16() is True
    models = {name: ds_model.from_config({**base, **shape}, seed=0).train()
              for name, shape in SHAPES.items()}  # fmt: skip
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    batch = torch.randint(4, base["vocab_size"], (8, 257))
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else None
            with autocast or contextlib.nullcontext():
                logits = model(batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
            )
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            if r:
                times[name].append(time.perf_counter() - start)
    print(f"precision {'bf16 autocast' if bf16 else 'fp32'}, {args.threads} thread(s)")
    for name, model in models.items():
        total, _ = ds_model.parameter_counts(model)
        rate = batch[:, :-1].numel() / statistics.median(times[name])
        print(f"{name:28s} {total / 1e6:6.2f}M params {total * 2 / 1e6:5.1f} MB  {rate:5.0f} tok/s")


if __name__ == "__main__":
    main()
