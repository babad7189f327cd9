"""Packed tokens, as ds-model's runner feeds a mixed batch: a (tokens, hidden) input with one
adapter entry per token. One LoraLinear with 8 adapters; the per-row gather (BGMV-style,
A and B copied once per token) versus the per-adapter groups (SGMV-style) versus looping
over adapters with the single-adapter forward. Same layer, same run.

    uv run --frozen python packages/ds-lora/benchmarks/bench_mixed_packed.py [--quick]
"""

from __future__ import annotations

import argparse

import ds_lora
import torch
from _common import add_threads_arg, interleaved_median_times, machine
from ds_lora.mixed import mixed_lora_forward, plan_rows
from torch import nn


def build(hidden: int, adapters: int, rank: int) -> tuple[ds_lora.LoraLinear, list[str]]:
    torch.manual_seed(0)
    layer = ds_lora.LoraLinear(nn.Linear(hidden, hidden)).eval()
    names = [f"adapter{i}" for i in range(adapters)]
    for name in names:
        layer.add_adapter(name, ds_lora.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0))
        with torch.no_grad():
            layer.lora_B[name].weight.normal_(0, 0.01)
    return layer, names


def run(layer, names, sequences: int, seq: int, repeat: int):
    tokens = sequences * seq
    x = torch.randn(tokens, layer.in_features)
    # Token t belongs to sequence t // seq, and sequence s uses adapter s % len(names).
    slots = torch.tensor([(t // seq) % len(names) for t in range(tokens)])
    plan = plan_rows(slots, len(names))
    layer.set_row_adapters(tuple(names), slots, plan)
    stacked = layer._stacked()
    layer.set_row_adapters((), None)
    bias = layer.base_layer.bias

    @torch.no_grad()
    def path(strategy):
        return mixed_lora_forward(x, layer.base_layer(x), stacked, plan, bias, strategy)

    @torch.no_grad()
    def loop():
        out = torch.empty(tokens, layer.out_features)
        for slot, members in plan.groups:
            layer.active_adapter = names[slot]
            out[members] = layer(x[members])
        return out

    want = loop()
    for strategy in ("gathered", "grouped"):
        torch.testing.assert_close(path(strategy), want, atol=1e-4, rtol=1e-4)  # same answer
    return interleaved_median_times(
        {
            "loop": loop,
            "gathered": lambda: path("gathered"),
            "grouped": lambda: path("grouped"),
        },
        repeat,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    add_threads_arg(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hidden, repeat = (256, 3) if args.quick else (1024, 11)
    adapters, rank = 8, 16
    layer, names = build(hidden, adapters, rank)
    print(f"machine: {machine()}")
    print(
        f"one LoraLinear {hidden}x{hidden}, {adapters} adapters r={rank}, packed tokens "
        f"(one adapter entry per token); median of {repeat}, round-robin\n"
    )
    print(
        "| sequences | tokens each | loop (ms) | gathered (ms) | grouped (ms) | grouped vs loop |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for sequences, seq in ((8, 1), (32, 1), (8, 32)):
        t = run(layer, names, sequences, seq, repeat)
        print(
            f"| {sequences} | {seq} | {t['loop'] * 1e3:.3f} | {t['gathered'] * 1e3:.3f} | "
            f"{t['grouped'] * 1e3:.3f} | {t['loop'] / t['grouped']:.2f}x |"
        )


if __name__ == "__main__":
    main()
