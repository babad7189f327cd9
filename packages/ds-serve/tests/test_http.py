"""The HTTP surface: fuzzed bodies, limits, tokenize/detokenize, disconnects, shutdown."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import msgspec
import pytest
from ds_serve import create_app
from ds_serve.api import ErrorResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_live import LiveServer
from serve_metrics import scrape, wait_idle

from conftest import forbid_eos

MAX_BODY = 4096


@pytest.fixture(scope="module")
def server(checkpoint):
    app = create_app(
        checkpoint,
        num_blocks=64,
        max_num_seqs=8,
        max_model_len=64,
        max_body_bytes=MAX_BODY,
        dtype="float32",
    )
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def assert_openai_error(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json")
    error = msgspec.json.decode(response.content, type=ErrorResponse).error
    assert error.message and error.type
    return json.loads(response.content)["error"]


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-5, 600)
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=6,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "robot", 3])},
    optional={"content": st.text(max_size=20) | json_values, "name": json_values},
)
fields = {
    "model": st.sampled_from(["tiny-coder", "nope", ""]) | json_values,
    "prompt": st.text(max_size=30) | st.lists(st.integers(-3, 600), max_size=6) | json_values,
    "messages": st.lists(message, max_size=3) | json_values,
    "max_tokens": st.integers(-2, 8) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 50),
    "n": st.integers(-1, 3),
    "stream": st.booleans() | json_values,
    "stop": st.text(max_size=3) | json_values,
    "seed": st.integers(-(2**64), 2**64),
    "logprobs": st.integers(-1, 21) | json_values,
    "top_logprobs": st.integers(-1, 21) | json_values,
    "logit_bias": st.dictionaries(
        st.text(max_size=4) | st.integers(-2, 600).map(str), st.floats(-200, 200), max_size=3
    )
    | json_values,
    "min_tokens": st.integers(-1, 10),
    "stop_token_ids": st.lists(st.integers(-2, 600), max_size=3) | json_values,
    "repetition_penalty": st.floats(-1, 3),
    "presence_penalty": st.floats(-3, 3),
    "min_p": st.floats(-0.5, 1.5),
    "ignore_eos": st.booleans(),
    "stream_options": json_values,
    "tokens": st.lists(st.integers(-2, 600), max_size=5),
    "echo": st.booleans(),
    "bogus": json_values,
}
bodies = st.one_of(
    st.fixed_dictionaries({}, optional=fields).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
)
paths = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=paths, body=bodies)
def test_fuzzed_bodies_never_5xx_and_errors_are_openai_shaped(http, path, body):
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_openai_error(response)
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]")
    else:
        json.loads(response.content)


def test_oversized_body_is_413(http):
    response = http.post("/v1/completions", json={"prompt": "x" * (2 * MAX_BODY)})
    assert response.status_code == 413
    assert assert_openai_error(response)["code"] == "request_too_large"


def test_unknown_route_and_method_are_openai_errors(http):
    assert_openai_error(http.get("/v1/nothing"))
    response = http.get("/v1/completions")
    assert response.status_code == 405
    assert_openai_error(response)


def test_tokenize_and_detokenize_round_trip(http):
    tokens = http.post("/tokenize", json={"prompt": "def add(a, b):"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 64
    text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "def add(a, b):"
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 0
    bad = http.post("/detokenize", json={"tokens": [99999]})
    assert bad.status_code == 400 and assert_openai_error(bad)["param"] == "tokens"


def test_unsupported_options_are_refused_not_ignored(http):
    response = http.post("/v1/completions", json={"prompt": "x", "suffix": "y"})
    assert response.status_code == 400 and assert_openai_error(response)["param"] == "suffix"
    response = http.post("/v1/chat/completions", json={"messages": [], "tools": []})
    assert assert_openai_error(response)["param"] == "messages"
    response = http.post("/v1/completions", json={"prompt": "x", "stream_options": {}})
    assert assert_openai_error(response)["param"] == "stream_options"


def test_max_tokens_past_the_context_is_refused(http):
    response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 200})
    error = assert_openai_error(response)
    assert response.status_code == 400 and error["param"] == "max_tokens"
    assert "64" in error["message"]


def test_echo_prepends_the_prompt(http):
    body = {"prompt": "import os", "max_tokens": 3, "temperature": 0}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    echoed = http.post("/v1/completions", json={**body, "echo": True}).json()
    assert echoed["choices"][0]["text"] == "import os" + plain


def raw_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def test_a_non_streaming_client_that_disconnects_is_aborted(server):
    key = 'vllm:request_success_total{finished_reason="abort"}'
    # 40 tokens at max_model_len 64: long enough to still be running when we hang up.
    finished = hang_up_while_running(server, {"prompt": "x", "max_tokens": 60, "temperature": 0.7})
    # The request either was aborted or (on a very fast machine) had already finished.
    assert finished.get(key, 0) == 1 or sum(finished.values()) == 1


def hang_up_while_running(live, body: dict) -> dict[str, float]:
    """Send ``body``, close the connection once the request runs, wait for the server
    to go idle with its KV pool empty; the finished-request counters' increments."""
    before = scrape(live.url)
    sock = raw_request(live.port, body)
    deadline = time.monotonic() + 10
    while scrape(live.url)["vllm:num_requests_running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    sock.close()
    after = wait_idle(live.url)
    assert after["vllm:kv_cache_usage_perc"] == 0
    return {k: after[k] - before.get(k, 0) for k in after if "request_success" in k}


@pytest.mark.parametrize(("http_impl", "loop"), [("h11", "asyncio"), ("httptools", "uvloop")])
def test_each_http_stack_streams_and_aborts_a_stream_that_hangs_up(checkpoint, http_impl, loop):
    # --http / --loop pick uvicorn's implementations; the streamed text and the
    # disconnect that aborts a request must not depend on which.
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    app = create_app(checkpoint, num_blocks=64, max_num_seqs=8, max_model_len=64, dtype="float32")
    forbid_eos(app.engine)  # the hung-up stream cannot finish on its own first
    with LiveServer(app, http=http_impl, loop=loop) as live:
        url = f"{live.url}/v1/completions"
        body = {"prompt": "import os", "max_tokens": 8, "temperature": 0}
        plain = httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]
        streamed = []
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    streamed += [c["text"] for c in json.loads(line[6:])["choices"]]
        assert "".join(streamed) == plain
        finished = hang_up_while_running(live, {"prompt": "x", "max_tokens": 60, "stream": True})
    assert finished.get('vllm:request_success_total{finished_reason="abort"}', 0) == 1


def test_graceful_shutdown_finishes_or_aborts_in_flight_requests(checkpoint):
    app = create_app(checkpoint, num_blocks=128, max_num_seqs=4, dtype="float32")
    forbid_eos(app.engine)  # 480 tokens cannot finish within the 0.3 s grace
    results = []
    with LiveServer(app, graceful_timeout=0.3) as live:

        def client():
            body = {"prompt": "def f(x):", "max_tokens": 480, "temperature": 0.9, "stream": True}
            lines = []
            try:
                with httpx.stream(
                    "POST", live.url + "/v1/completions", json=body, timeout=30
                ) as response:
                    lines.extend(response.iter_lines())
            except httpx.HTTPError as exc:
                lines.append(f"error {exc!r}")
            results.append(lines)

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while scrape(live.url)["vllm:num_requests_running"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 3
    finish_reasons = []
    for lines in results:
        events = [line for line in lines if line.startswith("data: ")]
        assert events and events[-1] == "data: [DONE]", lines[-3:]
        last = json.loads(events[-2][6:])["choices"][0]
        assert last["finish_reason"] in ("abort", "stop", "length")
        finish_reasons.append(last["finish_reason"])
    assert finish_reasons == ["abort"] * 3
    assert not app.engine._thread.is_alive()
    assert app.engine.stats()["tracked"] == 0
    assert app.engine.stats()["kv_usage"] == 0
