"""Plain data that crosses the boundary between the scheduler and the engine.

Nothing here refers back to scheduler state: an engine can translate a
``SchedulerOutput`` into the model runner's arguments (token ids, positions, block
tables) without importing ds-batching's internals, and ds-model never imports it.

KV slot layout: position ``pos`` of a request lives in physical slot
``block_table[pos // block_size] * block_size + pos % block_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ds_batching.request import FinishReason

__all__ = ["FinishedRequest", "ScheduledRequest", "SchedulerOutput", "SchedulerStats", "slot_of"]


def slot_of(block_table: Sequence[int], position: int, block_size: int) -> int:
    """The physical KV slot of token ``position`` of a sequence with ``block_table``."""
    return block_table[position // block_size] * block_size + position % block_size


class ScheduledRequest(NamedTuple):
    """One request's share of a model step (immutable).

    token_ids: the tokens to feed now: a prefill chunk, or the single last token to decode.
    start_position: position of ``token_ids[0]``; equals the tokens whose KV is already in
        the cache (a prefix-cache hit is skipped, so a first chunk may start past 0).
    block_table: physical block ids of the whole sequence so far (immutable snapshot),
        covering at least ``start_position + len(token_ids)`` slots.
    sample: whether this step ends in a sampled token (a decode, or a prompt's last chunk);
        ``Scheduler.update`` expects exactly one token for each request with ``sample``.
    sampling_params / lora_name: carried untouched from the ``Request``.

    Each ``schedule()`` makes new ones, so an item describes the step it came from. A
    named tuple: the scheduler builds one per running request per step, and a tuple
    is the cheapest record Python builds (docs/benchmarks.md, scheduler overhead).
    """

    request_id: str
    token_ids: list[int]
    start_position: int
    block_table: tuple[int, ...]
    sample: bool
    sampling_params: Any = None
    lora_name: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def positions(self) -> range:
        return range(self.start_position, self.start_position + len(self.token_ids))


@dataclass(slots=True)
class SchedulerOutput:
    """The batch for one model step, plus what changed since the previous one.

    scheduled: running requests first (in their order), then newly admitted ones.
    preempted_request_ids: requests whose KV was dropped in this call; they will be
        recomputed from position 0 (the runner must forget any state it keeps for them).
    finished_request_ids: requests that finished or were aborted since the previous
        ``schedule()``; the runner can drop their per-request state.
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_scheduled_tokens: int = 0
    preempted_request_ids: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    block_size: int = 16

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def request_ids(self) -> list[str]:
        return [s.request_id for s in self.scheduled]

    @property
    def token_ids(self) -> list[list[int]]:
        """Per request, the tokens to feed (``ModelRunnerProtocol.step``'s first argument)."""
        return [s.token_ids for s in self.scheduled]

    @property
    def positions(self) -> list[int]:
        """Per request, the position of its first token this step."""
        return [s.start_position for s in self.scheduled]

    @property
    def block_tables(self) -> list[tuple[int, ...]]:
        return [s.block_table for s in self.scheduled]

    @property
    def sample_request_ids(self) -> list[str]:
        """Requests that need a sampled token from this step, in batch order."""
        return [s.request_id for s in self.scheduled if s.sample]


@dataclass(slots=True)
class FinishedRequest:
    """A request that left the scheduler, with all tokens it produced (the stop token included)."""

    request_id: str
    finish_reason: FinishReason
    output_token_ids: list[int]
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    num_preemptions: int = 0


@dataclass(slots=True)
class SchedulerStats:
    """Figures for metrics (Prometheus gauges and counters in ds-serve)."""

    num_running: int
    num_waiting: int
    num_preempted_waiting: int  # waiting to resume after a preemption
    num_preemptions_total: int
    kv_usage: float  # fraction of KV blocks referenced by running requests
    num_free_blocks: int
    num_cached_blocks: int  # unreferenced blocks still holding a reusable prefix
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_steps: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hit tokens / queried prompt tokens over all admissions so far (0.0 before any)."""
        if self.prefix_cache_queried_tokens == 0:
            return 0.0
        return self.prefix_cache_hit_tokens / self.prefix_cache_queried_tokens
