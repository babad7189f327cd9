"""Optimizer step time: GroupedAdamW versus torch.optim.AdamW(foreach=True), same model
(plus torch's fused AdamW, which GroupedAdamW runs on CPU by default).

Usage: uv run --frozen python packages/ds-optim/benchmarks/bench_optimizer_step.py
Prints a markdown table (median of repeats) with the ratio and the machine.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import machine, median_time
from ds_optim import GroupedAdamW, group_parameters
from torch import nn


def model(width: int, layers: int) -> nn.Module:
    blocks = []
    for _ in range(layers):
        blocks += [
            nn.Linear(width, 4 * width),
            nn.GELU(),
            nn.Linear(4 * width, width),
            nn.LayerNorm(width),
        ]
    return nn.Sequential(nn.Embedding(1000, width), *blocks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    base = model(args.width, args.layers).to(device)
    n = sum(p.numel() for p in base.parameters())
    for p in base.parameters():
        p.grad = torch.randn_like(p) * 1e-3

    def build(make):
        m = model(args.width, args.layers).to(device)
        m.load_state_dict(base.state_dict())
        for p, q in zip(m.parameters(), base.parameters()):
            p.grad = q.grad.clone()
        return make(m)

    candidates = {
        "torch.optim.AdamW(foreach=True)": lambda m: torch.optim.AdamW(
            m.parameters(), lr=1e-4, foreach=True
        ),
        "torch.optim.AdamW(fused=True)": lambda m: torch.optim.AdamW(
            m.parameters(), lr=1e-4, fused=True
        ),
        "GroupedAdamW, one group": lambda m: GroupedAdamW(m.parameters(), lr=1e-4),
        "GroupedAdamW, one group, foreach (fused=False)": lambda m: GroupedAdamW(
            m.parameters(), lr=1e-4, fused=False
        ),
        "GroupedAdamW, static policy (2 groups)": lambda m: GroupedAdamW(
            group_parameters(m, "static"), lr=1e-4
        ),
        "GroupedAdamW, sensitivity policy (statistic every step)": lambda m: (
            GroupedAdamW.from_model(m, "sensitivity", lr=1e-4)
        ),
        "GroupedAdamW, bf16 moments, stochastic rounding": lambda m: GroupedAdamW(
            m.parameters(), lr=1e-4, state_dtype=torch.bfloat16
        ),
        "GroupedAdamW, bf16 moments, nearest rounding": lambda m: GroupedAdamW(
            m.parameters(), lr=1e-4, state_dtype=torch.bfloat16, bf16_rounding="nearest"
        ),
    }
    opts = {name: build(make) for name, make in candidates.items()}
    # Round-robin, so load from other processes on a shared machine hits every
    # optimizer alike; medians over the rounds.
    times: dict[str, list[float]] = {name: [] for name in opts}
    for r in range(args.repeats + 2):
        for name, opt in opts.items():
            t = median_time(opt.step, 1, warmup=0)
            if r >= 2:
                times[name].append(t)
    rows = [(name, statistics.median(ts)) for name, ts in times.items()]
    ref = rows[0][1]
    print(
        f"Machine: {machine()}; device {device}; {n / 1e6:.2f}M parameters in "
        f"{sum(1 for _ in base.parameters())} tensors; median of {args.repeats} steps\n"
    )
    print("| optimizer | step (ms) | vs AdamW foreach |")
    print("| --- | ---: | ---: |")
    for name, t in rows:
        print(f"| {name} | {t * 1e3:.2f} | {t / ref:.2f}x |")


if __name__ == "__main__":
    main()
