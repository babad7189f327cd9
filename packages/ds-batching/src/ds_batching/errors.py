"""Typed errors of ds-batching.

Bad arguments raise ``ValueError`` / ``TypeError`` / ``KeyError`` subclasses that name the
argument, the value and what is allowed. Load conditions (a full queue, an empty pool)
have their own types so a server can map them to a status code.
"""

from __future__ import annotations

__all__ = ["DuplicateRequestError", "NoFreeBlocksError", "QueueFull", "UnknownRequestError"]


class QueueFull(RuntimeError):
    """The scheduler's waiting queue holds ``max_waiting`` requests; retry later (HTTP 429)."""

    def __init__(self, num_waiting: int, max_waiting: int) -> None:
        super().__init__(
            f"waiting queue is full: {num_waiting} requests waiting, max_waiting={max_waiting}; "
            "retry later"
        )
        self.num_waiting = num_waiting
        self.max_waiting = max_waiting


class NoFreeBlocksError(RuntimeError):
    """The block pool cannot supply the blocks asked for (check ``can_allocate`` first)."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(f"need {needed} free KV blocks, only {available} available")
        self.needed = needed
        self.available = available


class DuplicateRequestError(ValueError):
    """A request id that is already waiting or running was added again."""


class UnknownRequestError(KeyError):
    """``update`` got a token for a request id the last schedule did not ask to sample."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""
