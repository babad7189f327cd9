"""Inference cost of an adapter: the base model, the adapter kept separate (unmerged), and
the adapter merged and unloaded (goal: merged costs nothing over the base). Same run.

    uv run --frozen python packages/ds-lora/benchmarks/bench_merged.py [--quick]
"""

from __future__ import annotations

import argparse
import copy

import ds_lora
import torch
from _common import add_threads_arg, interleaved_median_times, llama, machine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    add_threads_arg(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hidden, layers, repeat = (64, 2, 3) if args.quick else (256, 4, 15)
    base = llama(hidden, layers).to(device).eval()
    lora = ds_lora.inject(
        copy.deepcopy(base),
        ds_lora.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
    )
    lora.eval()
    merged = ds_lora.merge_and_unload(copy.deepcopy(lora))
    print(f"machine: {machine()}")
    print(
        f"model: random Llama, hidden {hidden}, {layers} layers, adapter r=16 on all "
        f"linear layers; median of {repeat}, round-robin\n"
    )
    print("| batch x seq | base (ms) | unmerged LoRA (ms) | merged (ms) | merged / base |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for batch, seq in ((1, 1), (8, 1), (4, 128)):
        ids = torch.randint(0, base.config.vocab_size, (batch, seq), device=device)
        fns = {
            name: torch.no_grad()(lambda model=model, ids=ids: model(ids))
            for name, model in (("base", base), ("lora", lora), ("merged", merged))
        }
        times = interleaved_median_times(fns, repeat, warmup=2)
        t_base, t_lora, t_merged = (times[k] * 1e3 for k in ("base", "lora", "merged"))
        print(
            f"| {batch} x {seq} | {t_base:.2f} | {t_lora:.2f} | {t_merged:.2f} | "
            f"{t_merged / t_base:.2f}x |"
        )


if __name__ == "__main__":
    main()
