"""The engine in a process of its own, as vLLM runs its engine core apart from its API
server: ``EngineClient`` is what the HTTP layer talks to, ``python -m
ds_serve.engine_process`` is the other side, running ``build_engine``'s ``Engine``.

In one process the engine thread and the event loop share the GIL: every streamed
event's work on the loop (the ASGI send, HTTP framing, the socket write, about 0.2 ms
an event) holds up the model step, and the step's Python holds up the loop. Apart, the
two run on two cores; what crosses between them is small: a request's prompt ids and
parameters once, then one frame per model step with that step's deltas.

The wire: two pipes, frames of a 4-byte little-endian length and a msgpack body
(msgspec, typed on both ends; nothing is pickled). Commands go to the engine process
(``Submit``, ``Abort``, ``Close``, ``Query``, ``UnknownFields``, ``Shutdown``); events
come back (``Ready`` or ``Failed`` once at start, ``Reply`` to a ``Submit`` or
``Query``, ``Step`` with the deltas of each model step). The engine process ends when
its command pipe closes, so it never outlives the server; a server whose engine
process dies ends every request in flight with finish_reason ``abort`` and answers
503 from then on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
from typing import Any

import msgspec
from ds_batching import QueueFull

from ds_serve.engine import Delta, EngineClosed, RequestTooLarge
from ds_serve.sampling import SamplingParams
from ds_serve.structured import GrammarError, GrammarSpec

__all__ = ["EngineClient"]

log = logging.getLogger("ds_serve.engine_process")

_LENGTH = struct.Struct("<I")


class Submit(msgspec.Struct, tag=True):
    call: int
    sequences: list[tuple[list[int], dict[str, Any]]]  # (prompt ids, _wire_params(params))
    grammar: GrammarSpec | None
    adapter: str | None
    skip_special_tokens: bool
    include_stop_str: bool


class Abort(msgspec.Struct, tag=True):
    request_ids: list[str]


class Close(msgspec.Struct, tag=True):
    abort_all: bool = False


class Query(msgspec.Struct, tag=True):
    call: int
    what: str  # "stats" | "metrics"


class UnknownFields(msgspec.Struct, tag=True):
    count: int


class Shutdown(msgspec.Struct, tag=True):
    pass


Command = Submit | Abort | Close | Query | UnknownFields | Shutdown


class Ready(msgspec.Struct, tag=True):
    model_name: str
    adapters: list[str]
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    tokenizer_dir: str
    stats: dict[str, float]


class Failed(msgspec.Struct, tag=True):
    kind: str
    message: str


class Reply(msgspec.Struct, tag=True):
    call: int
    value: Any = None
    error: str | None = None  # an exception's class name, raised again on the client
    message: str = ""
    num_waiting: int = 0
    max_waiting: int = 0


class Step(msgspec.Struct, tag=True):
    deltas: list[Delta]
    error: str | None = None  # set once the engine loop has failed


Event = Ready | Failed | Reply | Step


def _start_errors() -> dict[str, type[Exception]]:
    """Startup errors raised again on the server's side as themselves (the CLI reports
    them in one line); any other is a RuntimeError naming it."""
    from ds_serve.default_model import DefaultModelNotFound
    from ds_serve.ranks import RankFailed

    kinds = (DefaultModelNotFound, FileNotFoundError, ValueError, RankFailed)
    return {cls.__name__: cls for cls in kinds}


# A submission's refusals, raised again in the server (RuntimeError: a fault, a 500).
_SUBMIT_ERRORS = {
    cls.__name__: cls for cls in (GrammarError, RequestTooLarge, ValueError, RuntimeError)
}


def _wire_params(params: SamplingParams) -> dict[str, Any]:
    """The arguments ``params`` was made from (its derived fields, a tensor among them,
    are made again on the other side)."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}


def _params(wire: dict[str, Any]) -> SamplingParams:
    # msgpack has no tuples: the tuple fields (stop, stop_token_ids) arrive as lists.
    return SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in wire.items()})


def _frame(encoder: msgspec.msgpack.Encoder, message: Any) -> bytes:
    body = encoder.encode(message)
    return _LENGTH.pack(len(body)) + body


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int) -> bytes | None:
    """One frame's body from a blocking pipe; None at end of file."""
    head = _read_exact(fd, _LENGTH.size)
    if head is None:
        return None
    return _read_exact(fd, _LENGTH.unpack(head)[0])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ---- the HTTP side ---------------------------------------------------------------------


class EngineClient:
    """What the HTTP layer (``App``) needs of an engine, served by an engine process.

    Starting it starts the process and waits until the model is loaded: a model that
    does not load raises here, as ``build_engine`` would. ``engine_options`` are
    ``create_app``'s (``quantization`` as a name: a config object cannot cross)."""

    def __init__(
        self, model_path: str | os.PathLike | None, engine_options: dict[str, Any]
    ) -> None:
        if os.name != "posix":
            raise ValueError(
                "engine_process=True needs a POSIX system (its pipes are inherited file "
                "descriptors); use engine_process=False (ds-serve --no-engine-process)"
            )
        quantization = engine_options.get("quantization")
        if quantization is not None and not isinstance(quantization, str):
            raise ValueError(
                f"quantization={quantization!r}: an engine process takes a name "
                "('int8', 'int4', 'w8a8', 'fp8'); pass a config object with engine_process=False"
            )
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Event)
        commands_read, self._commands = os.pipe()
        self._events, events_write = os.pipe()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ds_serve.engine_process",
                str(commands_read),
                str(events_write),
            ],
            pass_fds=(commands_read, events_write),
        )
        os.close(commands_read)
        os.close(events_write)
        init = {
            "model_path": None if model_path is None else os.fspath(model_path),
            "options": engine_options,
            "log_level": logging.getLogger().getEffectiveLevel(),
        }
        try:
            _write_all(self._commands, _frame(self._encoder, init))
            first = _read_frame(self._events)
        except BaseException:  # Ctrl-C while the model loads: no engine left behind
            self.process.kill()
            self.process.wait()
            self._close_fds()
            raise
        if first is None:
            code = self.process.wait()
            self._close_fds()
            raise RuntimeError(f"the engine process exited while starting (exit code {code})")
        ready = self._decoder.decode(first)
        if isinstance(ready, Failed):
            self.process.wait()
            self._close_fds()
            error = _start_errors().get(ready.kind)
            if error is None:
                raise RuntimeError(
                    f"the engine process failed to start: {ready.kind}: {ready.message}"
                )
            raise error(ready.message)
        from ds_model.tokenizer import Tokenizer

        self.model_name = ready.model_name
        self.adapters = tuple(ready.adapters)
        self.vocab_size = ready.vocab_size
        self.max_model_len = ready.max_model_len
        self.eos_token_ids = tuple(ready.eos_token_ids)
        self.tokenizer = Tokenizer.from_dir(ready.tokenizer_dir)
        self.error: BaseException | None = None
        self._closing = False
        self._queues: dict[str, asyncio.Queue] = {}
        # The engine thread may send a request's first deltas before the engine
        # process's main thread has sent the reply naming it: held here until then.
        self._early: dict[str, list[Delta]] = {}
        # Requests whose submitter stopped waiting before the reply (a client that went
        # away): aborted, and their last deltas dropped.
        self._orphans: set[str] = set()
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task | None = None
        # Frames from the loop and from shutdown's thread must not interleave.
        self._write_lock = threading.Lock()
        # What /health reports once the engine process is gone: its last answer.
        self._last_stats = ready.stats

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Read the engine's events on ``loop`` (default: the running one)."""
        if self._loop is not None:
            return
        self._loop = loop = loop or asyncio.get_running_loop()
        # The transport owns the event pipe from here and closes it at its end of file.
        pipe = os.fdopen(self._events, "rb", buffering=0)
        self._events = -1
        self._reader = loop.create_task(loop.connect_read_pipe(lambda: _EventReader(self), pipe))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine process: it aborts what is in flight and exits."""
        self._closing = True
        self._send(Shutdown())
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not stop in %.0f s; killing it", timeout)
            self.process.kill()
            self.process.wait()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._commands, self._events):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._commands = self._events = -1

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        self._send(Close())

    def abort_all(self) -> None:
        self._send(Close(abort_all=True))

    def num_in_flight(self) -> int:
        return len(self._queues)

    # ---- requests ----------------------------------------------------------------------

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
        """``Engine.submit_request`` across the pipe: the same errors, raised here."""
        if self.error is not None:
            raise EngineClosed(f"the engine failed ({self.error}); restart the server")
        if self._closing:
            raise EngineClosed("the server is shutting down")
        wire = [(prompt, _wire_params(params)) for prompt, params in sequences]
        submit = Submit(0, wire, grammar, adapter, skip_special_tokens, include_stop_str)
        reply = await self._call(submit)
        if reply.error == "QueueFull":
            raise QueueFull(reply.num_waiting, reply.max_waiting)
        if reply.error is not None:
            raise _SUBMIT_ERRORS.get(reply.error, EngineClosed)(reply.message)
        ids = list(reply.value)
        for rid in ids:
            self._queues[rid] = queue
            for delta in self._early.pop(rid, ()):
                self._deliver(delta)
        return ids

    def abort(self, request_id: str) -> None:
        if request_id in self._queues:
            self._send(Abort([request_id]))

    async def current_stats(self) -> dict[str, float]:
        if self.error is None:
            reply = await self._call(Query(0, "stats"))
            if reply.error is not None:  # the engine loop failed: /health turns 503
                self.error = RuntimeError(reply.message)
            self._last_stats = reply.value
        return self._last_stats

    async def metrics_text(self) -> str:
        if self.error is not None:
            raise EngineClosed(f"the engine failed ({self.error}); restart the server")
        return (await self._call(Query(0, "metrics"))).value

    def count_unknown_fields(self, count: int) -> None:
        self._send(UnknownFields(count))

    # ---- the pipes ---------------------------------------------------------------------

    def _send(self, command: Any) -> None:
        if self._commands < 0 or (self.error is not None and not isinstance(command, Shutdown)):
            return
        frame = _frame(self._encoder, command)
        try:
            with self._write_lock:
                _write_all(self._commands, frame)
        except OSError:
            pass  # the engine process is gone: its end of file fails what waits on it

    async def _call(self, command: Submit | Query) -> Reply:
        if self.error is not None:
            raise EngineClosed(f"the engine failed ({self.error}); restart the server")
        if self._commands < 0:  # shut down: nothing would ever answer
            raise EngineClosed("the engine has stopped")
        command.call = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[command.call] = future
        try:
            self._send(command)
            return await future
        finally:
            self._calls.pop(command.call, None)

    def _on_event(self, body: bytes) -> None:
        event = self._decoder.decode(body)
        if isinstance(event, Step):
            if event.error is not None and self.error is None:
                self.error = RuntimeError(event.error)
            for delta in event.deltas:
                self._deliver(delta)
        elif isinstance(event, Reply):
            future = self._calls.get(event.call)
            if future is not None and not future.done():
                future.set_result(event)
            elif isinstance(event.value, list) and event.value:  # a Submit nobody awaits
                self._orphans.update(event.value)
                for rid in event.value:
                    self._early.pop(rid, None)
                self._send(Abort(event.value))

    def _deliver(self, delta: Delta) -> None:
        queue = self._queues.get(delta.request_id)
        if queue is None:
            if delta.request_id in self._orphans:
                if delta.finish_reason is not None:
                    self._orphans.discard(delta.request_id)
            else:
                self._early.setdefault(delta.request_id, []).append(delta)
            return
        if delta.finish_reason is not None:
            del self._queues[delta.request_id]
        queue.put_nowait(delta)

    def _on_exit(self) -> None:
        """The engine process is gone: every request in flight ends as aborted."""
        code = self.process.poll()
        if self.error is None and not self._closing:
            log.error("the engine process exited (exit code %s); failing every request", code)
        if self.error is None:
            self.error = EngineClosed(f"the engine process exited (exit code {code})")
        self._last_stats = {**self._last_stats, "running": 0, "waiting": 0, "tracked": 0}
        for rid, queue in self._queues.items():
            queue.put_nowait(Delta(rid, "", [], "abort", 0, 0))
        self._queues.clear()
        self._early.clear()
        self._orphans.clear()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineClosed(str(self.error)))


class _EventReader(asyncio.Protocol):
    """Splits the event pipe's bytes into frames for ``EngineClient._on_event``."""

    def __init__(self, client: EngineClient) -> None:
        self.client, self.buffer = client, bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        while len(buffer) - start >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, start)
            end = start + _LENGTH.size + size
            if len(buffer) < end:
                break
            self.client._on_event(bytes(buffer[start + _LENGTH.size : end]))
            start = end
        del buffer[:start]

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._on_exit()


# ---- the engine side -------------------------------------------------------------------


def serve(commands: int, events: int) -> int:
    """The engine process: build the engine from the first frame, then run commands
    until ``Shutdown`` or the end of the command pipe."""
    # The server says when the engine stops: after draining its requests, or by going
    # away (the end of the command pipe). Ctrl-C in a terminal, or a service manager's
    # SIGTERM to the whole group, reaches this process too and must not cut them short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    first = _read_frame(commands)
    if first is None:  # the server went away before it said what to load
        return 1
    init = msgspec.msgpack.decode(first)
    logging.basicConfig(
        level=init.get("log_level", logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
    )
    encoder = msgspec.msgpack.Encoder()
    write_lock = threading.Lock()

    def send(message: Any) -> None:
        frame = _frame(encoder, message)
        with write_lock:
            _write_all(events, frame)

    from ds_serve.server import build_engine

    try:
        engine = build_engine(init.get("model_path"), **init.get("options", {}))
    except Exception as exc:
        send(Failed(type(exc).__name__, str(exc)))
        return 1
    send(
        Ready(
            engine.model_name,
            list(engine.adapters),
            engine.vocab_size,
            engine.max_model_len,
            list(engine.eos_token_ids),
            str(engine.tokenizer.source),
            engine.stats(),
        )
    )

    def on_step(deltas: list[Delta]) -> None:
        error = None if engine.error is None else repr(engine.error)
        try:
            send(Step(deltas, error))
        except OSError:
            pass  # the server is gone; its end of file stops this process

    engine.start(sink=on_step)
    decoder = msgspec.msgpack.Decoder(Command)
    try:
        while (body := _read_frame(commands)) is not None:
            command = decoder.decode(body)
            if isinstance(command, Shutdown):
                break
            reply = _run_command(engine, command)
            if reply is not None:
                try:
                    send(reply)
                except OSError:
                    break  # the server is gone
    finally:
        engine.shutdown()
    return 0


def _run_command(engine: Any, command: Any) -> Reply | None:
    if isinstance(command, Submit):
        try:
            sequences = [(prompt, _params(wire)) for prompt, wire in command.sequences]
            ids = engine.submit_all(
                sequences,
                adapter=command.adapter,
                queue=None,
                grammars=engine.compile_grammars(command.grammar, len(sequences)),
                skip_special_tokens=command.skip_special_tokens,
                include_stop_str=command.include_stop_str,
            )
        except QueueFull as exc:
            return Reply(
                command.call, None, "QueueFull", str(exc), exc.num_waiting, exc.max_waiting
            )
        except (ValueError, EngineClosed) as exc:
            return Reply(command.call, None, type(exc).__name__, str(exc))
        except Exception as exc:  # a fault here fails this request, not the server
            log.exception("submitting a request failed")
            return Reply(command.call, None, "RuntimeError", f"{type(exc).__name__}: {exc}")
        return Reply(command.call, ids)
    if isinstance(command, Query):
        stats = engine.stats()
        value = stats if command.what == "stats" else engine.metrics.render(stats)
        error = None if engine.error is None else repr(engine.error)
        return Reply(command.call, value, "EngineClosed" if error else None, error or "")
    if isinstance(command, Abort):
        for rid in command.request_ids:
            engine.abort(rid)
    elif isinstance(command, Close):
        engine.abort_all() if command.abort_all else engine.close()
    elif isinstance(command, UnknownFields):
        engine.count_unknown_fields(command.count)
    return None


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]), int(sys.argv[2])))
