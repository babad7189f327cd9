"""A static batcher: collect requests until a limit would be exceeded, then flush.

``DynamicBatchScheduler(max_batch_size=32, max_tokens=4096)``: ``add_request`` first
flushes the current batch if it already holds ``max_batch_size`` requests or if the
new request would push its token count past ``max_tokens``, then adds the request;
``flush()`` hands over whatever is left. This is static batching: a batch runs as a
unit until its slowest request finishes. ``Scheduler`` is the continuous alternative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Batch", "DynamicBatchScheduler", "num_tokens_of"]


def num_tokens_of(input_ids: Any) -> int:
    """Token count of one request: ``numel()`` (torch), ``size`` (numpy) or ``len()``."""
    if isinstance(input_ids, (str, bytes)):
        raise TypeError("input_ids must be token ids, not text; tokenize first")
    numel = getattr(input_ids, "numel", None)
    if callable(numel):
        count = numel()
    elif isinstance(getattr(input_ids, "size", None), int):  # numpy: .size is the element count
        count = input_ids.size
    elif hasattr(input_ids, "__len__"):
        count = len(input_ids)
    else:
        raise TypeError(
            "input_ids must be a sequence of token ids (list, tuple, array) or have numel(), "
            f"got {type(input_ids).__name__}"
        )
    return int(count)


@dataclass
class Batch:
    """A flushed batch: the requests exactly as they were added, in order."""

    requests: list[Any] = field(default_factory=list)
    num_tokens: int = 0
    index: int = 0  # 0 for the first batch this scheduler flushed, then 1, 2, ...

    def __len__(self) -> int:
        return len(self.requests)


class DynamicBatchScheduler:
    """Static batching under a request limit and a token limit.

    Each flushed ``Batch`` is passed to ``on_batch`` when given, and also returned by
    the ``add_request`` / ``flush`` call that flushed it.
    """

    def __init__(
        self,
        max_batch_size: int = 32,
        max_tokens: int = 4096,
        on_batch: Callable[[Batch], Any] | None = None,
    ) -> None:
        for name, value in (("max_batch_size", max_batch_size), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if on_batch is not None and not callable(on_batch):
            raise TypeError(f"on_batch must be callable or None, got {type(on_batch).__name__}")
        self.max_batch_size = max_batch_size
        self.max_tokens = max_tokens
        self.on_batch = on_batch
        self.current_batch: list[Any] = []
        self.current_tokens = 0
        self.num_batches = 0

    def add_request(self, input_ids: Any) -> Batch | None:
        """Add one request; returns the batch this flushed first, if any."""
        new_tokens = num_tokens_of(input_ids)
        if new_tokens < 1:
            raise ValueError("input_ids is empty; a request needs at least one token")
        if new_tokens > self.max_tokens:
            raise ValueError(
                f"request has {new_tokens} tokens, more than max_tokens={self.max_tokens}; "
                "it can never fit in a batch"
            )
        flushed = None
        if (
            len(self.current_batch) >= self.max_batch_size
            or self.current_tokens + new_tokens > self.max_tokens
        ):
            flushed = self.flush()
        self.current_batch.append(input_ids)
        self.current_tokens += new_tokens
        return flushed

    def flush(self) -> Batch | None:
        """Hand over the current batch (None when it is empty)."""
        if not self.current_batch:
            return None
        batch = Batch(self.current_batch, self.current_tokens, self.num_batches)
        self.num_batches += 1
        self.current_batch = []
        self.current_tokens = 0
        if self.on_batch is not None:
            self.on_batch(batch)
        return batch

    def __len__(self) -> int:
        return len(self.current_batch)
