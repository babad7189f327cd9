"""A stream that falls behind the engine: the tokens that piled up go out in fewer events,
and the client still gets every token, in order, with its logprobs, in valid chunks.

The app is driven over ASGI on the test's own event loop, so the test can stall that
loop (as a busy server's loop stalls) while the engine thread keeps producing tokens.
"""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import pytest
from ds_serve import create_app
from ds_serve.api import ChatCompletionChunk, CompletionChunk

from conftest import forbid_eos

MAX_TOKENS = 24
STALL_SECONDS = 0.3
STEP_SPACING = 0.1


@pytest.fixture
def app(checkpoint):
    app = create_app(checkpoint, num_blocks=64, max_num_seqs=8, max_model_len=64, dtype="float32")
    forbid_eos(app.engine)
    return app


async def _post(app, path: str, body: dict, *, stall: bool) -> bytes:
    """The response body of one POST; with ``stall``, the event loop is blocked for a
    moment after the first streamed event is sent."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(raw))],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    requests = [{"type": "http.request", "body": raw, "more_body": False}]
    never = asyncio.Event()
    parts: list[bytes] = []

    async def receive():
        if requests:
            return requests.pop()
        await never.wait()  # the client stays connected

    async def send(message):
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message
        elif message.get("body"):
            if stall and not parts:
                time.sleep(STALL_SECONDS)  # a busy loop: the engine runs on meanwhile
            parts.append(message["body"])

    await app(scope, receive, send)
    return b"".join(parts)


def _served(
    app, path: str, body: dict, stream_options=None, *, stall: bool = True
) -> tuple[bytes, bytes]:
    """(the streamed body, with the loop stalled once if ``stall``; the non-streamed body)."""
    stream = {"stream": True, **({"stream_options": stream_options} if stream_options else {})}

    async def run():
        app.engine.start(asyncio.get_running_loop())
        try:
            streamed = await _post(app, path, {**body, **stream}, stall=stall)
            whole = await _post(app, path, body, stall=False)
            return streamed, whole
        finally:
            await asyncio.get_running_loop().run_in_executor(None, app.engine.shutdown)

    return asyncio.run(run())


def _events(body: bytes) -> list[bytes]:
    """The SSE events' data; every event must be exactly ``data: <payload>\\n\\n``."""
    assert body.endswith(b"\n\n")
    events = body[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events), body
    assert events[-1] == b"data: [DONE]"
    return [e[len(b"data: ") :] for e in events[:-1]]


def test_a_stalled_completion_stream_joins_tokens_and_keeps_every_one(app):
    body = {
        "prompt": "def fibonacci(n):",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logprobs": 2,
    }
    streamed, whole = _served(app, "/v1/completions", body, {"include_usage": True})
    chunks = [msgspec.json.decode(e, type=CompletionChunk) for e in _events(streamed)]
    *token_chunks, usage_chunk = chunks
    expected = json.loads(whole)["choices"][0]

    assert "".join(c.choices[0].text for c in token_chunks) == expected["text"]
    tokens = [t for c in token_chunks for t in c.choices[0].logprobs.tokens]
    assert tokens == expected["logprobs"]["tokens"] and len(tokens) == MAX_TOKENS
    offsets = [o for c in token_chunks for o in c.choices[0].logprobs.text_offset]
    assert offsets == expected["logprobs"]["text_offset"]
    scores = [lp for c in token_chunks for lp in c.choices[0].logprobs.token_logprobs]
    assert scores == pytest.approx(expected["logprobs"]["token_logprobs"], abs=1e-5)
    assert [c.choices[0].finish_reason for c in token_chunks][-1] == "length"
    assert not any(c.choices[0].finish_reason for c in token_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == MAX_TOKENS
    # The tokens made while the loop stalled went out together.
    assert len(token_chunks) < MAX_TOKENS
    assert max(len(c.choices[0].logprobs.tokens) for c in token_chunks) > 1


def test_a_stalled_chat_stream_with_two_choices_keeps_each_choice_whole(app):
    body = {
        "messages": [{"role": "user", "content": "def add(a, b):"}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 1,
    }
    streamed, whole = _served(app, "/v1/chat/completions", body)
    chunks = [msgspec.json.decode(e, type=ChatCompletionChunk) for e in _events(streamed)]
    expected = {c["index"]: c for c in json.loads(whole)["choices"]}
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        text = "".join(c.delta.content or "" for c in mine)
        assert text == expected[index]["message"]["content"]
        tokens = [t.token for c in mine if c.logprobs for t in c.logprobs.content]
        assert tokens == [t["token"] for t in expected[index]["logprobs"]["content"]]
        assert len(tokens) == MAX_TOKENS
        assert [c.finish_reason for c in mine][-1] == "length"
    assert len(chunks) < 2 * MAX_TOKENS


def test_stream_interval_sends_the_first_token_then_groups_of_k(checkpoint):
    app = create_app(
        checkpoint,
        num_blocks=64,
        max_num_seqs=8,
        max_model_len=64,
        dtype="float32",
        stream_interval=4,
    )
    forbid_eos(app.engine)
    # Steps spaced well apart, so the idle loop sees each token before the next one and
    # the grouping comes from the interval alone (a loop that falls behind joins tokens
    # whatever the interval, which would make the first event's size a matter of timing).
    runner, step = app.engine.runner, app.engine.runner.step

    def spaced_step(*args, **kwargs):
        time.sleep(STEP_SPACING)
        return step(*args, **kwargs)

    runner.step = spaced_step
    body = {"prompt": "class Stack:", "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0}
    streamed, whole = _served(app, "/v1/completions", body, stall=False)
    chunks = [msgspec.json.decode(e, type=CompletionChunk) for e in _events(streamed)]
    sizes = [len(c.choices[0].logprobs.tokens) for c in chunks]
    assert sizes[0] == 1  # the first token is not held back
    assert all(size >= 4 for size in sizes[1:-1]) and sum(sizes) == MAX_TOKENS
    expected = json.loads(whole)["choices"][0]
    assert "".join(c.choices[0].text for c in chunks) == expected["text"]
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == (
        expected["logprobs"]["tokens"]
    )
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_a_bad_stream_interval_is_refused_naming_it(checkpoint, bad):
    from ds_serve.app import App

    engine = create_app(checkpoint, num_blocks=8, max_model_len=64, dtype="float32").engine
    with pytest.raises(ValueError, match=r"stream_interval must be an int >= 1, got"):
        App(engine, stream_interval=bad)
