"""The HTTP layer: an ASGI app (Starlette routing, uvicorn serving) over an ``Engine``.

Bodies are msgspec Structs both ways. Every error is an OpenAI error body: 400 for an
invalid request (naming the field, a chat template's own error included), 401 for a
missing or wrong API key (every route but ``/health`` when a key is set), 404 for an
unknown model or route, 413 for an oversized body, 429 when the waiting queue is full,
503 while shutting down. Unknown top-level request fields are ignored (logged, counted
in /metrics). ``/openapi.json`` is generated from the msgspec types in ``api.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import msgspec
from ds_batching import QueueFull
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ds_serve.api import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    VersionResponse,
)
from ds_serve.choices import (
    Choices,
    chat_body,
    chat_events,
    completion_body,
    completion_events,
)
from ds_serve.engine import Engine, EngineClosed
from ds_serve.errors import APIError, error_from_msgspec
from ds_serve.openapi import DOCS_HTML, openapi_schema
from ds_serve.sse import SSEResponse
from ds_serve.validation import (
    ModelInfo,
    check_prompt_chars,
    prepare_chat,
    prepare_completion,
    tokenize_ids,
)

if TYPE_CHECKING:
    from ds_serve.engine_process import EngineClient

__all__ = ["DEFAULT_MAX_BODY_BYTES", "App"]

log = logging.getLogger("ds_serve.app")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
TOKENIZER_THREADS = 4
_encode = msgspec.json.encode


def _json(obj: Any, status: int = 200) -> Response:
    return Response(_encode(obj), status_code=status, media_type="application/json")


def _error(exc: APIError) -> Response:
    headers = {"retry-after": "1"} if exc.status == 429 else None
    return Response(
        exc.body(), status_code=exc.status, media_type="application/json", headers=headers
    )


class App:
    """The server: ``app.run(host, port)`` or any ASGI server on ``app`` itself."""

    def __init__(
        self,
        engine: Engine | EngineClient,
        *,
        api_key: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        stream_interval: int = 1,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes!r}")
        if (
            isinstance(stream_interval, bool)
            or not isinstance(stream_interval, int)
            or stream_interval < 1
        ):
            raise ValueError(f"stream_interval must be an int >= 1, got {stream_interval!r}")
        self.engine = engine
        # Tokens a streamed choice holds before it sends them (its first and last go
        # out at once): fewer, larger events for less per-token work on the event loop.
        self.stream_interval = stream_interval
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.info = ModelInfo(
            name=engine.model_name,
            adapters=tuple(engine.adapters),
            vocab_size=engine.vocab_size,
            max_model_len=engine.max_model_len,
            eos_token_ids=tuple(engine.eos_token_ids),
        )
        self.created = int(time.time())
        # Tokenizing and chat-template rendering; a pool of its own, so a flood of long
        # prompts cannot hold up the default executor the engine's shutdown runs on.
        self._workers = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="ds-tokenize")
        self._openapi: bytes | None = None
        routes = [
            Route("/health", self._guard(self.health), methods=["GET"]),
            Route("/metrics", self._guard(self.metrics), methods=["GET"]),
            Route("/v1/models", self._guard(self.models), methods=["GET"]),
            Route("/v1/models/{model_id:path}", self._guard(self.model), methods=["GET"]),
            Route("/openapi.json", self._guard(self.openapi), methods=["GET"]),
            Route("/docs", self._guard(self.docs), methods=["GET"]),
            Route("/version", self._guard(self.version), methods=["GET"]),
            Route("/tokenizer_info", self._guard(self.tokenizer_info), methods=["GET"]),
            Route("/v1/completions", self._guard(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._guard(self.chat), methods=["POST"]),
            Route("/tokenize", self._guard(self.tokenize), methods=["POST"]),
            Route("/detokenize", self._guard(self.detokenize), methods=["POST"]),
        ]
        self.starlette = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_exception},
            lifespan=self._lifespan,
        )

    # ---- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        # With a key, every route but /health (for load balancers and probes) needs it,
        # unknown paths included: nothing else answers, or says what exists, without it.
        if scope["type"] == "http" and self.api_key and scope["path"] != "/health":
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")  # raw bytes: UTF-8 keys compare as sent
            expected = b"Bearer " + self.api_key.encode("utf-8")
            if not hmac.compare_digest(given, expected):
                error = APIError(
                    401,
                    "Missing or incorrect API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                await _error(error)(scope, receive, send)
                return
        await self.starlette(scope, receive, send)

    def run(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        shutdown_grace: float = 30.0,
        **uvicorn_options: Any,
    ) -> None:
        """Serve until SIGINT/SIGTERM. On shutdown, new requests get 503, in-flight ones
        get ``shutdown_grace`` seconds to finish, and the rest end with finish_reason
        ``abort`` (streams still get their final chunk and ``[DONE]``)."""
        self.make_server(host, port, shutdown_grace=shutdown_grace, **uvicorn_options).run()

    def make_server(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        shutdown_grace: float = 30.0,
        **uvicorn_options: Any,
    ):
        """A ``uvicorn.Server`` for this app whose shutdown drains the engine first."""
        import uvicorn

        uvicorn_options.setdefault("log_level", "info")
        uvicorn_options.setdefault("timeout_graceful_shutdown", 5)
        config = uvicorn.Config(self, host=host, port=port, **uvicorn_options)
        app = self

        class DrainingServer(uvicorn.Server):
            async def shutdown(self, sockets=None) -> None:
                await app.drain(shutdown_grace)
                await super().shutdown(sockets=sockets)

        return DrainingServer(config)

    async def drain(self, grace: float) -> None:
        """Refuse new requests, let in-flight ones finish for ``grace`` s, abort the rest."""
        engine = self.engine
        engine.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while engine.num_in_flight() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if engine.num_in_flight():
            log.info("shutdown: aborting %d requests still in flight", engine.num_in_flight())
            engine.abort_all()
            while engine.num_in_flight() and loop.time() < deadline + 5:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # let the handlers send their final chunks

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app):
        self.engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)

    # ---- plumbing ----------------------------------------------------------------------

    def _guard(self, handler: Callable[[Request], Awaitable[Any]]):
        async def endpoint(request: Request):
            try:
                return await handler(request)
            except APIError as exc:
                return _error(exc)
            except msgspec.DecodeError as exc:
                return _error(error_from_msgspec(exc))
            except QueueFull as exc:
                return _error(
                    APIError(
                        429,
                        f"The server is at capacity: {exc}",
                        type="rate_limit_error",
                        code="queue_full",
                    )
                )
            except EngineClosed as exc:
                return _error(APIError(503, str(exc), type="server_error", code="shutting_down"))
            except Exception:
                log.exception("unexpected error in %s", request.url.path)
                return _error(
                    APIError(
                        500,
                        "Internal server error; see the server log",
                        type="server_error",
                        code="internal_error",
                    )
                )

        return endpoint

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        messages = {
            404: f"No route {request.url.path}",
            405: f"Method {request.method} not allowed on {request.url.path}",
        }
        message = messages.get(exc.status_code, str(exc.detail))
        return _error(APIError(exc.status_code, message, code=str(exc.status_code)))

    async def _body(self, request: Request, kind: type) -> Any:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
        body = b"".join(chunks)
        decoded = msgspec.json.decode(body, type=kind)
        self._check_fields(body, kind)
        return decoded

    def _check_fields(self, body: bytes, kind: type) -> None:
        """Log and count the top-level fields ``kind`` does not know (they are ignored)."""
        keys = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
        unknown = sorted(k for k in keys if k not in kind.__struct_fields__)
        if unknown:
            log.warning("ignoring unknown request fields: %s", ", ".join(unknown))
            self.engine.count_unknown_fields(len(unknown))

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run tokenizing / template rendering on the worker threads, so a long prompt
        never stalls the event loop (/health, streams, other requests)."""
        return await asyncio.get_running_loop().run_in_executor(self._workers, fn, *args)

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"Request body exceeds the limit of {self.max_body_bytes} bytes",
            code="request_too_large",
        )

    # ---- endpoints ---------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        stats = await self.engine.current_stats()
        healthy = self.engine.error is None and not self.engine.closing
        body = HealthResponse(
            status="ok" if healthy else "unavailable",
            model=self.info.name,
            running=int(stats["running"]),
            waiting=int(stats["waiting"]),
            kv_cache_usage=float(stats["kv_usage"]),
        )
        return _json(body, 200 if healthy else 503)

    async def metrics(self, request: Request) -> Response:
        text = await self.engine.metrics_text()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: Request) -> Response:
        return _json(ModelList(data=self._cards()))

    def _cards(self) -> list[ModelCard]:
        base = ModelCard(
            id=self.info.name,
            created=self.created,
            root=self.info.name,
            max_model_len=self.info.max_model_len,
        )
        adapters = [
            ModelCard(
                id=name,
                created=self.created,
                root=name,
                parent=self.info.name,
                max_model_len=self.info.max_model_len,
            )
            for name in self.info.adapters
        ]
        return [base, *adapters]

    async def model(self, request: Request) -> Response:
        """``GET /v1/models/{id}``: the card of the base model or a loaded adapter."""
        model_id = request.path_params["model_id"]
        for card in self._cards():
            if card.id == model_id:
                return _json(card)
        raise APIError(
            404,
            f"The model `{model_id}` does not exist",
            param="model",
            code="model_not_found",
        )

    async def openapi(self, request: Request) -> Response:
        if self._openapi is None:
            self._openapi = _encode(openapi_schema())
        return Response(self._openapi, media_type="application/json")

    async def docs(self, request: Request) -> Response:
        return Response(DOCS_HTML, media_type="text/html; charset=utf-8")

    async def version(self, request: Request) -> Response:
        from ds_serve import __version__

        return _json(VersionResponse(version=__version__))

    async def tokenizer_info(self, request: Request) -> Response:
        """vLLM's ``GET /tokenizer_info``: the tokenizer's class, special tokens, context
        length and chat template (lm-eval's remote tokenizer reads it)."""
        tok = self.engine.tokenizer
        config = getattr(tok, "config", {}) or {}
        return _json(
            TokenizerInfo(
                tokenizer_class=config.get("tokenizer_class") or type(tok).__name__,
                vocab_size=self.info.vocab_size,
                model_max_length=self.info.max_model_len,
                bos_token=getattr(tok, "bos_token", None),
                eos_token=getattr(tok, "eos_token", None),
                chat_template=getattr(tok, "chat_template", None),
            )
        )

    async def completions(self, request: Request):
        req = await self._body(request, CompletionRequest)
        check_prompt_chars(req, self.info)
        prepared = await self._off_loop(prepare_completion, req, self.info, self.engine.tokenizer)
        choices = Choices(self.engine, prepared, self.stream_interval if req.stream else 1)
        await choices.submit()
        echo = [self.engine.tokenizer.decode(p) if req.echo else "" for p in prepared.prompts]
        if req.stream:
            return SSEResponse(completion_events(req, prepared, choices, echo), choices.abort)
        results = await choices.collect(request.receive)
        return _json(completion_body(req, prepared, choices, results, echo))

    async def chat(self, request: Request):
        req = await self._body(request, ChatCompletionRequest)
        check_prompt_chars(req, self.info)
        prepared = await self._off_loop(prepare_chat, req, self.info, self.engine.tokenizer)
        choices = Choices(self.engine, prepared, self.stream_interval if req.stream else 1)
        await choices.submit()
        if req.stream:
            return SSEResponse(chat_events(req, prepared, choices), choices.abort)
        results = await choices.collect(request.receive)
        return _json(chat_body(req, prepared, choices, results))

    async def tokenize(self, request: Request) -> Response:
        req = await self._body(request, TokenizeRequest)
        check_prompt_chars(req, self.info)
        ids = await self._off_loop(tokenize_ids, req, self.info, self.engine.tokenizer)
        return _json(
            TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.info.max_model_len)
        )

    async def detokenize(self, request: Request) -> Response:
        req = await self._body(request, DetokenizeRequest)
        bad = [t for t in req.tokens if t >= self.info.vocab_size]
        if bad:
            raise APIError(
                400,
                f"Token id {bad[0]} is out of range: the vocabulary has "
                f"{self.info.vocab_size} tokens",
                param="tokens",
            )
        return _json(DetokenizeResponse(prompt=self.engine.tokenizer.decode(list(req.tokens))))
