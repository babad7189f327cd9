"""Server-sent events for streamed completions, with disconnect detection.

Starlette's ``StreamingResponse`` notices a disconnect only between chunks; a client
that goes away while the model is computing would keep its request running until the
next token. Here a listener waits on ``receive()`` for ``http.disconnect`` from the
start, and its completion calls ``on_disconnect`` (the engine abort) at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

__all__ = ["SSEResponse", "watch_disconnect"]

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def watch_disconnect(receive, on_disconnect: Callable[[], None]) -> asyncio.Task:
    """A task that calls ``on_disconnect`` when the client goes away; cancel it when done.

    Call only after the request body has been read: then the next ASGI message on
    ``receive`` can only be ``http.disconnect``.
    """

    async def listen() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                on_disconnect()
                return

    return asyncio.ensure_future(listen())


class SSEResponse:
    """An ASGI response that sends ``events`` (already framed as ``data: ...\\n\\n`` bytes)."""

    def __init__(self, events: AsyncIterator[bytes], on_disconnect: Callable[[], None]) -> None:
        self.events = events
        self.on_disconnect = on_disconnect
        self.disconnected = False

    def _gone(self) -> None:
        self.disconnected = True
        self.on_disconnect()

    async def __call__(self, scope, receive, send) -> None:
        listener = watch_disconnect(receive, self._gone)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            async for chunk in self.events:
                if self.disconnected:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not self.disconnected:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the socket closed under us: same as a disconnect
            self._gone()
        finally:
            listener.cancel()
            await self.events.aclose()
