"""One HTTP request's generation: its n choices in the engine, and the OpenAI bodies
(non-streamed) or server-sent events (streamed) built from their deltas.

Choice ``i`` of a request with several prompts is prompt ``i // n``, sample ``i % n``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from ds_serve.api import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from ds_serve.engine import Delta, Engine
from ds_serve.errors import APIError
from ds_serve.sse import watch_disconnect
from ds_serve.structured import GrammarError
from ds_serve.validation import Prepared

__all__ = ["Choices", "chat_body", "chat_events", "completion_body", "completion_events"]

DONE = b"data: [DONE]\n\n"


def _sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


class Choices:
    """The n choices of one HTTP request: engine ids, shared output queue, running totals."""

    def __init__(self, engine: Engine, prepared: Prepared) -> None:
        self.engine = engine
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.index: dict[str, int] = {}
        self.prompt_tokens = sum(len(p) for p in prepared.prompts)
        self.completion_tokens = 0
        n = len(prepared.params)
        grammar = None
        if prepared.grammar is not None:
            try:
                grammar = engine.grammar_compiler.compile(prepared.grammar)
            except GrammarError as exc:
                raise APIError(
                    400,
                    f"The grammar engine cannot compile this: {exc}",
                    param=prepared.grammar.param,
                ) from exc
        try:
            for p, prompt in enumerate(prepared.prompts):
                for j, params in enumerate(prepared.params):
                    extra = {"grammar": grammar.fork()} if grammar is not None else {}
                    if prepared.tools is not None and prepared.tools[0].kind == "deepseek":
                        extra["skip_special_tokens"] = False  # the calls are special tokens
                    rid = engine.submit(
                        prompt, params, adapter=prepared.adapter, queue=self.queue, **extra
                    )
                    self.index[rid] = p * n + j
        except ValueError as exc:
            # The scheduler refuses a request that could never fit the KV pool.
            self.abort()
            raise APIError(
                400,
                f"The request cannot be served: {exc}",
                param="max_tokens",
                code="kv_cache_too_small",
            ) from exc
        except BaseException:
            self.abort()  # all or nothing: a 429 leaves no half-submitted choices behind
            raise
        self.unfinished = set(self.index)

    def abort(self) -> None:
        for rid in self.index:
            self.engine.abort(rid)

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        while self.unfinished:
            delta = await self.queue.get()
            self.completion_tokens += len(delta.token_ids)
            if delta.finish_reason is not None:
                self.unfinished.discard(delta.request_id)
            yield self.index[delta.request_id], delta

    def usage(self) -> Usage:
        return Usage(
            self.prompt_tokens, self.completion_tokens, self.prompt_tokens + self.completion_tokens
        )

    async def collect(self, receive) -> list[tuple[str, str | None]]:
        """All choices' text and finish reasons (non-streamed); a client disconnect,
        seen on the ASGI ``receive``, aborts them at once."""
        texts: list[list[str]] = [[] for _ in self.index]
        reasons: list[str | None] = [None] * len(self.index)
        watcher = watch_disconnect(receive, self.abort)
        try:
            async for i, delta in self.deltas():
                texts[i].append(delta.text)
                if delta.finish_reason is not None:
                    reasons[i] = delta.finish_reason
        finally:
            watcher.cancel()
            self.abort()
        return [("".join(t), r) for t, r in zip(texts, reasons)]


def _ids(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


async def completion_events(
    req: CompletionRequest, prepared: Prepared, choices: Choices, echo: list[str]
) -> AsyncIterator[bytes]:
    rid, created = _ids("cmpl")
    n = len(prepared.params)

    def chunk(choice_list: list[CompletionChunkChoice], usage: Usage | None = None) -> bytes:
        return _sse(CompletionChunk(rid, created, prepared.model, choice_list, usage=usage))

    try:
        if req.echo:
            for i in range(len(choices.index)):
                yield chunk([CompletionChunkChoice(i, echo[i // n])])
        async for i, delta in choices.deltas():
            if delta.text or delta.finish_reason:
                yield chunk([CompletionChunkChoice(i, delta.text, delta.finish_reason)])
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], usage=choices.usage())
        yield DONE
    finally:
        choices.abort()


def completion_body(
    prepared: Prepared, choices: Choices, results: list[tuple[str, str | None]], echo: list[str]
) -> CompletionResponse:
    rid, created = _ids("cmpl")
    n = len(prepared.params)
    return CompletionResponse(
        id=rid,
        created=created,
        model=prepared.model,
        usage=choices.usage(),
        choices=[
            CompletionChoice(i, echo[i // n] + text, reason)
            for i, (text, reason) in enumerate(results)
        ],
    )


async def chat_events(
    req: ChatCompletionRequest, prepared: Prepared, choices: Choices
) -> AsyncIterator[bytes]:
    rid, created = _ids("chatcmpl")

    def chunk(choice_list: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        return _sse(ChatCompletionChunk(rid, created, prepared.model, choice_list, usage=usage))

    parsers = [prepared.tool_parser() for _ in choices.index]
    calls_sent = [0] * len(parsers)
    try:
        for i in range(len(choices.index)):
            yield chunk([ChatChunkChoice(i, ChatDelta(role="assistant", content=""))])
        async for i, delta in choices.deltas():
            text, calls = delta.text, []
            if parsers[i] is not None:
                text, calls = parsers[i].push(text)
                if delta.finish_reason:
                    text += parsers[i].flush()
            if text:
                yield chunk([ChatChunkChoice(i, ChatDelta(content=text))])
            if calls:
                first, calls_sent[i] = calls_sent[i], calls_sent[i] + len(calls)
                yield chunk([ChatChunkChoice(i, ChatDelta(tool_calls=_call_deltas(calls, first)))])
            if delta.finish_reason:
                reason = _finish_reason(delta.finish_reason, calls_sent[i])
                yield chunk([ChatChunkChoice(i, ChatDelta(), reason)])
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], usage=choices.usage())
        yield DONE
    finally:
        choices.abort()


def chat_body(
    prepared: Prepared, choices: Choices, results: list[tuple[str, str | None]]
) -> ChatCompletionResponse:
    rid, created = _ids("chatcmpl")
    return ChatCompletionResponse(
        id=rid,
        created=created,
        model=prepared.model,
        usage=choices.usage(),
        choices=[
            _chat_choice(i, text, reason, prepared) for i, (text, reason) in enumerate(results)
        ],
    )


def _chat_choice(i: int, text: str, reason: str | None, prepared: Prepared) -> ChatChoice:
    parser = prepared.tool_parser()
    if parser is None:
        return ChatChoice(i, ChatResponseMessage(text), reason)
    content, calls = parser.push(text)
    content += parser.flush()
    message = ChatResponseMessage(
        content if content or not calls else None, tool_calls=calls or None
    )
    return ChatChoice(i, message, _finish_reason(reason, len(calls)))


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
