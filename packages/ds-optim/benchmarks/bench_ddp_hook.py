"""DDP with the quantized gradient hooks versus plain fp32 all-reduce (gloo, CPU).

Spawns W ranks on 127.0.0.1, trains the same model from the same seed once per
configuration, and reports: bytes each rank put on the wire per step (counted by the
hook; the fp32 figure is a ring all-reduce of the same buckets, 2 (W-1)/W * 4n),
median step time, final loss. Writes the loss curves of fp32 versus int4 as a PNG.

Usage: uv run --frozen python packages/ds-optim/benchmarks/bench_ddp_hook.py \
           [--world 2] [--steps 300] [--png docs/images/ds-optim-loss.png]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write_line_plot_png

CONFIGS = {
    "fp32 all-reduce (DDP default)": None,
    "int4, reduce-scatter (qgZ style)": dict(bits=4, mode="reduce_scatter"),
    "int4, all-gather": dict(bits=4, mode="all_gather"),
    "int8, reduce-scatter": dict(bits=8, mode="reduce_scatter"),
}


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 8)
    )


def worker(rank: int, world: int, port: int, steps: int, out: str) -> None:
    from ds_optim import (
        GroupedAdamW,
        QuantizedAllreduceState,
        group_parameters,
        int4_allreduce_hook,
        int8_allreduce_hook,
    )

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    teacher = torch.randn(64, 8, generator=torch.Generator().manual_seed(3)) / 8
    results = {}
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        model = make_model()
        ddp = DDP(model, bucket_cap_mb=0.25)  # several buckets, so hooks overlap backward
        state = None
        if cfg is not None:
            state = QuantizedAllreduceState(bits=cfg["bits"], mode=cfg["mode"])
            ddp.register_comm_hook(
                state, int4_allreduce_hook if cfg["bits"] == 4 else int8_allreduce_hook
            )
        opt = GroupedAdamW(group_parameters(model, "static"), lr=3e-3, weight_decay=0.01)
        gen = torch.Generator().manual_seed(100 + rank)
        losses, times = [], []
        for _ in range(steps):
            x = torch.randn(64, 64, generator=gen)
            y = torch.tanh(x @ teacher * 4) + 0.1 * torch.randn(64, 8, generator=gen)
            t0 = time.perf_counter()
            loss = nn.functional.mse_loss(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            losses.append(mean_loss.item() / world)
        n = sum(p.numel() for p in model.parameters())
        if state is None:
            wire = fp32 = 2 * (world - 1) * 4 * n / world
        else:
            wire = state.stats.bytes_sent / steps
            fp32 = state.stats.fp32_allreduce_bytes / steps
        results[name] = dict(
            losses=losses, step_s=statistics.median(times[10:]), wire=wire, fp32=fp32, n=n
        )
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--png", default="")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.spawn(worker, args=(args.world, port, args.steps, out), nprocs=args.world, join=True)
        with open(out) as f:
            res = json.load(f)
    base = res["fp32 all-reduce (DDP default)"]
    print(
        f"Machine: {machine()}; gloo on 127.0.0.1, world size {args.world}, "
        f"{base['n'] / 1e6:.2f}M parameters, {args.steps} steps, 1 thread per rank\n"
    )
    print(
        "| gradient exchange | bytes/step/rank | vs fp32 all-reduce | step (ms, median) | final loss (mean of last 20) |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in res.items():
        last = sum(r["losses"][-20:]) / 20
        print(
            f"| {name} | {r['wire'] / 1e3:.1f} kB | {r['fp32'] / r['wire']:.2f}x fewer | "
            f"{r['step_s'] * 1e3:.1f} | {last:.4f} |"
        )
    if args.png:
        os.makedirs(os.path.dirname(args.png) or ".", exist_ok=True)
        write_line_plot_png(
            args.png,
            [
                (base["losses"], (31, 119, 180)),
                (res["int4, reduce-scatter (qgZ style)"]["losses"], (214, 39, 40)),
            ],
        )
        curves = base["losses"] + res["int4, reduce-scatter (qgZ style)"]["losses"]
        print(
            f"\nloss curves written to {args.png} (blue: fp32 all-reduce, red: int4 hook; "
            f"x: steps 0-{args.steps - 1}; y: linear, {min(curves):.4f} to {max(curves):.4f})"
        )


if __name__ == "__main__":
    main()
