"""One HTTP request's generation: its n choices in the engine, and the OpenAI bodies
(non-streamed) or server-sent events (streamed) built from their deltas.

Choice ``i`` of a request with several prompts is prompt ``i // n``, sample ``i % n``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from ds_serve.api import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from ds_serve.engine import Delta, Engine, RequestTooLarge, TokenLogprob
from ds_serve.errors import APIError
from ds_serve.logprobs import chat_logprobs, completion_logprobs
from ds_serve.sse import watch_disconnect
from ds_serve.structured import GrammarError
from ds_serve.validation import Prepared

if TYPE_CHECKING:
    from ds_serve.engine_process import EngineClient

__all__ = ["Choices", "chat_body", "chat_events", "completion_body", "completion_events"]

DONE = b"data: [DONE]\n\n"


_encode = msgspec.json.Encoder().encode


def _sse(obj: Any) -> bytes:
    return b"data: %b\n\n" % _encode(obj)


@dataclass
class ChoiceResult:
    """One finished choice: its text, why it ended, its tokens and their logprobs."""

    text_parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class Choices:
    """The n choices of one HTTP request: engine ids, shared output queue, running totals."""

    def __init__(
        self, engine: Engine | EngineClient, prepared: Prepared, stream_interval: int = 1
    ) -> None:
        self.engine = engine
        self.stream_interval = stream_interval
        self.streamed: set[int] = set()  # choices that have sent an event
        self.prompts = prepared.prompts
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.prompt_tokens = sum(len(p) for p in prepared.prompts)
        self.completion_tokens = 0
        self.prepared = prepared
        self.index: dict[str, int] = {}
        self.unfinished: set[str] = set()

    async def submit(self) -> None:
        """Queue every choice in the engine (all or none; errors as the HTTP answer)."""
        prepared = self.prepared
        n = len(prepared.params)
        sequences = [(prompt, params) for prompt in prepared.prompts for params in prepared.params]
        # DeepSeek-format tool calls are special tokens: keep them in the text to parse.
        deepseek_tools = prepared.tools is not None and prepared.tools[0].kind == "deepseek"
        try:
            ids = await self.engine.submit_request(
                sequences,
                queue=self.queue,
                grammar=prepared.grammar,
                adapter=prepared.adapter,
                skip_special_tokens=prepared.skip_special_tokens and not deepseek_tools,
                include_stop_str=prepared.include_stop_str_in_output,
            )
        except GrammarError as exc:
            raise APIError(
                400,
                f"The grammar engine cannot compile this: {exc}",
                param=prepared.grammar.param,
            ) from exc
        except RequestTooLarge as exc:
            raise APIError(
                400,
                f"The request cannot be served: {len(prepared.prompts)} prompts x n={n}: {exc}",
                param="n",
                code="request_too_large",
            ) from exc
        except ValueError as exc:
            # The scheduler refuses a request that could never fit the KV pool.
            raise APIError(
                400,
                f"The request cannot be served: {exc}",
                param="max_tokens",
                code="kv_cache_too_small",
            ) from exc
        self.index = {rid: i for i, rid in enumerate(ids)}  # choice p * n + j
        self.unfinished = set(self.index)

    def abort(self) -> None:
        for rid in self.index:
            self.engine.abort(rid)

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        while self.unfinished:
            delta = await self.queue.get()
            self._count(delta)
            yield self.index[delta.request_id], delta

    async def ready(self) -> AsyncIterator[list[tuple[int, Delta]]]:
        """The deltas waiting in the queue, each choice's joined into one, in order.

        A stream that falls behind the engine (a busy event loop, a slow client) sends
        the tokens that piled up as one event rather than one event per token, as vLLM
        does under load. With ``stream_interval`` k > 1 a choice's tokens are held until
        k of them are waiting (SGLang's ``--stream-interval``): its first token and its
        last delta go out at once."""
        queue, interval = self.queue, self.stream_interval
        joined: dict[int, Delta] = {}
        while self.unfinished:
            delta = await queue.get()
            self._join(joined, delta)
            while not queue.empty():
                self._join(joined, queue.get_nowait())
            if interval > 1 and self.unfinished and not any(map(self._due, joined.values())):
                continue
            self.streamed.update(joined)
            yield list(joined.items())
            joined = {}

    def _join(self, joined: dict[int, Delta], delta: Delta) -> None:
        self._count(delta)
        i = self.index[delta.request_id]
        earlier = joined.get(i)
        joined[i] = delta if earlier is None else _join(earlier, delta)

    def _due(self, delta: Delta) -> bool:
        return (
            delta.finish_reason is not None
            or len(delta.token_ids) >= self.stream_interval
            or self.index[delta.request_id] not in self.streamed
        )

    def _count(self, delta: Delta) -> None:
        self.completion_tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            self.unfinished.discard(delta.request_id)

    def usage(self) -> Usage:
        return Usage(
            self.prompt_tokens, self.completion_tokens, self.prompt_tokens + self.completion_tokens
        )

    async def collect(self, receive) -> list[ChoiceResult]:
        """All choices' results (non-streamed); a client disconnect, seen on the ASGI
        ``receive``, aborts them at once."""
        results = [ChoiceResult() for _ in self.index]
        watcher = watch_disconnect(receive, self.abort)
        try:
            async for i, delta in self.deltas():
                result = results[i]
                result.text_parts.append(delta.text)
                result.token_ids += delta.token_ids
                if delta.logprobs:
                    result.logprobs += delta.logprobs
                if delta.prompt_logprobs is not None:
                    result.prompt_logprobs = delta.prompt_logprobs
                if delta.finish_reason is not None:
                    result.finish_reason = delta.finish_reason
        finally:
            watcher.cancel()
            self.abort()
        return results

    def prompt_of(self, choice: int, n: int) -> list[int]:
        return self.prompts[choice // n]


def _join(first: Delta, then: Delta) -> Delta:
    """One delta holding ``first`` followed by ``then`` (of the same choice)."""
    logprobs = None
    if first.logprobs is not None or then.logprobs is not None:
        logprobs = (first.logprobs or []) + (then.logprobs or [])
    return Delta(
        request_id=first.request_id,
        text=first.text + then.text,
        token_ids=first.token_ids + then.token_ids,
        finish_reason=then.finish_reason,
        prompt_tokens=then.prompt_tokens,
        completion_tokens=then.completion_tokens,
        logprobs=logprobs,
        prompt_logprobs=(
            first.prompt_logprobs if first.prompt_logprobs is not None else then.prompt_logprobs
        ),
    )


def _ids(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


async def completion_events(
    req: CompletionRequest, prepared: Prepared, choices: Choices, echo: list[str]
) -> AsyncIterator[bytes]:
    """The stream's events; the events of the deltas that arrived together go out as
    one write."""
    rid, created = _ids("cmpl")
    n = len(prepared.params)

    def chunk(choice_list: list[CompletionChunkChoice], usage: Usage | None = None) -> bytes:
        return _sse(CompletionChunk(rid, created, prepared.model, choice_list, usage=usage))

    decode = choices.engine.tokenizer.decode
    scored = req.logprobs is not None
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    # Per choice: the token ids so far (the context of the next token's text) and the
    # next token's text_offset (offsets count token texts, as in the whole response).
    context = [list(choices.prompt_of(i, n)) for i in range(len(choices.index))]
    sent = [0] * len(choices.index)
    try:
        if req.echo and not scored:
            yield b"".join(
                chunk([CompletionChunkChoice(i, echo[i // n])]) for i in range(len(choices.index))
            )
        async for ready in choices.ready():
            events = []
            for i, delta in ready:
                if scored and delta.prompt_logprobs is not None and req.echo:
                    # The prompt's scores arrive with the choice's first delta.
                    logprobs = completion_logprobs(decode, [], delta.prompt_logprobs, 0)
                    events.append(
                        chunk([CompletionChunkChoice(i, echo[i // n], logprobs=logprobs)])
                    )
                    sent[i] = len(echo[i // n])
                logprobs = None
                if scored and delta.logprobs:
                    logprobs = completion_logprobs(decode, context[i], delta.logprobs, sent[i])
                    context[i] += delta.token_ids
                    sent[i] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                if delta.text or delta.finish_reason or logprobs is not None:
                    choice = CompletionChunkChoice(i, delta.text, delta.finish_reason, logprobs)
                    events.append(chunk([choice]))
            if not choices.unfinished:
                if include_usage:
                    events.append(chunk([], usage=choices.usage()))
                events.append(DONE)
            if events:
                yield b"".join(events)
    finally:
        choices.abort()


def completion_body(
    req: CompletionRequest,
    prepared: Prepared,
    choices: Choices,
    results: list[ChoiceResult],
    echo: list[str],
) -> CompletionResponse:
    rid, created = _ids("cmpl")
    n = len(prepared.params)
    decode = choices.engine.tokenizer.decode
    body = []
    for i, result in enumerate(results):
        logprobs = None
        if req.logprobs is not None:
            prompt = choices.prompt_of(i, n)
            logprobs = completion_logprobs(decode, prompt, result.logprobs, len(echo[i // n]))
            if req.echo and result.prompt_logprobs is not None:
                head = completion_logprobs(decode, [], result.prompt_logprobs, 0)
                logprobs = CompletionLogprobs(
                    head.tokens + logprobs.tokens,
                    head.token_logprobs + logprobs.token_logprobs,
                    head.top_logprobs + logprobs.top_logprobs,
                    head.text_offset + logprobs.text_offset,
                )
        body.append(CompletionChoice(i, echo[i // n] + result.text, result.finish_reason, logprobs))
    return CompletionResponse(
        id=rid, created=created, model=prepared.model, usage=choices.usage(), choices=body
    )


async def chat_events(
    req: ChatCompletionRequest, prepared: Prepared, choices: Choices
) -> AsyncIterator[bytes]:
    """The stream's events; the events of the deltas that arrived together go out as
    one write."""
    rid, created = _ids("chatcmpl")

    def chunk(choice_list: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        return _sse(ChatCompletionChunk(rid, created, prepared.model, choice_list, usage=usage))

    decode = choices.engine.tokenizer.decode
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    context = [list(choices.prompt_of(i, len(prepared.params))) for i in range(len(choices.index))]
    parsers = [prepared.tool_parser() for _ in choices.index]
    calls_sent = [0] * len(parsers)
    try:
        yield b"".join(
            chunk([ChatChunkChoice(i, ChatDelta(role="assistant", content=""))])
            for i in range(len(choices.index))
        )
        async for ready in choices.ready():
            events = []
            for i, delta in ready:
                logprobs = None
                if req.logprobs and delta.logprobs:
                    logprobs = chat_logprobs(decode, context[i], delta.logprobs)
                    context[i] += delta.token_ids
                text, calls = delta.text, []
                if parsers[i] is not None:
                    text, calls = parsers[i].push(text)
                    if delta.finish_reason:
                        text += parsers[i].flush()
                if text or logprobs is not None:
                    events.append(
                        chunk([ChatChunkChoice(i, ChatDelta(content=text), None, logprobs)])
                    )
                if calls:
                    first, calls_sent[i] = calls_sent[i], calls_sent[i] + len(calls)
                    call_deltas = _call_deltas(calls, first)
                    events.append(chunk([ChatChunkChoice(i, ChatDelta(tool_calls=call_deltas))]))
                if delta.finish_reason:
                    reason = _finish_reason(delta.finish_reason, calls_sent[i])
                    events.append(chunk([ChatChunkChoice(i, ChatDelta(), reason)]))
            if not choices.unfinished:
                if include_usage:
                    events.append(chunk([], usage=choices.usage()))
                events.append(DONE)
            if events:
                yield b"".join(events)
    finally:
        choices.abort()


def chat_body(
    req: ChatCompletionRequest, prepared: Prepared, choices: Choices, results: list[ChoiceResult]
) -> ChatCompletionResponse:
    rid, created = _ids("chatcmpl")
    decode = choices.engine.tokenizer.decode
    body = []
    for i, result in enumerate(results):
        logprobs = None
        if req.logprobs:
            logprobs = chat_logprobs(
                decode, choices.prompt_of(i, len(prepared.params)), result.logprobs
            )
        body.append(_chat_choice(i, result.text, result.finish_reason, prepared, logprobs))
    return ChatCompletionResponse(
        id=rid, created=created, model=prepared.model, usage=choices.usage(), choices=body
    )


def _chat_choice(
    i: int, text: str, reason: str | None, prepared: Prepared, logprobs: ChatLogprobs | None
) -> ChatChoice:
    parser = prepared.tool_parser()
    if parser is None:
        return ChatChoice(i, ChatResponseMessage(text), reason, logprobs)
    content, calls = parser.push(text)
    content += parser.flush()
    message = ChatResponseMessage(
        content if content or not calls else None, tool_calls=calls or None
    )
    return ChatChoice(i, message, _finish_reason(reason, len(calls)), logprobs)


def _finish_reason(reason: str | None, num_calls: int) -> str | None:
    """OpenAI ends a turn that made tool calls with ``tool_calls`` rather than ``stop``."""
    return "tool_calls" if num_calls and reason == "stop" else reason


def _call_deltas(calls: list[ToolCall], first: int) -> list[ToolCallDelta]:
    """Each completed call as one streamed delta (id, type, name and all its arguments)."""
    return [
        ToolCallDelta(
            index=first + k,
            id=call.id,
            type="function",
            function={"name": call.function.name, "arguments": call.function.arguments},
        )
        for k, call in enumerate(calls)
    ]
