"""The processes of a tensor-parallel server: starting them, joining their groups, and
noticing when one stops.

Two ways to start N ranks, the same code after that:

- ``ds-serve MODEL --tensor-parallel-size N`` on one machine: the server process is rank
  0 and starts N - 1 workers (``worker_main`` in a new Python) with torchrun's environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and the
  model path and engine options as JSON in ``DS_SERVE_RANK_ARGS``;
- ``torchrun`` on one or more machines, every process running ``ds-serve`` with the same
  arguments: ``RANK`` 0 serves HTTP, the others follow its steps.

Process groups: the model's all-reduces run on ``model_group`` (NCCL on CUDA, gloo on
CPU) with ``COLLECTIVE_TIMEOUT``, so a rank that hangs fails the step rather than
hanging the server; the step inputs travel on a gloo ``step_group`` whose wait is
unbounded in practice (``IDLE_TIMEOUT``), since an idle server sends no steps. The
default group only meets the ranks (``START_TIMEOUT``: every rank must start within
it). A rank that exits closes its connections, which fails its peers' next collective
at once.

Rank 0 watches the workers it started (``Ranks.watch``): one that exits fails the
engine with ``RankFailed`` naming the rank, so requests get a 503 instead of waiting.
Workers exit when the process that started them is gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["COLLECTIVE_TIMEOUT", "RankFailed", "Ranks", "join", "start"]

log = logging.getLogger("ds_serve.ranks")

# A step's collectives wait for the slowest rank's share of the same step; a minute is
# far beyond that skew, and short enough that a stuck rank fails the server visibly.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
IDLE_TIMEOUT = timedelta(days=365)
START_TIMEOUT = timedelta(minutes=5)
ARGS_ENV = "DS_SERVE_RANK_ARGS"
WORKER = "from ds_serve.ranks import worker_main; worker_main()"
WATCH_INTERVAL = 0.2  # seconds


class RankFailed(RuntimeError):
    """A tensor-parallel rank stopped or a collective with it failed: the server cannot
    run another step."""


@dataclass
class Ranks:
    """This process's place among the ranks, and the groups they share."""

    rank: int
    world_size: int
    device: torch.device
    step_group: Any  # gloo: the step inputs rank 0 broadcasts
    model_group: Any  # the model's all-reduces (NCCL on CUDA, gloo on CPU)
    workers: dict[int, subprocess.Popen] = field(default_factory=dict)  # started here
    stopping: bool = False  # set by ``stop``: exits after it are expected

    def stopped_worker(self) -> str | None:
        """A description of the first worker this process started that has exited."""
        for rank, proc in self.workers.items():
            code = proc.poll()
            if code is not None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                return f"tensor-parallel rank {rank} (pid {proc.pid}) {how}"
        return None

    def watch(self, on_failure: Callable[[RankFailed], None]) -> None:
        """Call ``on_failure`` (from a daemon thread) once a started worker exits."""
        if not self.workers:
            return

        def poll() -> None:
            while (stopped := self.stopped_worker()) is None:
                time.sleep(WATCH_INTERVAL)
            if not self.stopping:
                log.error("%s; the server cannot serve any more", stopped)
                on_failure(RankFailed(f"{stopped}; restart the server"))

        threading.Thread(target=poll, name="ds-serve-rank-watchdog", daemon=True).start()

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over the ranks (each sizes its KV pool from its memory;
        all must use the same number of blocks)."""
        t = torch.tensor([value], dtype=torch.int64)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.step_group)
        except RuntimeError as exc:  # a worker failed while loading its shard
            time.sleep(WATCH_INTERVAL)  # its exit may lag its closed connection
            raise RankFailed(f"{self.stopped_worker() or 'a rank stopped'} while starting") from exc
        return int(t.item())

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the workers started here to exit (after rank 0 told them to), then
        kill the ones still running."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        for proc in self.workers.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if dist.is_initialized():
            dist.destroy_process_group()


def device_for(option: str | None, local_rank: int) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` on CUDA, else the CPU."""
    kind = option or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = torch.device(kind).type
    return torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")


def start(world_size: int, model_path: str, options: dict[str, Any], device: str | None) -> Ranks:
    """Rank 0's side: join a torchrun launch, or start ``world_size - 1`` local workers."""
    if "WORLD_SIZE" in os.environ:
        launched = int(os.environ["WORLD_SIZE"])
        if launched != world_size:
            raise ValueError(
                f"--tensor-parallel-size {world_size} but the launcher started "
                f"WORLD_SIZE={launched} processes; they must be equal"
            )
        return join(device)
    if device_for(device, 0).type == "cuda" and world_size > torch.cuda.device_count():
        raise ValueError(
            f"--tensor-parallel-size {world_size} needs one GPU per rank; this machine has "
            f"{torch.cuda.device_count()} (use torchrun across machines)"
        )
    env = {
        **os.environ,
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        ARGS_ENV: json.dumps(
            {
                "model_path": model_path,
                "options": options,
                "num_threads": torch.get_num_threads(),
                "parent": os.getpid(),
            },
            default=_plain_option,
        ),
    }
    workers = {}
    for rank in range(1, world_size):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        workers[rank] = subprocess.Popen([sys.executable, "-c", WORKER], env=rank_env)
    os.environ.update({k: env[k] for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")})
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0"})
    try:
        ranks = join(device)
    except BaseException:
        for proc in workers.values():
            proc.kill()
        raise
    finally:
        for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK"):
            os.environ.pop(name, None)
    ranks.workers = workers
    return ranks


def join(device: str | None) -> Ranks:
    """Join the ranks named by torchrun's environment variables."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = device_for(device, int(os.environ.get("LOCAL_RANK", "0")))
    if local.type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=START_TIMEOUT)
    step_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    backend = "nccl" if local.type == "cuda" else "gloo"
    model_group = dist.new_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return Ranks(rank, world, local, step_group=step_group, model_group=model_group)


def _plain_option(value: Any) -> str:
    """Engine options travel to the workers as JSON: a torch dtype by its name."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(
        f"engine option value {value!r} cannot be sent to the other tensor-parallel ranks; "
        "give plain values (strings, numbers)"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _exit_with_parent(parent: int) -> None:
    """A worker whose server process is gone has nothing to serve: exit."""

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=poll, name="ds-serve-parent-watch", daemon=True).start()


def worker_main() -> None:
    """A worker started by ``start``: serve the steps of rank 0 until it stops."""
    args = json.loads(os.environ[ARGS_ENV])
    _exit_with_parent(args["parent"])
    torch.set_num_threads(args["num_threads"])
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    from ds_serve.server import follow_steps

    follow_steps(args["model_path"], **args["options"])
    # Interpreter teardown with torch and gloo loaded took 4-6 s on the busy 2-core
    # EPYC-512 host (2026-12-06), all of it on the server's shutdown path; the worker
    # has nothing left to release.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
