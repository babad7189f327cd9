"""The engine in a process of its own (what ``ds-serve`` runs): the same answers as
``ds_model.generate``, the same errors as the in-process engine, and no hang or orphan
when either process goes away."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import msgspec
import pytest
from ds_serve import Delta, create_app
from ds_serve.engine import TokenLogprob
from ds_serve.engine_process import Step, _params, _wire_params
from ds_serve.sampling import SamplingParams
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_live import LiveServer

from conftest import greedy_reference

PROMPTS = ["def fibonacci(n):", "class Stack:", "import os\n", "The quick brown"]


@pytest.fixture(scope="module")
def live(checkpoint):
    # 16 blocks x 16 slots = 256 tokens of KV, while the context allows 512.
    app = create_app(checkpoint, engine_process=True, num_blocks=16, dtype="float32")
    with LiveServer(app) as server:
        yield server


def test_concurrent_greedy_requests_equal_generate(live, reference_model):
    async def one(client, prompt):
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
        return (await client.post(live.url + "/v1/completions", json=body)).json()

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    for prompt, body in zip(PROMPTS, asyncio.run(run())):
        choice = body["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == greedy_reference(
            reference_model, prompt, 12
        )


def test_streamed_tokens_and_logprobs_cross_the_process(live, reference_model):
    body = {"prompt": "class Stack:", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    text, logprobs = "", []
    with httpx.stream("POST", live.url + "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = msgspec.json.decode(line[6:])["choices"]
                if choice:
                    text += choice[0]["text"]
                    if choice[0]["logprobs"]:
                        logprobs += choice[0]["logprobs"]["token_logprobs"]
    assert (text, "length") == greedy_reference(reference_model, "class Stack:", 8)
    assert len(logprobs) == 8 and all(lp <= 0 for lp in logprobs)


JSON_CHAT = {
    "messages": [{"role": "user", "content": "a point"}],
    "max_tokens": 40,
    "response_format": {"type": "json_object"},
}
REFUSED = [
    # a schema the grammar engine cannot compile
    (
        "/v1/chat/completions",
        {
            **JSON_CHAT,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
            },
        },
    ),
    # more KV than the whole pool holds
    ("/v1/completions", {"prompt": "x", "max_tokens": 300}),
    # an adapter that is not loaded
    ("/v1/completions", {"model": "no-such-adapter", "prompt": "x"}),
    # more sequences than may ever wait at once
    ("/v1/completions", {"prompt": ["x"] * 20, "n": 20, "max_tokens": 2}),
]


@pytest.fixture(scope="module")
def thread_live(checkpoint):
    app = create_app(checkpoint, num_blocks=16, dtype="float32")
    with LiveServer(app) as server:
        yield server


@pytest.mark.parametrize(("route", "body"), REFUSED)
def test_refusals_are_the_in_process_engine_s(live, thread_live, route, body):
    def answer(url):
        response = httpx.post(url + route, json=body, timeout=60)
        # Request ids count each engine's requests: the two engines have seen different ones.
        return response.status_code, re.sub(r"req-\d+", "req-N", response.text)

    apart = answer(live.url)
    assert 400 <= apart[0] < 500
    assert apart == answer(thread_live.url)


def test_json_output_health_and_metrics(live):
    ok = httpx.post(live.url + "/v1/chat/completions", json=JSON_CHAT, timeout=60)
    assert ok.status_code == 200
    choice = ok.json()["choices"][0]
    assert choice["message"]["content"].startswith("{")
    if choice["finish_reason"] == "stop":  # the grammar completed: valid JSON
        msgspec.json.decode(choice["message"]["content"])
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0
    metrics = httpx.get(live.url + "/metrics").text
    assert 'vllm:request_success_total{model_name="tiny-coder",finished_reason=' in metrics
    assert "vllm:prompt_tokens_total" in metrics


@pytest.mark.slow  # a server and engine process of its own
def test_a_full_waiting_queue_is_a_429(checkpoint):
    app = create_app(
        checkpoint,
        engine_process=True,
        num_blocks=32,
        dtype="float32",
        max_waiting=1,
        max_num_seqs=1,
    )

    async def run(url):
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"prompt": "x", "max_tokens": 64, "temperature": 0}
            calls = [client.post(url + "/v1/completions", json=body) for _ in range(6)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    with LiveServer(app) as server:
        codes = asyncio.run(run(server.url))
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}


@pytest.mark.slow  # a server and engine process of its own
def test_a_dead_engine_process_ends_requests_and_turns_health_unavailable(checkpoint):
    app = create_app(checkpoint, engine_process=True, num_blocks=32, dtype="float32")
    with LiveServer(app) as server:
        body = {"prompt": "x", "max_tokens": 480, "ignore_eos": True, "stream": True}
        reasons = []
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and not reasons:
                    os.kill(app.engine.process.pid, signal.SIGKILL)  # after the first token
                if line.startswith("data: {"):
                    reasons += [
                        c["finish_reason"] for c in msgspec.json.decode(line[6:])["choices"]
                    ]
        assert reasons[-1] == "abort"
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503
        again = httpx.post(server.url + "/v1/completions", json=body)
        assert again.status_code == 503


@pytest.mark.slow  # a server and engine process of its own
def test_the_engine_process_stops_with_the_server_and_without_it(checkpoint):
    app = create_app(checkpoint, engine_process=True, num_blocks=8, dtype="float32")
    with LiveServer(app) as server:
        # Ctrl-C reaches the whole process group; the engine leaves stopping to the
        # server, which drains its requests first.
        os.kill(app.engine.process.pid, signal.SIGINT)
        os.kill(app.engine.process.pid, signal.SIGTERM)
        body = {"prompt": "x", "max_tokens": 4, "ignore_eos": True}
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert response.json()["choices"][0]["finish_reason"] == "length"
    assert app.engine.process.returncode == 0
    # A server that dies without shutting down closes the command pipe: the engine
    # process sees its end and exits rather than outliving it.
    orphan = create_app(checkpoint, engine_process=True, num_blocks=8, dtype="float32")
    os.close(orphan.engine._commands)
    deadline = time.monotonic() + 30
    while orphan.engine.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert orphan.engine.process.returncode == 0


@pytest.mark.slow  # a server and engine process of its own
def test_a_request_whose_submitter_stops_waiting_is_aborted(checkpoint):
    from ds_serve.engine_process import EngineClient

    async def run():
        client = EngineClient(checkpoint, {"num_blocks": 32, "dtype": "float32"})
        client.start()
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        try:
            # The HTTP client goes away while the submission waits for its reply.
            task = asyncio.create_task(client.submit_request([([5, 6], params)], queue=None))
            await asyncio.sleep(0)
            task.cancel()
            deadline = time.monotonic() + 30
            while True:
                stats = await client.current_stats()
                if stats["aborted"] == 1 and stats["tracked"] == 0:
                    break
                assert time.monotonic() < deadline, f"the request was not aborted: {stats}"
                await asyncio.sleep(0.05)
            # Its last delta came back and was dropped, not kept for a reader that never comes.
            while client._orphans:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert not client._early and client.num_in_flight() == 0
        finally:
            await asyncio.get_running_loop().run_in_executor(None, client.shutdown)

    asyncio.run(run())


def test_a_model_that_does_not_load_fails_in_create_app(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_app(tmp_path / "missing", engine_process=True)
    with pytest.raises(ValueError, match="max_model_len"):
        create_app(checkpoint, engine_process=True, max_model_len=10**6)


params_strategy = st.builds(
    SamplingParams,
    temperature=st.floats(0, 2),
    top_p=st.floats(0.01, 1),
    top_k=st.integers(-1, 50),
    logit_bias=st.none() | st.dictionaries(st.integers(0, 1000), st.floats(-100, 100), max_size=3),
    seed=st.integers(0, 2**63 - 1),
    max_tokens=st.integers(1, 100),
    stop=st.lists(st.text(min_size=1, max_size=4), max_size=3).map(tuple),
    stop_token_ids=st.lists(st.integers(0, 100), max_size=3).map(tuple),
    logprobs=st.none() | st.integers(0, 5),
)


@settings(max_examples=50, deadline=None)
@given(params_strategy)
def test_sampling_params_cross_the_wire_unchanged(params):
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(_wire_params(params)))
    assert _params(wire) == params
    assert _params(wire).draw_seed == params.draw_seed


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.builds(
            Delta,
            request_id=st.text(max_size=8),
            text=st.text(max_size=8),
            token_ids=st.lists(st.integers(0, 2**31), max_size=3),
            finish_reason=st.sampled_from([None, "stop", "length", "abort"]),
            prompt_tokens=st.integers(0, 100),
            completion_tokens=st.integers(0, 100),
            logprobs=st.none()
            | st.lists(
                st.builds(
                    TokenLogprob,
                    token_id=st.integers(0, 1000),
                    logprob=st.floats(-50, 0),
                    top=st.lists(
                        st.tuples(st.integers(0, 1000), st.floats(-50, 0)), max_size=2
                    ).map(tuple),
                ),
                max_size=2,
            ),
        ),
        max_size=4,
    )
)
def test_deltas_cross_the_wire_unchanged(deltas):
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(Step(deltas)), type=Step)
    assert decoded.deltas == deltas
