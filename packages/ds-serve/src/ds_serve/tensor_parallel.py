"""Tensor-parallel steps: rank 0 sends each step's plain inputs, every rank runs it.

Rank 0 runs the HTTP server, the scheduler and the sampler. Its runner is a
``TensorParallelRunner``: before each step it broadcasts the step's plain data (token
ids, positions, block tables, and the per-sequence flags ``step`` takes) as one msgspec
JSON message over the ranks' gloo step group, then runs its own shard of the step.
The other ranks loop in ``follow``: receive a step, run it on their shard (the model's
all-reduces join the ranks inside the forward), drop the logits. Only rank 0 samples,
so sampling needs neither seeds kept in step nor a second broadcast. No pickle: a
message is data, never code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from ds_serve.ranks import RankFailed, Ranks

__all__ = ["TensorParallelRunner", "follow"]

log = logging.getLogger("ds_serve.tensor_parallel")

# How long a failed collective waits for the watchdog to name the rank that stopped.
BLAME_WAIT = 2.0  # seconds


class StepMessage(msgspec.Struct, array_like=True):
    """One broadcast: ``stop`` ends the followers' loop; otherwise a step's inputs."""

    stop: bool
    token_ids: list[list[int]] = []
    positions: list[int] = []
    block_tables: list[list[int]] = []
    all_positions: list[bool] | None = None


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(StepMessage).decode


def send(message: StepMessage, ranks: Ranks) -> None:
    """Rank 0: the message's length, then its bytes."""
    payload = _encode(message)
    dist.broadcast(torch.tensor([len(payload)], dtype=torch.int64), 0, group=ranks.step_group)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    dist.broadcast(data, 0, group=ranks.step_group)


def receive(ranks: Ranks) -> StepMessage:
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, 0, group=ranks.step_group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, 0, group=ranks.step_group)
    return _decode(data.numpy().tobytes())


class TensorParallelRunner:
    """Rank 0's runner: ``step`` sends the inputs to the other ranks, then runs rank 0's
    shard of the step over ``runner`` (a ``ModelRunner`` over the sharded model).
    A failed collective raises ``RankFailed`` naming the rank that stopped, if one of
    the workers started here did."""

    def __init__(self, runner: Any, ranks: Ranks) -> None:
        self.runner = runner
        self.ranks = ranks
        self.closed = False

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def block_size(self) -> int:
        return self.runner.block_size

    def step(
        self,
        token_ids: Sequence[Sequence[int]],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        all_positions: Sequence[bool] | None = None,
        **kwargs: Any,
    ) -> Any:
        if kwargs:
            raise TypeError(
                f"tensor-parallel step() does not take {', '.join(sorted(kwargs))} "
                "(LoRA adapters are not served with tensor_parallel_size > 1)"
            )
        if self.closed:
            raise RankFailed("the tensor-parallel ranks were stopped")
        stopped = self.ranks.stopped_worker()
        if stopped is not None:
            raise RankFailed(f"{stopped}; restart the server")
        message = StepMessage(
            False,
            [list(t) for t in token_ids],
            list(positions),
            [list(t) for t in block_tables],
            None if all_positions is None else list(all_positions),
        )
        extra = {} if all_positions is None else {"all_positions": all_positions}
        try:
            send(message, self.ranks)
            return self.runner.step(token_ids, positions, block_tables, **extra)
        except RuntimeError as exc:  # torch.distributed's errors (DistBackendError too)
            raise RankFailed(self._blame(exc)) from exc

    def _blame(self, exc: BaseException) -> str:
        """Which rank stopped, if one started here did (its exit may lag the broken
        connection a little), else the collective's own error."""
        end = time.monotonic() + BLAME_WAIT
        while time.monotonic() < end:
            stopped = self.ranks.stopped_worker()
            if stopped is not None:
                return f"{stopped}; restart the server"
            if not self.ranks.workers:
                break
            time.sleep(0.05)
        return (
            f"a tensor-parallel collective failed on rank 0 (another rank stopped, or "
            f"did not answer within the timeout): {exc}; restart the server"
        )

    def close(self) -> None:
        """Tell the other ranks to exit, and wait for the ones started here."""
        if self.closed:
            return
        self.closed = True
        if self.ranks.stopped_worker() is None:
            try:
                send(StepMessage(True), self.ranks)
            except RuntimeError as exc:
                log.warning("could not tell the tensor-parallel ranks to stop: %s", exc)
        self.ranks.stop()


def follow(runner: Any, ranks: Ranks) -> None:
    """A rank other than 0: run every step rank 0 sends, until it sends ``stop``."""
    log.info("rank %d of %d follows rank 0's steps", ranks.rank, ranks.world_size)
    while True:
        message = receive(ranks)
        if message.stop:
            return
        extra = {} if message.all_positions is None else {"all_positions": message.all_positions}
        runner.step(message.token_ids, message.positions, message.block_tables, **extra)
