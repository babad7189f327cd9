"""The stable interface of ds-batching. Pure Python: token ids and block ids only."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class SchedulerProtocol(Protocol):
    """A continuous-batching scheduler, driven by an engine loop:

    ``add`` a request, call ``schedule`` for the next step's batch, run the model on
    it, hand the sampled tokens back with ``update``; ``abort`` at any time.
    """

    def add(self, request: Any) -> None: ...

    def schedule(self) -> Any:
        """The next step's batch: which requests run, how many tokens each, their blocks."""
        ...

    def update(self, outputs: Any) -> Sequence[Any]:
        """Append sampled tokens; returns the requests that finished in this step."""
        ...

    def abort(self, request_id: str) -> None: ...


@runtime_checkable
class BlockManagerProtocol(Protocol):
    """A paged KV block pool with reference counts."""

    num_blocks: int
    block_size: int

    def can_allocate(self, num_tokens: int) -> bool: ...

    def free(self, block_ids: Iterable[int]) -> None: ...

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 to 1.0."""
        ...
