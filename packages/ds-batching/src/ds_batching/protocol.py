"""The stable interface of ds-batching. Pure Python: token ids and block ids only."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class SchedulerProtocol(Protocol):
    """A continuous-batching scheduler, driven by an engine loop:

    ``add`` a request, call ``schedule`` for the next step's batch, run the model on
    it, hand the sampled tokens back with ``update``; ``abort`` at any time.
    ``ds_batching.Scheduler`` implements it with ``Request``, ``SchedulerOutput`` and
    ``FinishedRequest`` as the plain data types.
    """

    def add(self, request: Any) -> None:
        """Queue a request; raises ``QueueFull`` when the waiting queue is full."""
        ...

    def schedule(self) -> Any:
        """The next step's batch: which requests run, how many tokens each, their blocks."""
        ...

    def update(self, outputs: Mapping[str, int]) -> Sequence[Any]:
        """Append sampled tokens (request id -> token id); returns the finished requests."""
        ...

    def abort(self, request_id: str) -> bool:
        """Drop a request at any point; False when it is unknown or already finished."""
        ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> Any: ...


@runtime_checkable
class BlockManagerProtocol(Protocol):
    """A paged KV block pool with reference counts.

    Token position ``pos`` of a sequence lives in slot
    ``block_table[pos // block_size] * block_size + pos % block_size``.
    """

    num_blocks: int
    block_size: int

    def can_allocate(self, num_tokens: int, cached_block_ids: Sequence[int] = ()) -> bool: ...

    def allocate(self, num_tokens: int, cached_block_ids: Sequence[int] = ()) -> list[int]:
        """A new block table covering ``num_tokens`` slots."""
        ...

    def append_slot(self, block_table: list[int], num_tokens: int) -> list[int]:
        """Grow ``block_table`` in place to cover ``num_tokens`` slots; the new block ids."""
        ...

    def free(self, block_ids: Iterable[int]) -> None: ...

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 to 1.0."""
        ...
