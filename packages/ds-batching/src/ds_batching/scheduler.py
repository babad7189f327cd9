"""The continuous-batching scheduler: one ``schedule()`` / ``update()`` pair per model step.

The rule, as in vLLM V1, is that every running request's computed tokens catch up
with its tokens (prompt + sampled). A step gives each request
``num_tokens - num_computed_tokens`` more, capped by the token budget (and the long
prefill threshold), so a decode gets 1 token, a prefill a chunk, and a request that
was preempted recomputes its prompt *and* its output so far, with no special case.

Order of one ``schedule()``:

1. Running requests, oldest first. When one needs a new KV block and the pool is
   empty, the lowest-priority running request (the newest under FCFS) is preempted:
   its blocks are freed, it goes back to the front of the waiting queue, and it will be
   recomputed. If the request itself is the lowest, it is the one preempted.
2. Waiting requests, in policy order, while the budget, ``max_num_seqs`` and the pool
   allow, each starting past its longest prefix-cache hit. None is admitted in a step
   that preempted (it would take the blocks just freed for the running ones). The head
   of the queue is never skipped, so FCFS cannot starve anyone.

``update(sampled)`` then appends one token per request that sampled, publishes newly
full blocks in the prefix cache, and finishes requests on EOS / stop ids / max_tokens.
"""

from __future__ import annotations

import itertools
import operator
import sys
from collections.abc import Mapping
from operator import itemgetter as _itemgetter

from ds_batching.block_manager import BlockManager
from ds_batching.config import SchedulerConfig
from ds_batching.errors import DuplicateRequestError, QueueFull, UnknownRequestError
from ds_batching.outputs import FinishedRequest, ScheduledRequest, SchedulerOutput, SchedulerStats
from ds_batching.queues import make_waiting_queue
from ds_batching.request import MAX_TOKEN_ID, FinishReason, Request, RequestStatus

__all__ = ["Scheduler"]

_RUNNING = RequestStatus.RUNNING
_INT_ONLY = {int}
_NEVER = sys.maxsize  # next_publish_at when prefix caching is off
_FINISHED = RequestStatus.FINISHED


class Scheduler:
    """Continuous batching over a paged KV pool with prefix caching (pure Python).

    Drive it from the engine loop::

        out = scheduler.schedule()          # SchedulerOutput: what to run this step
        sampled = run_model_and_sample(out) # {request_id: token_id} for s.sample
        finished = scheduler.update(sampled)

    ``schedule`` and ``update`` alternate; ``add`` and ``abort`` may come at any time.
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
        self._block_size = config.block_size
        self._publish_block = self.block_manager._publish  # unchecked: update()'s hot path
        self.waiting = make_waiting_queue(config.policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every waiting or running request
        self._seq = itertools.count()
        # (requests, their ScheduledRequest, ids that sample, in order) of the step in flight
        self._pending: tuple[list[Request], list[ScheduledRequest], list[str]] | None = None
        self._finished_since_schedule: list[str] = []
        self._aborted_since_update: list[FinishedRequest] = []
        self._aborted_in_flight = False  # an abort came between schedule() and update()
        self._num_preemptions = 0
        self._num_steps = 0
        self._prefix_queried = 0
        self._prefix_hits = 0

    # ---- requests in and out -------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request. Raises ``QueueFull`` when ``max_waiting`` requests wait, and a
        ``ValueError`` for a request that could never run under this config."""
        if not isinstance(request, Request):
            raise TypeError(f"request must be a ds_batching.Request, got {type(request).__name__}")
        if request.request_id in self.requests:
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
        if cfg.max_waiting is not None and len(self.waiting) >= cfg.max_waiting:
            raise QueueFull(len(self.waiting), cfg.max_waiting)
        request.seq_no = next(self._seq)
        stops = request.stop_token_ids
        request.stop_set = (
            stops | {request.eos_token_id} if request.eos_token_id is not None else stops
        )
        request.max_total_tokens = request.num_prompt_tokens + request.max_tokens
        self.requests[request.request_id] = request
        self.waiting.push(request)

    def abort(self, request_id: str) -> bool:
        """Drop a request at any point and free its blocks.

        Returns False when the id is unknown or already finished (a benign race for a
        server). The abort is reported by the next ``update`` (reason ``"abort"``) and in
        the next ``SchedulerOutput.finished_request_ids``.
        """
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        if request.status is _RUNNING:
            self.running.remove(request)
            self._release_blocks(request)
        else:
            self.waiting.remove(request)
        self._finish(request, FinishReason.ABORT)
        if self._pending is not None:
            self._aborted_in_flight = True
        self._aborted_since_update.append(self._finished_record(request))
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """The next model step's batch (possibly empty)."""
        if self._pending is not None:
            raise RuntimeError("schedule() called twice: call update() with the last step's tokens")
        cfg = self.config
        bm = self.block_manager
        block_size = cfg.block_size
        threshold = cfg.long_prefill_threshold if cfg.enable_chunked_prefill else 0
        budget = cfg.max_num_batched_tokens
        running = self.running
        items: list[ScheduledRequest] = []
        sample_ids: list[str] = []  # request ids that sample, in batch order
        preempted: list[str] = []

        # Fast path for steady decode: leading running requests that need exactly one
        # token whose slot their table already holds. Nothing here can preempt, so the
        # loop needs no index bookkeeping; the general loop below picks up where it stops.
        add_item = items.append
        add_sample_id = sample_ids.append
        try_append_block = bm.try_append_block
        for req in running if len(running) <= budget else running[:budget]:
            tokens = req.all_token_ids
            start = req.num_computed_tokens
            if len(tokens) != start + 1:
                break
            table = req.block_table
            if start >= len(table) * block_size:
                # Position ``start`` opens a new block: take a free one, or leave the
                # request (and any preemption) to the general loop.
                if start > len(table) * block_size or not try_append_block(table):
                    break
                req.table_snapshot = None
            req.num_computed_tokens = start + 1
            item = req.scheduled_item
            if item is None:  # first step of this request: the one object it will reuse
                item = self._emit(req, start, start + 1)
            else:
                # Only what changes in a decode is written; the block table only when the
                # table grew (item.block_table is req.table_snapshot while that is set).
                item.token_ids = tokens[start:]
                item.start_position = start
                item.sample = True
                if req.table_snapshot is None:
                    item.block_table = req.table_snapshot = tuple(table)
            add_item(item)
            add_sample_id(req.request_id)
        i = len(items)
        budget -= i
        reqs: list[Request] = running[:i]  # parallel to items

        while i < len(running) and budget > 0:
            req = running[i]
            tokens = req.all_token_ids
            num_tokens = len(tokens)
            start = req.num_computed_tokens
            num_new = num_tokens - start
            if num_new > 1:  # a prefill chunk (a decode is 1 and always fits)
                if threshold and num_new > threshold:
                    num_new = threshold
                if num_new > budget:
                    num_new = budget
            end = start + num_new
            table = req.block_table
            if end > len(table) * block_size:
                while not bm.can_append_slot(table, end):
                    victim = self._pick_victim()
                    victim_index = running.index(victim)
                    if victim_index < i:  # already scheduled this step: take it back
                        k = reqs.index(victim)
                        budget += len(items[k].token_ids)
                        if items[k].sample:
                            sample_ids.remove(victim.request_id)
                        del reqs[k], items[k]
                        i -= 1
                    self._preempt(victim)
                    preempted.append(victim.request_id)
                    if victim is req:
                        break
                if req.status is not _RUNNING:
                    continue  # req was preempted; running[i] is now the next request
                bm.append_slot(table, end)
                req.table_snapshot = None
            reqs.append(req)
            item = self._emit(req, start, end)
            items.append(item)
            if item.sample:
                sample_ids.append(req.request_id)
            budget -= num_new
            i += 1

        if not preempted:
            budget = self._admit_waiting(budget, reqs, items, sample_ids)

        self._num_steps += 1 if items else 0
        finished_ids = self._finished_since_schedule
        self._finished_since_schedule = []
        output = SchedulerOutput(
            scheduled=items,
            num_scheduled_tokens=cfg.max_num_batched_tokens - budget,
            preempted_request_ids=preempted,
            finished_request_ids=finished_ids,
            block_size=block_size,
        )
        if items:
            self._pending = (reqs, items.copy(), sample_ids)
        return output

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
        reqs, items, sample_ids = self._pending or ((), (), ())
        skip_aborted = self._aborted_in_flight
        # Check everything before changing anything, so a bad call can be retried.
        # Common case: exactly the sample ids, fetched in batch order at C speed (the ids
        # are unique, so equal counts and no missing id mean equal key sets).
        in_order: tuple | None = None
        if not skip_aborted and len(sampled) == len(sample_ids):
            try:
                in_order = (
                    _itemgetter(*sample_ids)(sampled)
                    if len(sample_ids) > 1
                    else tuple(sampled[rid] for rid in sample_ids)
                )
            except KeyError:
                pass
        if in_order is None:
            self._check_sampled_ids(sampled, reqs, items, set(sample_ids))
        values = sampled.values()
        if values:
            all_int = set(map(type, values)) == _INT_ONLY
            if not all_int or min(values) < 0 or max(values) > MAX_TOKEN_ID:
                for rid, token in sampled.items():
                    self._check_token(rid, token)
                if not all_int and in_order is not None:  # e.g. numpy integers
                    in_order = tuple(map(operator.index, in_order))
        self._pending = None
        self._aborted_in_flight = False
        finished: list[FinishedRequest] = []
        finish = self._finish_sampled
        publish = self._publish_full_blocks
        if in_order is not None and len(in_order) == len(reqs):
            # Every request in the step samples (steady decode): no per-item lookups.
            block_size = self._block_size
            publish_block = self._publish_block
            for req, token in zip(reqs, in_order):
                computed = req.num_computed_tokens
                if computed >= req.next_publish_at:
                    k = req.num_registered_blocks
                    start = k * block_size
                    end = start + block_size
                    if computed < end + block_size:
                        # One block filled (a decode's case): _publish_full_blocks inlined.
                        req.chain_parent = publish_block(
                            req.block_table[k], (req.chain_parent, *req.all_token_ids[start:end])
                        )
                        req.num_registered_blocks = k + 1
                        req.next_publish_at = end + block_size
                    else:
                        publish(req)
                tokens = req.all_token_ids
                tokens.append(token)
                if token in req.stop_set or len(tokens) >= req.max_total_tokens:
                    finished.append(finish(req, token))
        else:
            for req, item in zip(reqs, items):
                if skip_aborted and req.status is not _RUNNING:
                    continue  # aborted after schedule()
                if req.num_computed_tokens >= req.next_publish_at:
                    publish(req)
                if not item.sample:
                    continue
                token = sampled[item.request_id]
                if type(token) is not int:  # e.g. a numpy integer: keep plain ints
                    token = operator.index(token)
                tokens = req.all_token_ids
                tokens.append(token)
                if token in req.stop_set or len(tokens) >= req.max_total_tokens:
                    finished.append(finish(req, token))
        if finished:
            self.running = [r for r in self.running if r.status is _RUNNING]
        if self._aborted_since_update:
            finished.extend(self._aborted_since_update)
            self._aborted_since_update = []
        return finished

    # ---- figures -------------------------------------------------------------------

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preempted_waiting=sum(
                1 for r in self.waiting if r.status is RequestStatus.PREEMPTED
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

    @staticmethod
    def _emit(req: Request, start: int, end: int) -> ScheduledRequest:
        """Schedule ``req``'s tokens ``start:end`` in this step, as its ScheduledRequest.

        Each request has one ``ScheduledRequest``, created at its first step and updated
        in place afterwards (constructing ~256 objects per step was the largest part of
        ``schedule()``); a ``SchedulerOutput`` is therefore valid until the next
        ``schedule()``.
        """
        snapshot = req.table_snapshot
        if snapshot is None:
            snapshot = req.table_snapshot = tuple(req.block_table)
        req.num_computed_tokens = end
        tokens = req.all_token_ids
        item = req.scheduled_item
        if item is None:
            item = req.scheduled_item = ScheduledRequest(
                req.request_id,
                tokens[start:end],
                start,
                snapshot,
                end == len(tokens),
                req.sampling_params,
                req.lora_name,
            )
        else:
            item.token_ids = tokens[start:end]
            item.start_position = start
            item.block_table = snapshot
            item.sample = end == len(tokens)
        return item

    def _admit_waiting(
        self,
        budget: int,
        reqs: list[Request],
        items: list[ScheduledRequest],
        sample_ids: list[str],
    ) -> int:
        cfg = self.config
        bm = self.block_manager
        block_size = cfg.block_size
        waiting = self.waiting
        running = self.running
        while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            req = waiting.peek()
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
            req.table_snapshot = None
            req.num_registered_blocks = len(hits)
            req.chain_parent = bm.prefix_id(hits[-1]) if hits else req.lora_name
            req.next_publish_at = (
                (len(hits) + 1) * block_size if cfg.enable_prefix_caching else _NEVER
            )
            req.num_computed_tokens = num_cached
            if req.status is RequestStatus.WAITING:
                req.num_cached_tokens = num_cached
            req.status = _RUNNING
            self._prefix_queried += num_tokens
            self._prefix_hits += num_cached
            running.append(req)
            reqs.append(req)
            item = self._emit(req, num_cached, end)
            items.append(item)
            if item.sample:
                sample_ids.append(req.request_id)
            budget -= num_new
        return budget

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.seq_no))
        return self.running[-1]

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release_blocks(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.push_front(req)

    def _release_blocks(self, req: Request) -> None:
        self.block_manager.free(req.block_table)
        req.block_table = []
        req.table_snapshot = None
        req.num_registered_blocks = 0
        req.chain_parent = req.lora_name
        req.next_publish_at = _NEVER

    def _publish_full_blocks(self, req: Request) -> None:
        """Publish ``req``'s newly full, computed blocks in the prefix cache (caching on).

        Each block's key is ``(parent, *its tokens)``, chained on the prefix id the
        previous block's publication returned (``req.chain_parent``).
        """
        block_size = self._block_size
        num_full = req.num_computed_tokens // block_size
        k = req.num_registered_blocks
        tokens = req.all_token_ids
        table = req.block_table
        publish = self._publish_block
        parent = req.chain_parent
        start = k * block_size
        while k < num_full:
            end = start + block_size
            parent = publish(table[k], (parent, *tokens[start:end]))
            k += 1
            start = end
        req.chain_parent = parent
        req.num_registered_blocks = num_full
        req.next_publish_at = (num_full + 1) * block_size

    def _finish_sampled(self, req: Request, token: int) -> FinishedRequest:
        """Finish ``req`` after it sampled its last token (EOS / stop id wins over length)."""
        reason = FinishReason.STOP if token in req.stop_set else FinishReason.LENGTH
        del self.requests[req.request_id]
        self._release_blocks(req)
        self._finish(req, reason)
        return self._finished_record(req)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.status = _FINISHED
        req.finish_reason = reason
        self._finished_since_schedule.append(req.request_id)

    @staticmethod
    def _finished_record(req: Request) -> FinishedRequest:
        return FinishedRequest(
            request_id=req.request_id,
            finish_reason=req.finish_reason or FinishReason.ABORT,
            output_token_ids=req.output_token_ids,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            num_preemptions=req.num_preemptions,
        )

    @staticmethod
    def _check_sampled_ids(sampled, reqs, items, sample_ids) -> None:
        """Tokens must cover every live request that samples; others only if aborted."""
        for req, item in zip(reqs, items):
            if item.sample and req.status is _RUNNING and item.request_id not in sampled:
                raise UnknownRequestError(
                    f"sampled has no token for request {item.request_id!r}, which the "
                    "last step scheduled to sample"
                )
        extra = [rid for rid in sampled if rid not in sample_ids]
        if extra:
            raise UnknownRequestError(
                f"sampled has tokens for {extra!r}, which the last step did not schedule to sample"
            )

    @staticmethod
    def _check_token(request_id: str, token: object) -> int:
        try:
            value = operator.index(token)
        except TypeError:
            raise TypeError(
                f"sampled[{request_id!r}] must be an int token id, got {type(token).__name__}"
            ) from None
        if not 0 <= value <= MAX_TOKEN_ID:
            raise ValueError(
                f"sampled[{request_id!r}] must be a token id in [0, 2**63), got {value}"
            )
        return value
