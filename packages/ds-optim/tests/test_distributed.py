"""Multi-process tests on CPU: gloo process groups of 2 and 4 ranks spawned here.

The scenarios live in ``ds_optim_dist_workers.py`` (spawned children import them by
module name); one spawn per world size runs several of them to pay torch's start-up
once.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import ds_optim_dist_workers as workers

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, names: list[str]) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.spawn(workers.main, args=(world, free_port(), names, errors), nprocs=world, join=True)
    except Exception as exc:  # surface the first worker's traceback
        reports = []
        while not errors.empty():
            reports.append(errors.get())
        detail = "\n".join(f"rank {r} scenario {n}:\n{tb}" for r, n, tb in reports)
        raise AssertionError(f"distributed scenario failed\n{detail or exc}") from exc


@pytest.mark.slow
def test_two_ranks():
    spawn(2, ["hook_bound", "many_buckets", "no_sync", "convergence", "zero1", "fsdp2"])


@pytest.mark.slow
def test_four_ranks():
    spawn(4, ["hook_bound", "many_buckets"])
