"""Serving many adapters at once: one forward over a batch whose rows use 8 different
adapters (gathered low-rank matmuls) versus the loop a server without it runs: for each
adapter, activate it and run the forward on that adapter's rows. Same model, same run.

    uv run --frozen python packages/ds-lora/benchmarks/bench_mixed_batch.py [--quick]
"""

from __future__ import annotations

import argparse

import ds_lora
import torch
from _common import add_threads_arg, interleaved_median_times, llama, machine


def build(hidden: int, layers: int, adapters: int, rank: int, device: torch.device):
    model = llama(hidden, layers).to(device).eval()
    config = ds_lora.LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear"
    )
    names = [f"adapter{i}" for i in range(adapters)]
    for name in names:
        ds_lora.inject(model, config, name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    return model, names


def run(model, names, batch: int, seq: int, repeat: int, device: torch.device):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    rows = [names[i % len(names)] for i in range(batch)]

    @torch.no_grad()
    def mixed():
        with ds_lora.adapter_batch(model, rows):
            return model(ids).logits

    @torch.no_grad()
    def loop():
        out = torch.empty(batch, seq, model.config.vocab_size, device=device)
        for name in names:
            picked = [i for i, r in enumerate(rows) if r == name]
            ds_lora.set_adapter(model, name)
            out[picked] = model(ids[picked]).logits
        return out

    torch.testing.assert_close(mixed(), loop(), atol=1e-4, rtol=1e-4)  # same answer
    times = interleaved_median_times({"loop": loop, "mixed": mixed}, repeat)
    return times["loop"], times["mixed"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    add_threads_arg(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hidden, layers, repeat = (64, 2, 3) if args.quick else (256, 4, 11)
    adapters, rank = 8, 16
    model, names = build(hidden, layers, adapters, rank, device)
    print(f"machine: {machine()}")
    print(
        f"model: random Llama, hidden {hidden}, {layers} layers, {adapters} adapters r={rank} "
        f"on all linear layers; median of {repeat}, round-robin\n"
    )
    print("| batch | seq | loop over adapters (ms) | mixed batch (ms) | speed-up |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for batch, seq in ((8, 1), (32, 1), (8, 32)):
        loop_s, mixed_s = run(model, names, batch, seq, repeat, device)
        print(
            f"| {batch} | {seq} | {loop_s * 1e3:.2f} | {mixed_s * 1e3:.2f} | "
            f"{loop_s / mixed_s:.2f}x |"
        )


if __name__ == "__main__":
    main()
