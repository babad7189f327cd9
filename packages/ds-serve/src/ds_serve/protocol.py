"""The stable interface of ds-serve: the engine the HTTP layer talks to.

The engine owns a ds-batching scheduler and a ds-model runner; the HTTP layer only
submits requests, reads their output stream and aborts them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from ds_batching.protocol import SchedulerProtocol
from ds_model.protocol import ModelRunnerProtocol

__all__ = ["EngineProtocol", "ModelRunnerProtocol", "SchedulerProtocol"]


@runtime_checkable
class EngineProtocol(Protocol):
    scheduler: SchedulerProtocol
    runner: ModelRunnerProtocol

    def submit(self, prompt_token_ids: list[int], params: Any, **kwargs: Any) -> str:
        """Queue a request; returns its id. Raises the scheduler's ``QueueFull`` when full."""
        ...

    def stream(self, request_id: str) -> AsyncIterator[Any]:
        """The request's output deltas, ending with one that carries a finish reason."""
        ...

    def abort(self, request_id: str) -> None: ...
