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
    Usage,
)
from ds_serve.engine import Delta, Engine, RequestTooLarge
from ds_serve.errors import APIError
from ds_serve.sse import watch_disconnect
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
        sequences = [(prompt, params) for prompt in prepared.prompts for params in prepared.params]
        try:
            ids = engine.submit_all(sequences, adapter=prepared.adapter, queue=self.queue)
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

    try:
        for i in range(len(choices.index)):
            yield chunk([ChatChunkChoice(i, ChatDelta(role="assistant", content=""))])
        async for i, delta in choices.deltas():
            if delta.text:
                yield chunk([ChatChunkChoice(i, ChatDelta(content=delta.text))])
            if delta.finish_reason:
                yield chunk([ChatChunkChoice(i, ChatDelta(), delta.finish_reason)])
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
            ChatChoice(i, ChatResponseMessage(text), reason)
            for i, (text, reason) in enumerate(results)
        ],
    )
