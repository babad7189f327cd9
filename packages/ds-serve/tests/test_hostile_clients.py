"""Hostile clients on loopback: requests built to lock others out, routes probed without
the key, prompts too long to tokenize, chat templates that raise. Each gets a clear
4xx; nobody else is kept out and nothing of a refused request stays queued."""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import threading
import time

import httpx
import pytest
from ds_batching import QueueFull
from ds_serve import create_app
from ds_serve.cli import parse_args
from ds_serve.engine import RequestTooLarge
from ds_serve.sampling import SamplingParams
from serve_live import LiveServer

from conftest import forbid_eos

KEY = "clé-🔑-secret"  # a UTF-8 key, sent as its UTF-8 bytes
AUTH = {"Authorization": b"Bearer " + KEY.encode("utf-8")}
RAISING_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('Conversation must start with a user message') }}{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)


@pytest.fixture(scope="module")
def keyed(checkpoint, tmp_path_factory):
    """A server with an API key, a chat template that raises on a bad role order, and a
    body limit large enough for multi-megabyte prompts."""
    directory = tmp_path_factory.mktemp("keyed") / "model"
    shutil.copytree(checkpoint, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = RAISING_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    app = create_app(
        directory,
        api_key=KEY,
        num_blocks=64,
        max_num_seqs=4,
        max_model_len=64,
        max_body_bytes=8 * 1024 * 1024,
        dtype="float32",
    )
    with LiveServer(app) as live:
        yield live


ROUTES = [
    ("GET", "/metrics", None),
    ("GET", "/v1/models", None),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [5, 6]}),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("GET", "/no/such/route", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_but_health_needs_the_key(keyed, method, path, body):
    with httpx.Client(base_url=keyed.url, timeout=60) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY.encode()}):
            r = http.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
        r = http.request(method, path, json=body, headers=AUTH)
        assert r.status_code == (404 if path == "/no/such/route" else 200), r.text
        assert http.get("/health").status_code == 200  # probes need no key


def test_the_key_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("DS_SERVE_API_KEY", KEY)
    assert parse_args([]).api_key == KEY
    assert parse_args(["--api-key", "other"]).api_key == "other"  # the flag wins
    monkeypatch.setenv("DS_SERVE_API_KEY", "")
    assert parse_args([]).api_key is None


def test_a_raising_chat_template_is_a_400_with_its_message(keyed):
    messages = [{"role": "assistant", "content": "I speak first"}]
    with httpx.Client(base_url=keyed.url, timeout=60, headers=AUTH) as http:
        for path in ("/v1/chat/completions", "/tokenize"):
            r = http.post(path, json={"messages": messages})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == "messages"
            assert "Conversation must start with a user message" in error["message"]


def _health_latencies(url: str, stop: threading.Event) -> list[float]:
    latencies = []
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            started = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
    return latencies


def test_a_multi_megabyte_prompt_is_refused_without_stalling_health(keyed):
    prompt = "x = 1\n" * 650_000  # 3.9 MB
    # Encoded up front: the client shares this process (and its GIL) with the server.
    bodies = [
        ("/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 1})),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": prompt}]})),
        ("/tokenize", json.dumps({"prompt": prompt})),
    ]
    # This machine's own /health latency, measured first: other work may share its cores.
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    baseline = statistics.median(_health_latencies(keyed.url, stop))
    stop = threading.Event()
    latencies: list[float] = []
    poller = threading.Thread(target=lambda: latencies.extend(_health_latencies(keyed.url, stop)))
    poller.start()
    try:
        with httpx.Client(base_url=keyed.url, timeout=60, headers=AUTH) as http:
            for path, body in bodies * 3:
                started = time.perf_counter()
                r = http.post(path, content=body, headers={"content-type": "application/json"})
                assert r.status_code == 400, r.text
                assert r.json()["error"]["code"] == "context_length_exceeded"
                assert "characters" in r.json()["error"]["message"]
                assert time.perf_counter() - started < 5
    finally:
        stop.set()
        poller.join()
    assert len(latencies) >= 3
    assert statistics.median(latencies) < 0.05 + baseline, (baseline, latencies)


def test_tokenizing_runs_off_the_event_loop(keyed):
    """A tokenizer call that takes a second (here made slow on purpose) must not hold
    up /health: it runs on a worker thread."""
    tokenizer = keyed.app.engine.tokenizer
    real_encode = tokenizer.encode

    def slow_encode(text, *args, **kwargs):
        time.sleep(1.0)
        return real_encode(text, *args, **kwargs)

    tokenizer.encode = slow_encode
    try:
        with httpx.Client(base_url=keyed.url, timeout=60, headers=AUTH) as http:
            done = []
            worker = threading.Thread(
                target=lambda: done.append(http.post("/tokenize", json={"prompt": "def f():"}))
            )
            worker.start()
            time.sleep(0.2)  # the request is now inside the slow tokenizer
            started = time.perf_counter()
            assert http.get("/health").status_code == 200
            assert time.perf_counter() - started < 0.5
            worker.join()
            assert done[0].status_code == 200
    finally:
        del tokenizer.encode  # back to the class's method


# ---- admission: all of a request's sequences or none ------------------------------------


def test_a_refused_request_leaves_nothing_queued(checkpoint):
    app = create_app(checkpoint, num_blocks=64, max_num_seqs=1, max_waiting=4, dtype="float32")
    engine = app.engine
    forbid_eos(engine)
    prompt = engine.tokenizer.encode("def f(x):")
    long = SamplingParams(max_tokens=300, temperature=0.0)

    async def scenario() -> None:
        engine.start(asyncio.get_running_loop())
        busy = asyncio.Queue()
        engine.submit_all([(prompt, long)] * 3, queue=busy)  # 1 runs, 2 wait
        while engine.stats()["running"] != 1:
            await asyncio.sleep(0.005)
        before = engine.stats()
        assert before["waiting"] == 2
        # 3 more would need 5 places in a 4-place queue: refused whole, none left behind.
        with pytest.raises(QueueFull):
            engine.submit_all([(prompt, long)] * 3, queue=asyncio.Queue())
        assert engine.stats()["waiting"] == 2 and engine.stats()["tracked"] == 3
        # 5 sequences could never wait together: a RequestTooLarge (400), nothing queued.
        with pytest.raises(RequestTooLarge, match=r"5 sequences .*\(--max-waiting 4\)"):
            engine.submit_all([(prompt, long)] * 5, queue=asyncio.Queue())
        # A sequence the KV pool can never hold fails the whole request, nothing kept.
        huge = SamplingParams(max_tokens=64 * 16, temperature=0.0)
        with pytest.raises(ValueError, match="KV slots"):
            engine.submit_all([(prompt, long), (prompt, huge)], queue=asyncio.Queue())
        assert engine.stats()["waiting"] == 2 and engine.stats()["tracked"] == 3
        # The next normal request gets in.
        assert len(engine.submit_all([(prompt, long)], queue=asyncio.Queue())) == 1
        assert engine.stats()["waiting"] == 3
        engine.abort_all()
        while engine.num_in_flight():
            await asyncio.sleep(0.005)

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()


HOSTILE = {"prompt": ["import os"] * 64, "n": 16, "max_tokens": 4}  # 1024 sequences


def test_an_oversized_request_is_a_400_naming_the_limit(checkpoint):
    app = create_app(checkpoint, num_blocks=64, max_num_seqs=4, max_waiting=16, dtype="float32")
    with LiveServer(app) as live:
        r = httpx.post(live.url + "/v1/completions", json=HOSTILE, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "request_too_large" and error["param"] == "n"
        assert "64 prompts x n=16" in error["message"] and "--max-waiting 16" in error["message"]
        assert app.engine.stats()["tracked"] == 0 and app.engine.stats()["waiting"] == 0


async def _normal_client(client: httpx.AsyncClient, url: str, i: int, rounds: int) -> int:
    completed = 0
    for r in range(rounds):
        body = {"prompt": f"def f{i}_{r}(x):", "max_tokens": 12, "stream": True, "seed": i}
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        completed += 1
    return completed


async def _hostile_client(client: httpx.AsyncClient, url: str, stop: asyncio.Event) -> list:
    codes = []
    while not stop.is_set():
        r = await client.post(url + "/v1/completions", json=HOSTILE)
        codes.append(r.status_code)
        await asyncio.sleep(0)
    return codes


def test_a_hostile_client_looping_oversized_requests_locks_no_one_out(checkpoint):
    app = create_app(
        checkpoint,
        num_blocks=160,
        max_num_seqs=8,
        max_waiting=32,
        max_num_batched_tokens=256,
        dtype="float32",
    )
    forbid_eos(app.engine)

    async def scenario(url: str) -> tuple[list[int], list[int]]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            stop = asyncio.Event()
            hostile = asyncio.create_task(_hostile_client(client, url, stop))
            await asyncio.sleep(0.2)  # the attack is under way before anyone else comes
            try:
                normal = await asyncio.wait_for(
                    asyncio.gather(*(_normal_client(client, url, i, 3) for i in range(8))),
                    timeout=240,
                )
            finally:
                stop.set()
            return normal, await hostile

    with LiveServer(app) as live:
        normal, hostile = asyncio.run(scenario(live.url))
        assert normal == [3] * 8  # every normal request completed
        assert len(hostile) >= 5 and set(hostile) == {400}, hostile
        assert app.engine.stats()["tracked"] == 0
