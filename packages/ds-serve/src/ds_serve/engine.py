"""The engine: a background thread that drives the scheduler and the model runner.

One loop iteration is one model step:

1. apply aborts that arrived since the last step (their blocks go back to the pool
   before anything else is scheduled);
2. ``scheduler.schedule()`` picks the batch: decodes plus (chunked) prefills within the
   token budget, each with its block table;
3. ``runner.step(...)`` runs the mixed batch on the paged KV cache and returns the
   last-position logits of each scheduled sequence (and every position's logits for
   the sequences whose prompt is being scored);
4. the sampler (``ds_model.sampling``) draws a token for every sequence whose prompt
   is complete, in one batched call, with the logprobs the requests asked for;
5. ``scheduler.update(...)`` appends them and finishes requests on EOS / max_tokens;
   the engine detokenizes, matches stop strings (a hit aborts the request in the
   scheduler), and posts the text deltas to each request's asyncio queue.

The model step runs in a thread, not on the event loop, so HTTP keeps being served
while torch computes; the thread hands results to the loop with
``call_soon_threadsafe``, at most once per step: a step whose deltas find an earlier
delivery still pending adds them to it without waking the loop again. HTTP handlers never touch the scheduler
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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from ds_batching import QueueFull, Request, Scheduler

from ds_serve.detokenizer import IncrementalDetokenizer, StopMatcher
from ds_serve.metrics import Metrics
from ds_serve.sampling import Sampled, SamplingParams, sample
from ds_serve.structured import Grammar, GrammarCompiler, GrammarSpec

__all__ = ["Delta", "Engine", "EngineClosed", "RequestTooLarge", "TokenLogprob"]

log = logging.getLogger("ds_serve.engine")

GIL_SWITCH_INTERVAL = 0.0005  # seconds


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


class RequestTooLarge(ValueError):
    """A request with more sequences than the engine could ever admit at once (HTTP 400)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the ``top`` most likely tokens at its position,
    as (token id, logprob) pairs, most likely first. ``logprob`` is None for the first
    prompt token, which nothing predicts."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Delta:
    """New output of one request. The last delta of a request has ``finish_reason`` set:
    ``stop`` (EOS or a stop string), ``length`` (max_tokens) or ``abort``.

    ``logprobs``: one entry per id in ``token_ids`` when the request asked for them.
    ``prompt_logprobs``: one entry per prompt token, on the request's first delta, when
    it asked for them."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


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
    # Prompt scoring: entry p scores prompt token p, filled chunk by chunk.
    prompt_scores: list[TokenLogprob | None] | None = None
    grammar: Grammar | None = None


class Engine:
    """Continuous batching over a ds-batching ``Scheduler`` and a ds-model ``ModelRunner``.

    ``scheduler`` and ``runner`` are built by ``ds_serve.server.build_engine``;
    ``tokenizer`` is ds-model's tokenizer (``encode`` / ``decode`` /
    ``apply_chat_template``).
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
        # Deltas made on the engine thread, not yet delivered on the loop (see _post).
        self._outbox: list[tuple[asyncio.Queue, Delta]] = []
        self._outbox_lock = threading.Lock()
        self._streams: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopped = False
        self.aborted_total = 0
        self.error: BaseException | None = None
        self._grammar_compiler: GrammarCompiler | None = None
        self._sink: Callable[[list[Delta]], None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    def start(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        sink: Callable[[list[Delta]], None] | None = None,
    ) -> None:
        """Start the engine thread; deltas are delivered on ``loop`` (default: the running
        one) into each request's queue, or, with ``sink``, handed to ``sink`` on the
        engine thread once per step (an engine process writes them to its pipe)."""
        if self._thread is not None:
            return
        if sink is None:
            # The engine thread and the event loop share the GIL; at Python's default 5
            # ms switch interval the loop waits up to 5 ms per wake-up behind the model
            # step (measured: half the streamed tokens/s). Process-wide, hence only lowered.
            if sys.getswitchinterval() > GIL_SWITCH_INTERVAL:
                sys.setswitchinterval(GIL_SWITCH_INTERVAL)
            self._loop = loop or asyncio.get_running_loop()
        self._sink = sink
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
        close = getattr(self.runner, "close", None)
        if close is not None:  # a tensor-parallel runner stops its other ranks
            close()

    def fail(self, error: BaseException) -> None:
        """Stop serving because of ``error`` (a tensor-parallel rank stopped): in-flight
        requests end with finish_reason ``abort``, new ones get a 503 naming ``error``,
        /health turns 503. Callable from any thread."""
        with self._lock:
            if self.error is None:
                self.error = error
            posts = [self._finish(t, "abort") for t in list(self._tracked.values())]
            self._stopped = True
            self._wake.notify()
        self._post(posts)

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
        own = asyncio.Queue() if queue is None else None
        (request_id,) = self.submit_all(
            [(prompt_token_ids, params)],
            adapter=adapter,
            queue=own if own is not None else queue,
            grammars=[grammar],
            skip_special_tokens=skip_special_tokens,
        )
        if own is not None:
            self._streams[request_id] = own
        return request_id

    def submit_all(
        self,
        sequences: list[tuple[list[int], SamplingParams]],
        *,
        adapter: str | None = None,
        queue: asyncio.Queue,
        grammars: list[Grammar | None] | None = None,
        skip_special_tokens: bool = True,
        include_stop_str: bool = False,
    ) -> list[str]:
        """Queue the sequences of one HTTP request together or not at all: with too little
        room in the waiting queue nothing is queued and ``QueueFull`` (429) is raised, so
        a refused request never holds places that would shut out the next one. More
        sequences than the waiting queue holds can never be admitted: ``RequestTooLarge``
        (400); a sequence the KV pool could never hold: ``ValueError`` (400).
        ``grammars`` holds one grammar state (or None) per sequence;
        ``skip_special_tokens=False`` keeps special tokens in the text and
        ``include_stop_str`` the matched stop string."""
        if self._loop is None and self._sink is None:
            raise EngineClosed("the engine has not been started")
        if adapter is not None and adapter not in self.adapters:
            # Checked here, not in the loop: an unknown name there would fail the whole step.
            raise ValueError(
                f"adapter={adapter!r} is not loaded; loaded adapters: {list(self.adapters)} "
                "(or None for the base model)"
            )
        max_waiting = self.scheduler.config.max_waiting
        if max_waiting is not None and len(sequences) > max_waiting:
            raise RequestTooLarge(
                f"{len(sequences)} sequences (prompts x n) can never be admitted together: "
                f"at most {max_waiting} wait at once (--max-waiting {max_waiting})"
            )
        grammars = grammars if grammars is not None else [None] * len(sequences)
        tracked = [
            self._track(
                prompt, params, adapter, queue, grammar, skip_special_tokens, include_stop_str
            )
            for (prompt, params), grammar in zip(sequences, grammars)
        ]
        with self._lock:
            if self.error is not None:
                raise EngineClosed(f"the engine loop failed ({self.error!r}); restart the server")
            if self._closing:
                raise EngineClosed("the server is shutting down")
            waiting = self.scheduler.stats().num_waiting
            if max_waiting is not None and waiting + len(tracked) > max_waiting:
                self.metrics.on_reject()
                raise QueueFull(waiting, max_waiting)
            added: list[str] = []
            try:
                for t in tracked:
                    self.scheduler.add(self._request(t.request_id, t.prompt_ids, t.params, adapter))
                    added.append(t.request_id)
            except BaseException:
                for rid in added:  # not scheduled yet: dropping them leaves no trace
                    self.scheduler.abort(rid)
                raise
            self._tracked.update((t.request_id, t) for t in tracked)
            self._wake.notify()
        for t in tracked:
            self.metrics.on_prompt(len(t.prompt_ids))
        return [t.request_id for t in tracked]

    async def submit_request(
        self,
        sequences: list[tuple[list[int], SamplingParams]],
        *,
        queue: asyncio.Queue,
        grammar: GrammarSpec | None = None,
        adapter: str | None = None,
        skip_special_tokens: bool = True,
        include_stop_str: bool = False,
    ) -> list[str]:
        """``submit_all`` as the HTTP layer calls it (``EngineClient`` has the same):
        ``grammar`` is compiled here (``GrammarError`` for one that does not compile)
        and every sequence advances its own copy."""
        return self.submit_all(
            sequences,
            adapter=adapter,
            queue=queue,
            grammars=self.compile_grammars(grammar, len(sequences)),
            skip_special_tokens=skip_special_tokens,
            include_stop_str=include_stop_str,
        )

    def compile_grammars(self, spec: GrammarSpec | None, n: int) -> list[Grammar] | None:
        """``n`` copies of ``spec``'s grammar in its start state (None without a spec)."""
        if spec is None:
            return None
        grammar = self.grammar_compiler.compile(spec)
        return [grammar.fork() for _ in range(n)]

    async def current_stats(self) -> dict[str, float]:
        """``stats()`` as the HTTP layer reads it (``EngineClient`` asks its process)."""
        return self.stats()

    async def metrics_text(self) -> str:
        """The Prometheus exposition of ``metrics`` with the live gauges."""
        return self.metrics.render(self.stats())

    def count_unknown_fields(self, count: int) -> None:
        self.metrics.on_unknown_fields(count)

    def _track(
        self,
        prompt: list[int],
        params: SamplingParams,
        adapter: str | None,
        queue: asyncio.Queue,
        grammar: Grammar | None,
        skip_special_tokens: bool,
        include_stop_str: bool = False,
    ) -> _Tracked:
        decode = self.tokenizer.decode
        if not skip_special_tokens:
            decode = functools.partial(decode, skip_special_tokens=False)
        tracked = _Tracked(
            request_id=f"req-{next(self._ids)}",
            prompt_ids=list(prompt),
            params=params,
            adapter=adapter,
            queue=queue,
            detokenizer=IncrementalDetokenizer(decode, prompt),
            stop=StopMatcher(params.stop, include=include_stop_str),
            grammar=grammar,
        )
        if params.prompt_logprobs is not None:
            tracked.prompt_scores = [TokenLogprob(prompt[0], None)]
            tracked.prompt_scores += [None] * (len(prompt) - 1)
        return tracked

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
            # max_tokens=0 (score the prompt only) runs the prefill and drops the token.
            max(1, params.max_tokens),
            eos_token_id=eos,
            stop_token_ids=others,
            sampling_params=params,
            lora_name=adapter,
            # Scoring every prompt token needs every prompt position's logits, which a
            # prefix-cache hit would skip: such requests compute their whole prompt.
            skip_prefix_cache=params.prompt_logprobs is not None,
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
            if self.error is None:  # fail() may have named the cause first
                self.error = exc
            with self._lock:
                posts = [self._finish(t, "abort") for t in list(self._tracked.values())]
            self._post(posts)

    def _step(self, batch: Any) -> None:
        # With adapters loaded every step names each row's adapter (None: the base), even
        # a batch of base requests only: left to itself ds-lora applies the last loaded
        # adapter to everything. A server without adapters passes nothing, so any runner
        # with the plain step(token_ids, positions, block_tables) works.
        extra: dict[str, Any] = {}
        if self.adapters:
            extra["adapters"] = [s.lora_name for s in batch.scheduled]
        scoring = [self._scores_prompt(s) for s in batch.scheduled]
        if any(scoring):
            # Only when some row scores its prompt: any runner with the plain step works.
            extra["all_positions"] = scoring
        logits = self.runner.step(batch.token_ids, batch.positions, batch.block_tables, **extra)
        if any(scoring):
            logits, per_position = logits
            self._score_prompts(batch, per_position)
        rows = [i for i, s in enumerate(batch.scheduled) if s.sample]
        sampled: dict[str, int] = {}
        token_logprobs: dict[str, TokenLogprob] = {}
        if rows:
            sampling = [self._tracked[batch.scheduled[i].request_id] for i in rows]
            params = [t.params for t in sampling]
            repetition = any(p.repetition_penalty != 1.0 for p in params)
            # When every row samples (a decode-only step), the logits need no copy.
            picked = logits if len(rows) == logits.shape[0] else logits[rows]
            result = sample(
                picked,
                params,
                output_ids=[t.output_ids for t in sampling],
                prompt_ids=[t.prompt_ids for t in sampling] if repetition else None,
                allowed=self._allowed([t.grammar for t in sampling], logits.shape[-1]),
            )
            tokens = result.token_ids.tolist()
            sampled = {batch.scheduled[i].request_id: t for i, t in zip(rows, tokens)}
            if result.logprobs is not None:
                token_logprobs = _token_logprobs(result, sampling, tokens)
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
                    posts.append(
                        self._on_token(
                            tracked, token, reasons.get(rid), now, token_logprobs.get(rid)
                        )
                    )
        self._post(posts)

    def _scores_prompt(self, item: Any) -> bool:
        """Whether this step's chunk of the request holds prompt positions to score."""
        tracked = self._tracked.get(item.request_id)
        return (
            tracked is not None
            and tracked.prompt_scores is not None
            and item.start_position < len(tracked.prompt_ids) - 1
        )

    def _score_prompts(self, batch: Any, per_position: list) -> None:
        """Record the logprob of each prompt token the step's chunks predict: the logits
        at position p score prompt token p + 1 (the model's own distribution)."""
        for item, logits in zip(batch.scheduled, per_position):
            if logits is None:
                continue
            tracked = self._tracked[item.request_id]
            start, prompt = item.start_position, tracked.prompt_ids
            targets = prompt[start + 1 : start + 1 + logits.shape[0]]
            logits = logits[: len(targets)].float()
            # logprob = logit - logsumexp: no (tokens, vocab) log_softmax is materialised.
            norm = logits.logsumexp(dim=-1, keepdim=True)
            index = torch.tensor(targets, device=logits.device)[:, None]
            chosen = (logits.gather(1, index) - norm)[:, 0].tolist()
            k = tracked.params.prompt_logprobs
            top = logits.topk(k, dim=-1) if k else None
            top_ids = top.indices.tolist() if top is not None else [[]] * len(targets)
            top_lps = (top.values - norm).tolist() if top is not None else [[]] * len(targets)
            for j, token in enumerate(targets):
                tracked.prompt_scores[start + 1 + j] = TokenLogprob(
                    token, chosen[j], tuple(zip(top_ids[j], top_lps[j]))
                )

    def _allowed(self, grammars: list[Grammar | None], vocab: int) -> torch.Tensor | None:
        """(rows, vocab) bool: what each row's grammar allows next (every token for rows
        without one); None when no row has a grammar."""
        rows = [k for k, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        allowed = torch.ones((len(grammars), vocab), dtype=torch.bool)
        allowed[rows] = self.grammar_compiler.allowed([grammars[k] for k in rows])
        return allowed

    def _on_token(
        self,
        tracked: _Tracked,
        token: int,
        finish_reason: str | None,
        now: float,
        logprob: TokenLogprob | None = None,
    ) -> tuple[asyncio.Queue, Delta]:
        if tracked.params.max_tokens == 0:
            # Prompt scoring only: the prefill's token is not part of the answer (the
            # scheduler ran the request with max_tokens 1, so it has finished it).
            return self._finish(tracked, "length")
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
            return self._finish(tracked, finish_reason, text, [token], logprob)
        return tracked.queue, self._delta(tracked, text, [token], None, logprob)

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
        self,
        tracked: _Tracked,
        reason: str,
        text: str = "",
        token_ids: list[int] | None = None,
        logprob: TokenLogprob | None = None,
    ) -> tuple[asyncio.Queue, Delta]:
        tracked.finished = True
        self._tracked.pop(tracked.request_id, None)
        self.metrics.on_finish(reason, time.perf_counter() - tracked.arrival)
        return tracked.queue, self._delta(tracked, text, token_ids or [], reason, logprob)

    @staticmethod
    def _delta(
        tracked: _Tracked,
        text: str,
        ids: list[int],
        reason: str | None,
        logprob: TokenLogprob | None = None,
    ) -> Delta:
        prompt_logprobs = None
        if tracked.prompt_scores is not None and reason != "abort":
            # Sent once, on the first delta; every entry is filled once the prompt is.
            prompt_logprobs, tracked.prompt_scores = tracked.prompt_scores, None
        return Delta(
            request_id=tracked.request_id,
            text=text,
            token_ids=ids,
            finish_reason=reason,
            prompt_tokens=len(tracked.prompt_ids),
            completion_tokens=len(tracked.output_ids),
            logprobs=[logprob] if logprob is not None and ids else None,
            prompt_logprobs=prompt_logprobs,
        )

    def _post(self, posts: list[tuple[asyncio.Queue, Delta]]) -> None:
        """Hand deltas to the event loop. Waking the loop (``call_soon_threadsafe``
        writes to its self-pipe, and the loop's thread then competes for the GIL) is the
        costly part, so it happens only when the outbox was empty: while a delivery is
        still pending, later steps' deltas join it and go out in the same callback."""
        if not posts:
            return
        if self._sink is not None:
            self._sink([delta for _, delta in posts])
            return
        if self._loop is None or self._loop.is_closed():
            return
        with self._outbox_lock:
            pending = bool(self._outbox)
            self._outbox.extend(posts)
        if not pending:
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        """On the event loop: every delta in the outbox into its queue, in order."""
        with self._outbox_lock:
            posts, self._outbox = self._outbox, []
        for queue, delta in posts:
            queue.put_nowait(delta)


def _token_logprobs(
    result: Sampled, tracked: list[_Tracked], tokens: list[int]
) -> dict[str, TokenLogprob]:
    """The sampled tokens' logprobs for the rows that asked, read off the sampler."""
    chosen = result.logprobs.tolist()
    top_ids = result.top_ids.tolist()
    top_lps = result.top_logprobs.tolist()
    out = {}
    for row, t in enumerate(tracked):
        k = t.params.logprobs
        if k is not None:
            top = tuple(zip(top_ids[row][:k], top_lps[row][:k]))
            out[t.request_id] = TokenLogprob(tokens[row], chosen[row], top)
    return out
