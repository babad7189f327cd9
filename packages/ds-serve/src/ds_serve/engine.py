"""The engine: a background thread that drives the scheduler and the model runner.

One loop iteration is one model step:

1. apply aborts that arrived since the last step (their blocks go back to the pool
   before anything else is scheduled);
2. ``scheduler.schedule()`` picks the batch: decodes plus (chunked) prefills within the
   token budget, each with its block table;
3. ``runner.step(...)`` runs the mixed batch on the paged KV cache and returns the
   last-position logits of each scheduled sequence;
4. the sampler draws a token for every sequence whose prompt is complete;
5. ``scheduler.update(...)`` appends them and finishes requests on EOS / max_tokens;
   the engine detokenizes, matches stop strings (a hit aborts the request in the
   scheduler), and posts the text deltas to each request's asyncio queue.

The model step runs in a thread, not on the event loop, so HTTP keeps being served
while torch computes; the thread hands results to the loop with
``call_soon_threadsafe``, once per step. HTTP handlers never touch the scheduler
directly except ``add`` (under the lock, so ``QueueFull`` reaches the caller as a 429).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ds_batching import QueueFull, Request, Scheduler

from ds_serve.detokenizer import IncrementalDetokenizer, StopMatcher
from ds_serve.metrics import Metrics
from ds_serve.sampling import SamplingParams, sample
from ds_serve.structured import Grammar, GrammarCompiler, apply_allowed

__all__ = ["Delta", "Engine", "EngineClosed"]

log = logging.getLogger("ds_serve.engine")

GIL_SWITCH_INTERVAL = 0.0005  # seconds


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class Delta:
    """New output of one request. The last delta of a request has ``finish_reason`` set:
    ``stop`` (EOS or a stop string), ``length`` (max_tokens) or ``abort``."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Tracked:
    """The engine's per-request state, next to the scheduler's."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    queue: asyncio.Queue
    detokenizer: IncrementalDetokenizer
    stop: StopMatcher
    arrival: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    grammar: Grammar | None = None


class Engine:
    """Continuous batching over a ds-batching ``Scheduler`` and a ds-model ``ModelRunner``.

    ``scheduler`` and ``runner`` are built by ``ds_serve.loading``; ``tokenizer`` offers
    ``encode`` / ``decode`` / ``apply_chat_template`` (see ``loading.TokenizerView``).
    """

    def __init__(
        self,
        *,
        scheduler: Scheduler,
        runner: Any,
        tokenizer: Any,
        model_name: str,
        adapters: tuple[str, ...] = (),
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.adapters = adapters
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.metrics = Metrics(model_name)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._tracked: dict[str, _Tracked] = {}
        self._pending_aborts: set[str] = set()
        self._streams: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopped = False
        self.aborted_total = 0
        self.error: BaseException | None = None
        self._grammar_compiler: GrammarCompiler | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread; deltas are delivered on ``loop`` (default: the running one)."""
        if self._thread is not None:
            return
        # The engine thread and the event loop share the GIL; at Python's default 5 ms
        # switch interval the loop waits up to 5 ms per wake-up behind the model step
        # (measured: half the streamed tokens/s). This is process-wide, hence only lowered.
        if sys.getswitchinterval() > GIL_SWITCH_INTERVAL:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="ds-serve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Refuse new requests, abort the ones still in flight, stop the thread."""
        with self._lock:
            self._closing = True
            self._pending_aborts.update(self._tracked)
            self._wake.notify()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._tracked:
                    break
            time.sleep(0.01)
        with self._lock:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Take no new requests (``submit`` raises ``EngineClosed``); in-flight ones go on."""
        with self._lock:
            self._closing = True

    def abort_all(self) -> None:
        with self._lock:
            self._pending_aborts.update(self._tracked)
            self._wake.notify()

    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._tracked)

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """Compiles ``response_format`` and forced tool-call grammars (built on first use:
        reading the vocabulary takes a moment, and most servers never need it)."""
        if self._grammar_compiler is None:
            self._grammar_compiler = GrammarCompiler(
                self.tokenizer, vocab_size=self.vocab_size, eos_ids=self.eos_token_ids
            )
        return self._grammar_compiler

    # ---- the EngineProtocol ------------------------------------------------------------

    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        adapter: str | None = None,
        queue: asyncio.Queue | None = None,
        grammar: Grammar | None = None,
        skip_special_tokens: bool = True,
    ) -> str:
        """Queue a request; returns its id. Raises ``QueueFull`` (429) or ``EngineClosed``.

        ``queue`` lets several requests (the n choices of one HTTP request) share one
        output queue; by default each request gets its own, read with ``stream``.
        ``grammar`` constrains every sampled token; the request ends when it terminates.
        ``skip_special_tokens=False`` keeps special tokens in the text (tool-call markers).
        """
        if self._loop is None:
            raise EngineClosed("the engine has not been started")
        if adapter is not None and adapter not in self.adapters:
            # Checked here, not in the loop: an unknown name there would fail the whole step.
            raise ValueError(
                f"adapter={adapter!r} is not loaded; loaded adapters: {list(self.adapters)} "
                "(or None for the base model)"
            )
        request_id = f"req-{next(self._ids)}"
        tracked = _Tracked(
            request_id=request_id,
            prompt_ids=list(prompt_token_ids),
            params=params,
            adapter=adapter,
            queue=queue if queue is not None else asyncio.Queue(),
            detokenizer=IncrementalDetokenizer(
                self.tokenizer.decode
                if skip_special_tokens
                else functools.partial(self.tokenizer.decode, skip_special_tokens=False),
                prompt_token_ids,
            ),
            stop=StopMatcher(params.stop),
            grammar=grammar,
        )
        with self._lock:
            if self.error is not None:
                raise EngineClosed(f"the engine loop failed ({self.error!r}); restart the server")
            if self._closing:
                raise EngineClosed("the server is shutting down")
            try:
                self.scheduler.add(self._request(request_id, prompt_token_ids, params, adapter))
            except QueueFull:
                self.metrics.on_reject()
                raise
            self._tracked[request_id] = tracked
            if queue is None:
                self._streams[request_id] = tracked.queue
            self._wake.notify()
        self.metrics.on_prompt(len(prompt_token_ids))
        return request_id

    async def stream(self, request_id: str) -> AsyncIterator[Delta]:
        """The request's deltas until its finish (for requests submitted without ``queue``)."""
        queue = self._streams.get(request_id)
        if queue is None:
            raise KeyError(f"unknown request_id {request_id!r}, or it was already streamed")
        try:
            while True:
                delta: Delta = await queue.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Abort at any time; the engine thread frees the request's blocks before its next step."""
        with self._lock:
            if request_id in self._tracked:
                self._pending_aborts.add(request_id)
                self._wake.notify()

    # ---- figures -----------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        with self._lock:
            stats = self.scheduler.stats()
            return {
                "running": stats.num_running,
                "waiting": stats.num_waiting,
                "kv_usage": stats.kv_usage,
                # Cached prefix blocks are unreferenced and evictable: free for a new request.
                "free_blocks": stats.num_free_blocks + stats.num_cached_blocks,
                "num_blocks": self.scheduler.config.num_blocks,
                "prefix_queries": stats.prefix_cache_queried_tokens,
                "prefix_hits": stats.prefix_cache_hit_tokens,
                "preemptions": stats.num_preemptions_total,
                "tracked": len(self._tracked),
                "aborted": self.aborted_total,
            }

    @staticmethod
    def _request(
        request_id: str, prompt: list[int], params: SamplingParams, adapter: str | None
    ) -> Request:
        eos, *others = params.stop_token_ids or (None,)
        return Request(
            request_id,
            prompt,
            params.max_tokens,
            eos_token_id=eos,
            stop_token_ids=others,
            sampling_params=params,
            lora_name=adapter,
        )

    # ---- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    self._apply_aborts()
                    while not self._tracked and not self._stopped:
                        self._wake.wait()
                    if self._stopped:
                        return
                    batch = self.scheduler.schedule()
                if batch.is_empty:
                    # Everything tracked is waiting on blocks that only a finish can free,
                    # or was aborted between the lock releases: wait briefly for news.
                    with self._lock:
                        self._wake.wait(timeout=0.005)
                    continue
                self._step(batch)
        except BaseException as exc:  # the loop must never die silently
            log.exception("engine loop failed; failing every request in flight")
            self.error = exc
            with self._lock:
                posts = [self._finish(t, "abort") for t in list(self._tracked.values())]
            self._post(posts)

    def _step(self, batch: Any) -> None:
        # With adapters loaded every step names each row's adapter (None: the base), even
        # a batch of base requests only: left to itself ds-lora applies the last loaded
        # adapter to everything. A server without adapters passes nothing, so any runner
        # with the plain step(token_ids, positions, block_tables) works.
        extra = {"adapters": [s.lora_name for s in batch.scheduled]} if self.adapters else {}
        logits = self.runner.step(batch.token_ids, batch.positions, batch.block_tables, **extra)
        rows = [i for i, s in enumerate(batch.scheduled) if s.sample]
        sampled: dict[str, int] = {}
        if rows:
            params = [self._tracked[batch.scheduled[i].request_id].params for i in rows]
            grammars = [self._tracked[batch.scheduled[i].request_id].grammar for i in rows]
            tokens = sample(self._constrain(logits[rows], grammars), params)
            sampled = {batch.scheduled[i].request_id: t for i, t in zip(rows, tokens)}
        now = time.perf_counter()
        posts: list[tuple[asyncio.Queue, Delta]] = []
        with self._lock:
            # Aborts first: the scheduler frees their blocks and ignores their tokens.
            self._apply_aborts(posts)
            finished = self.scheduler.update(sampled)
            reasons = {f.request_id: str(f.finish_reason) for f in finished}
            for rid, token in sampled.items():
                tracked = self._tracked.get(rid)
                if tracked is not None:
                    posts.append(self._on_token(tracked, token, reasons.get(rid), now))
        self._post(posts)

    def _constrain(self, logits: Any, grammars: list[Grammar | None]) -> Any:
        """The rows' logits (a copy: indexed by row list) with the tokens their grammars
        forbid at -inf."""
        rows = [k for k, g in enumerate(grammars) if g is not None]
        if not rows:
            return logits
        allowed = self.grammar_compiler.allowed([grammars[k] for k in rows])
        return apply_allowed(logits, rows, allowed)

    def _on_token(
        self, tracked: _Tracked, token: int, finish_reason: str | None, now: float
    ) -> tuple[asyncio.Queue, Delta]:
        first = tracked.last_token_at is None
        self.metrics.on_token(
            ttft=now - tracked.arrival if first else None,
            itl=None if first else now - tracked.last_token_at,
        )
        tracked.last_token_at = now
        tracked.output_ids.append(token)
        is_eos = finish_reason == "stop" and token in tracked.params.stop_token_ids
        text = "" if is_eos else tracked.stop.push(tracked.detokenizer.push(token))
        if tracked.grammar is not None and not is_eos:
            tracked.grammar.accept(token)
        grammar_done = tracked.grammar is not None and tracked.grammar.terminated
        if (tracked.stop.stopped or grammar_done) and finish_reason is None:
            # A stop string or a complete grammar ends the request here; the scheduler
            # frees its blocks now.
            self.scheduler.abort(tracked.request_id)
            finish_reason = "stop"
        if finish_reason is not None:
            if not tracked.stop.stopped:
                text += tracked.stop.push(tracked.detokenizer.flush()) + tracked.stop.flush()
            return self._finish(tracked, finish_reason, text, [token])
        return tracked.queue, self._delta(tracked, text, [token], None)

    def _apply_aborts(self, posts: list | None = None) -> None:
        """Under the lock: abort what clients gave up on; their blocks are free on return."""
        aborted = []
        for rid in self._pending_aborts:
            tracked = self._tracked.get(rid)
            if tracked is None:
                continue
            self.scheduler.abort(rid)
            self.aborted_total += 1
            log.info("aborted %s after %d tokens", rid, len(tracked.output_ids))
            aborted.append(self._finish(tracked, "abort"))
        self._pending_aborts.clear()
        if posts is not None:
            posts.extend(aborted)
        else:
            self._post(aborted)

    def _finish(
        self, tracked: _Tracked, reason: str, text: str = "", token_ids: list[int] | None = None
    ) -> tuple[asyncio.Queue, Delta]:
        tracked.finished = True
        self._tracked.pop(tracked.request_id, None)
        self.metrics.on_finish(reason, time.perf_counter() - tracked.arrival)
        return tracked.queue, self._delta(tracked, text, token_ids or [], reason)

    @staticmethod
    def _delta(tracked: _Tracked, text: str, ids: list[int], reason: str | None) -> Delta:
        return Delta(
            request_id=tracked.request_id,
            text=text,
            token_ids=ids,
            finish_reason=reason,
            prompt_tokens=len(tracked.prompt_ids),
            completion_tokens=len(tracked.output_ids),
        )

    def _post(self, posts: list[tuple[asyncio.Queue, Delta]]) -> None:
        if posts and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_deliver, posts)


def _deliver(posts: list[tuple[asyncio.Queue, Delta]]) -> None:
    for queue, delta in posts:
        queue.put_nowait(delta)
