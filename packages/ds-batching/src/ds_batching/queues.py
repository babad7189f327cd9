"""The waiting queue, one class per scheduling policy.

It holds the scheduler's per-request records: anything with ``request_id``,
``priority`` and ``seq_no`` (arrival order).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from typing import Any

__all__ = ["FCFSQueue", "PriorityQueue", "make_waiting_queue"]


class FCFSQueue:
    """Arrival order; a preempted request goes back to the front so it resumes first."""

    def __init__(self) -> None:
        self._queue: deque[Any] = deque()

    def push(self, request: Any) -> None:
        self._queue.append(request)

    def push_front(self, request: Any) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Any:
        return self._queue[0]

    def pop(self) -> Any:
        return self._queue.popleft()

    def remove(self, request: Any) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._queue)


class PriorityQueue:
    """Lowest ``priority`` first, ties by arrival; a preempted request keeps its place."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Any]] = []

    def push(self, request: Any) -> None:
        heapq.heappush(self._heap, (request.priority, request.seq_no, request))

    push_front = push  # its (priority, arrival) key already ranks it

    def peek(self) -> Any:
        return self._heap[0][2]

    def pop(self) -> Any:
        return heapq.heappop(self._heap)[2]

    def remove(self, request: Any) -> None:
        for i, (_, _, queued) in enumerate(self._heap):
            if queued is request:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return
        raise ValueError(f"request {request.request_id!r} is not waiting")

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Any]:
        return (entry[2] for entry in sorted(self._heap, key=lambda e: (e[0], e[1])))


def make_waiting_queue(policy: str) -> FCFSQueue | PriorityQueue:
    if policy == "fcfs":
        return FCFSQueue()
    if policy == "priority":
        return PriorityQueue()
    raise ValueError(f"policy must be 'fcfs' or 'priority', got {policy!r}")
