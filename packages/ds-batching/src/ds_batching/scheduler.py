"""The continuous-batching scheduler: one ``schedule()`` / ``update()`` pair per model step.

The rule, as in vLLM V1, is that every running request's computed tokens catch up
with its tokens (prompt + sampled). A step gives each request
``num_tokens - num_computed_tokens`` more, capped by the token budget (and the long
prefill threshold), so a decode gets 1 token, a prefill a chunk, and a request that
was preempted recomputes its prompt *and* its output so far, with no special case.

Order of one ``schedule()``, one pass over running then waiting requests:

1. Running requests, oldest first. When one needs a new KV block and the pool is
   empty, the lowest-priority running request (the newest under FCFS) is preempted:
   its blocks are freed, it goes back to the front of the waiting queue, and it will be
   recomputed (taken back out of this step's batch if it was already in it). If the
   request itself is the lowest, it is the one preempted.
2. Waiting requests, in policy order, while the budget, ``max_num_seqs`` and the pool
   allow, each starting past its longest prefix-cache hit. None is admitted in a step
   that preempted (it would take the blocks just freed for the running ones). The head
   of the queue is never skipped, so FCFS cannot starve anyone.

``update(sampled)`` then, per request of the step, publishes newly full blocks in the
prefix cache, appends its sampled token and finishes it on EOS / stop ids / max_tokens.

The scheduler's own per-request bookkeeping (arrival order, stop set, prefix-cache
chain, block-table snapshot) lives in a private record beside each ``Request``; the
``Request`` carries what a caller reads (tokens, status, computed tokens, block table).
"""

from __future__ import annotations

import itertools
import operator
import sys
from collections.abc import Mapping

from ds_batching.block_manager import BlockManager
from ds_batching.config import SchedulerConfig
from ds_batching.errors import DuplicateRequestError, QueueFull, UnknownRequestError
from ds_batching.outputs import FinishedRequest, ScheduledRequest, SchedulerOutput, SchedulerStats
from ds_batching.queues import make_waiting_queue
from ds_batching.request import MAX_TOKEN_ID, FinishReason, Request, RequestStatus, token_id

__all__ = ["Scheduler"]

_RUNNING = RequestStatus.RUNNING
_FINISHED = RequestStatus.FINISHED
_INT_ONLY = {int}
_NEVER = sys.maxsize  # next_publish_at when prefix caching is off
_new_item = tuple.__new__


class _Entry:
    """The scheduler's record of one request it holds (waiting or running)."""

    __slots__ = (
        "chain_parent",
        "max_total_tokens",
        "next_publish_at",
        "num_registered_blocks",
        "priority",
        "request",
        "request_id",
        "seq_no",
        "snapshot",
        "stop_set",
    )

    def __init__(self, request: Request, seq_no: int) -> None:
        self.request = request
        self.request_id = request.request_id
        self.priority = request.priority
        self.seq_no = seq_no  # arrival order: ties in the priority queue
        stops = request.stop_token_ids
        eos = request.eos_token_id
        self.stop_set = stops | {eos} if eos is not None else stops
        self.max_total_tokens = request.num_prompt_tokens + request.max_tokens
        self.snapshot: tuple[int, ...] | None = None  # tuple(block_table) until it grows
        self.num_registered_blocks = 0  # leading blocks of the table published in the cache
        # The prefix-cache parent of the next block to publish: the adapter name before
        # any block is published, then the prefix id of the last published (or hit) block.
        self.chain_parent: int | str | None = request.lora_name
        self.next_publish_at = _NEVER  # computed tokens at which a block is next full


class Scheduler:
    """Continuous batching over a paged KV pool with prefix caching (pure Python).

    Drive it from the engine loop::

        out = scheduler.schedule()          # SchedulerOutput: what to run this step
        sampled = run_model_and_sample(out) # {request_id: token_id} for s.sample
        finished = scheduler.update(sampled)

    ``schedule`` and ``update`` alternate; ``add`` and ``abort`` may come at any time.
    ``running``, ``waiting`` and ``requests`` show the requests held (read-only views).
    """

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        if config is None:
            config = SchedulerConfig()
        if not isinstance(config, SchedulerConfig):
            raise TypeError(f"config must be a SchedulerConfig, got {type(config).__name__}")
        self.config = config
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self._waiting = make_waiting_queue(config.policy)  # of _Entry
        self._running: list[_Entry] = []
        self._entries: dict[str, _Entry] = {}  # every waiting or running request
        self._seq = itertools.count()
        # (entries, their ScheduledRequest, ids that sample) of the step in flight
        self._pending: tuple[list[_Entry], list[ScheduledRequest], set[str]] | None = None
        self._finished_since_schedule: list[str] = []
        self._aborted_since_update: list[FinishedRequest] = []
        self._num_preemptions = 0
        self._num_steps = 0
        self._prefix_queried = 0
        self._prefix_hits = 0

    @property
    def running(self) -> list[Request]:
        """Running requests, oldest first."""
        return [e.request for e in self._running]

    @property
    def waiting(self) -> list[Request]:
        """Waiting (and preempted) requests, in the order they will be admitted."""
        return [e.request for e in self._waiting]

    @property
    def requests(self) -> dict[str, Request]:
        """Every waiting or running request by id."""
        return {rid: e.request for rid, e in self._entries.items()}

    # ---- requests in and out -------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request. Raises ``QueueFull`` when ``max_waiting`` requests wait, and a
        ``ValueError`` for a request that could never run under this config."""
        if not isinstance(request, Request):
            raise TypeError(f"request must be a ds_batching.Request, got {type(request).__name__}")
        if request.request_id in self._entries:
            raise DuplicateRequestError(
                f"request_id {request.request_id!r} is already waiting or running"
            )
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id!r} was already scheduled once")
        cfg = self.config
        # The last sampled token is never fed back, so it needs no KV slot.
        max_slots = request.num_tokens + request.max_tokens - 1
        capacity = cfg.num_blocks * cfg.block_size
        if max_slots > capacity:
            raise ValueError(
                f"request {request.request_id!r} needs up to {max_slots} KV slots "
                f"(prompt {request.num_tokens} + max_tokens {request.max_tokens} - 1), "
                f"the pool holds {capacity} (num_blocks={cfg.num_blocks} x "
                f"block_size={cfg.block_size}); lower max_tokens or enlarge the pool"
            )
        if not cfg.enable_chunked_prefill and request.num_tokens > cfg.max_num_batched_tokens:
            raise ValueError(
                f"request {request.request_id!r} has a {request.num_tokens}-token prompt, more "
                f"than max_num_batched_tokens={cfg.max_num_batched_tokens}, and chunked "
                "prefill is off; enable_chunked_prefill=True or raise the budget"
            )
        if cfg.max_waiting is not None and len(self._waiting) >= cfg.max_waiting:
            raise QueueFull(len(self._waiting), cfg.max_waiting)
        entry = _Entry(request, next(self._seq))
        self._entries[request.request_id] = entry
        self._waiting.push(entry)

    def abort(self, request_id: str) -> bool:
        """Drop a request at any point and free its blocks.

        Returns False when the id is unknown or already finished (a benign race for a
        server). The abort is reported by the next ``update`` (reason ``"abort"``) and in
        the next ``SchedulerOutput.finished_request_ids``.
        """
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return False
        if entry.request.status is _RUNNING:
            self._running.remove(entry)
            self._release_blocks(entry)
        else:
            self._waiting.remove(entry)
        self._finish(entry.request, FinishReason.ABORT)
        self._aborted_since_update.append(_finished_record(entry.request))
        return True

    def has_unfinished(self) -> bool:
        return bool(self._entries)

    # ---- one step ------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """The next model step's batch (possibly empty). Its objects are new each call:
        an output stays valid after later calls."""
        if self._pending is not None:
            raise RuntimeError("schedule() called twice: call update() with the last step's tokens")
        cfg = self.config
        block_size = cfg.block_size
        threshold = cfg.long_prefill_threshold if cfg.enable_chunked_prefill else 0
        budget = cfg.max_num_batched_tokens
        batch: list[_Entry] = []
        items: list[ScheduledRequest] = []
        preempted: list[str] = []
        for entry in list(self._running):
            if budget <= 0:
                break
            req = entry.request
            if req.status is not _RUNNING:
                continue  # preempted earlier in this pass to make room
            start = req.num_computed_tokens
            num_new = len(req.all_token_ids) - start
            if num_new > 1:  # a prefill chunk (a decode is 1 and always fits)
                num_new = min(num_new, threshold or num_new, budget)
            end = start + num_new
            if end > len(req.block_table) * block_size:
                for victim in self._make_room(entry, end):
                    preempted.append(victim.request_id)
                    if victim in batch:  # already in this step: take it back
                        k = batch.index(victim)
                        budget += len(items[k].token_ids)
                        del batch[k], items[k]
                if req.status is not _RUNNING:
                    continue
            batch.append(entry)
            items.append(_emit(entry, start, end))
            budget -= num_new
        if not preempted:
            budget = self._admit_waiting(budget, batch, items)

        self._num_steps += 1 if items else 0
        finished_ids = self._finished_since_schedule
        self._finished_since_schedule = []
        if items:
            self._pending = (batch, items, {s.request_id for s in items if s.sample})
        return SchedulerOutput(
            scheduled=items,
            num_scheduled_tokens=cfg.max_num_batched_tokens - budget,
            preempted_request_ids=preempted,
            finished_request_ids=finished_ids,
            block_size=block_size,
        )

    def update(self, sampled: Mapping[str, int]) -> list[FinishedRequest]:
        """Hand back one sampled token per request the last step marked ``sample``.

        Returns the requests that finished in this step ("stop" / "length") followed by
        those aborted since the previous ``update`` ("abort"). Tokens for requests
        aborted in between are ignored.
        """
        if not isinstance(sampled, Mapping):
            raise TypeError(
                f"sampled must map request_id -> token id, got {type(sampled).__name__}"
            )
        batch, items, sample_ids = self._pending or ((), (), set())
        # Check everything before changing anything, so a bad call can be retried.
        _check_sampled(sampled, batch, items, sample_ids)
        self._pending = None
        finished: list[FinishedRequest] = []
        for entry, item in zip(batch, items):
            req = entry.request
            if req.status is not _RUNNING:
                continue  # aborted after schedule()
            if req.num_computed_tokens >= entry.next_publish_at:
                self._publish_full_blocks(entry)
            if item.sample:
                token = sampled[item.request_id]
                if type(token) is not int:  # e.g. a numpy integer: keep plain ints
                    token = operator.index(token)
                tokens = req.all_token_ids
                tokens.append(token)
                if token in entry.stop_set or len(tokens) >= entry.max_total_tokens:
                    finished.append(self._finish_sampled(entry, token))
        if finished:
            self._running = [e for e in self._running if e.request.status is _RUNNING]
        if self._aborted_since_update:
            finished.extend(self._aborted_since_update)
            self._aborted_since_update = []
        return finished

    # ---- figures -------------------------------------------------------------------

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            num_preempted_waiting=sum(
                1 for e in self._waiting if e.request.status is RequestStatus.PREEMPTED
            ),
            num_preemptions_total=self._num_preemptions,
            kv_usage=bm.usage,
            num_free_blocks=bm.num_uncached_free_blocks,
            num_cached_blocks=bm.num_cached_blocks,
            prefix_cache_queried_tokens=self._prefix_queried,
            prefix_cache_hit_tokens=self._prefix_hits,
            num_steps=self._num_steps,
        )

    # ---- internals -----------------------------------------------------------------

    def _make_room(self, entry: _Entry, end: int) -> list[_Entry]:
        """Grow the request's block table to cover ``end`` slots, preempting the
        lowest-priority running requests while the pool is short; returns those
        preempted (the request itself last, if it came to that)."""
        bm = self.block_manager
        table = entry.request.block_table
        victims = []
        while not bm.can_append_slot(table, end):
            victim = self._pick_victim()
            self._preempt(victim)
            victims.append(victim)
            if victim is entry:
                return victims
        bm.append_slot(table, end)
        entry.snapshot = None
        return victims

    def _admit_waiting(
        self, budget: int, batch: list[_Entry], items: list[ScheduledRequest]
    ) -> int:
        cfg = self.config
        bm = self.block_manager
        block_size = cfg.block_size
        waiting = self._waiting
        while waiting and budget > 0 and len(self._running) < cfg.max_num_seqs:
            entry = waiting.peek()
            req = entry.request
            num_tokens = len(req.all_token_ids)
            hits: list[int] = []
            if cfg.enable_prefix_caching and not req.skip_prefix_cache:
                # At least the last token is recomputed: its logits give the next token.
                hits = bm.find_cached_prefix(
                    req.all_token_ids, req.lora_name, (num_tokens - 1) // block_size
                )
            num_cached = len(hits) * block_size
            num_new = num_tokens - num_cached
            can_chunk = cfg.enable_chunked_prefill or req.status is RequestStatus.PREEMPTED
            if num_new > budget and not can_chunk:
                break  # the head waits for a whole budget rather than being skipped
            if can_chunk and cfg.long_prefill_threshold and num_new > cfg.long_prefill_threshold:
                num_new = cfg.long_prefill_threshold
            if num_new > budget:
                num_new = budget
            end = num_cached + num_new
            if not bm.can_allocate(end, hits):
                break
            waiting.pop()
            req.block_table = bm.allocate(end, hits)
            entry.snapshot = None
            entry.num_registered_blocks = len(hits)
            entry.chain_parent = bm.prefix_id(hits[-1]) if hits else req.lora_name
            entry.next_publish_at = (
                (len(hits) + 1) * block_size if cfg.enable_prefix_caching else _NEVER
            )
            req.num_computed_tokens = num_cached
            if req.status is RequestStatus.WAITING:
                req.num_cached_tokens = num_cached
            req.status = _RUNNING
            self._prefix_queried += num_tokens
            self._prefix_hits += num_cached
            self._running.append(entry)
            batch.append(entry)
            items.append(_emit(entry, num_cached, end))
            budget -= num_new
        return budget

    def _pick_victim(self) -> _Entry:
        if self.config.policy == "priority":
            return max(self._running, key=lambda e: (e.priority, e.seq_no))
        return self._running[-1]

    def _preempt(self, entry: _Entry) -> None:
        req = entry.request
        self._running.remove(entry)
        self._release_blocks(entry)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self._num_preemptions += 1
        self._waiting.push_front(entry)

    def _release_blocks(self, entry: _Entry) -> None:
        req = entry.request
        self.block_manager.free(req.block_table)
        req.block_table = []
        entry.snapshot = None
        entry.num_registered_blocks = 0
        entry.chain_parent = req.lora_name
        entry.next_publish_at = _NEVER

    def _publish_full_blocks(self, entry: _Entry) -> None:
        """Publish the request's newly full, computed blocks in the prefix cache.

        Each block's key is ``(parent, *its tokens)``, chained on the prefix id the
        previous block's publication returned (``entry.chain_parent``).
        """
        req = entry.request
        block_size = self.config.block_size
        num_full = req.num_computed_tokens // block_size
        tokens = req.all_token_ids
        parent = entry.chain_parent
        for k in range(entry.num_registered_blocks, num_full):
            block = tokens[k * block_size : (k + 1) * block_size]
            parent = self.block_manager._publish(req.block_table[k], (parent, *block))
        entry.chain_parent = parent
        entry.num_registered_blocks = num_full
        entry.next_publish_at = (num_full + 1) * block_size

    def _finish_sampled(self, entry: _Entry, token: int) -> FinishedRequest:
        """Finish the request after it sampled its last token (EOS / stop id wins over
        length)."""
        req = entry.request
        reason = FinishReason.STOP if token in entry.stop_set else FinishReason.LENGTH
        del self._entries[req.request_id]
        self._release_blocks(entry)
        self._finish(req, reason)
        return _finished_record(req)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.status = _FINISHED
        req.finish_reason = reason
        self._finished_since_schedule.append(req.request_id)


def _emit(entry: _Entry, start: int, end: int) -> ScheduledRequest:
    """Schedule the request's tokens ``start:end`` in this step."""
    req = entry.request
    snapshot = entry.snapshot
    if snapshot is None:
        snapshot = entry.snapshot = tuple(req.block_table)
    req.num_computed_tokens = end
    tokens = req.all_token_ids
    # tuple.__new__ directly: the named tuple's own __new__ is a Python function,
    # the larger part of building ~256 items per step.
    return _new_item(
        ScheduledRequest,
        (
            req.request_id,
            tokens[start:end],
            start,
            snapshot,
            end == len(tokens),
            req.sampling_params,
            req.lora_name,
        ),
    )


def _finished_record(req: Request) -> FinishedRequest:
    return FinishedRequest(
        request_id=req.request_id,
        finish_reason=req.finish_reason or FinishReason.ABORT,
        output_token_ids=req.output_token_ids,
        num_prompt_tokens=req.num_prompt_tokens,
        num_cached_tokens=req.num_cached_tokens,
        num_preemptions=req.num_preemptions,
    )


def _check_sampled(sampled: Mapping, batch, items, sample_ids: set[str]) -> None:
    """Tokens must be int ids and cover every live request that samples; other ids only
    if they sampled in the step and were aborted since."""
    if sampled.keys() != sample_ids:
        for entry, item in zip(batch, items):
            if item.sample and entry.request.status is _RUNNING and item.request_id not in sampled:
                raise UnknownRequestError(
                    f"sampled has no token for request {item.request_id!r}, which the "
                    "last step scheduled to sample"
                )
        extra = [rid for rid in sampled if rid not in sample_ids]
        if extra:
            raise UnknownRequestError(
                f"sampled has tokens for {extra!r}, which the last step did not schedule to sample"
            )
    values = sampled.values()
    # At C speed for the common case: plain ints in range.
    if values and (
        set(map(type, values)) != _INT_ONLY or min(values) < 0 or max(values) > MAX_TOKEN_ID
    ):
        for rid, token in sampled.items():
            token_id(token, "sampled", rid)
