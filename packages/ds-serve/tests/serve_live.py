"""A real uvicorn server on 127.0.0.1 and a free port, in a background thread."""

from __future__ import annotations

import socket
import threading
import time


class LiveServer:
    def __init__(self, app, *, graceful_timeout: float = 5.0, **uvicorn_options) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = app.make_server(
            "127.0.0.1",
            self.port,
            shutdown_grace=graceful_timeout,
            log_level="warning",
            lifespan="on",
            backlog=512,
            **uvicorn_options,
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
