"""Load and faults: many streaming clients, disconnects mid-stream, a burst past the queue."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from ds_serve import create_app
from serve_live import LiveServer
from serve_metrics import scrape, wait_idle

from conftest import forbid_eos

NUM_BLOCKS = 160


@pytest.fixture(scope="module")
def server(checkpoint):
    app = create_app(
        checkpoint,
        num_blocks=NUM_BLOCKS,
        max_num_seqs=16,
        max_waiting=128,
        max_num_batched_tokens=256,
        dtype="float32",
    )
    forbid_eos(app.engine)  # every request runs to max_tokens: aborts are exact
    with LiveServer(app) as live:
        yield live


async def stream_one(client, url, i, disconnect_after):
    body = {
        "prompt": f"def f{i}(x):",
        "max_tokens": 40,
        "temperature": 0.8,
        "seed": i,
        "stream": True,
    }
    chunks, finish, done = 0, None, False
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            choice = json.loads(line[6:])["choices"][0]
            chunks += 1
            finish = choice["finish_reason"] or finish
            if disconnect_after is not None and chunks >= disconnect_after:
                return "disconnected", None
    return ("done" if done else "cut"), finish


async def run_clients(url, n, disconnecting):
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(
            *(stream_one(client, url, i, 2 if i in disconnecting else None) for i in range(n))
        )


def test_64_streams_with_10_disconnects_all_others_complete_and_the_pool_is_freed(server, caplog):
    caplog.set_level(logging.INFO, logger="ds_serve.engine")
    before = scrape(server.url)
    disconnecting = set(range(3, 63, 6))
    assert len(disconnecting) == 10
    results = asyncio.run(run_clients(server.url, 64, disconnecting))
    for i, (state, finish) in enumerate(results):
        if i in disconnecting:
            assert state == "disconnected"
        else:
            assert state == "done", f"client {i} ended {state}"
            assert finish in ("stop", "length")
    after = wait_idle(server.url)
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
    assert after["vllm:num_kv_blocks_free"] == NUM_BLOCKS
    key = 'vllm:request_success_total{finished_reason="abort"}'
    aborted = after.get(key, 0) - before.get(key, 0)
    assert aborted == 10
    assert sum(1 for r in caplog.records if r.getMessage().startswith("aborted ")) == aborted


def test_a_burst_past_the_queue_gets_429s_and_nothing_else_breaks(checkpoint):
    app = create_app(checkpoint, num_blocks=64, max_num_seqs=2, max_waiting=3, dtype="float32")

    async def burst(url):
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"prompt": "import os", "max_tokens": 12, "temperature": 0}
            return await asyncio.gather(
                *(client.post(url + "/v1/completions", json=body) for _ in range(24))
            )

    with LiveServer(app) as live:
        responses = asyncio.run(burst(live.url))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}, codes
        # At least the queue (max_waiting=3) is admitted; the engine may drain it mid-burst.
        assert codes.count(429) >= 1 and codes.count(200) >= 3
        texts = set()
        for r in responses:
            body = r.json()
            if r.status_code == 429:
                assert body["error"]["type"] == "rate_limit_error"
                assert body["error"]["code"] == "queue_full"
                assert r.headers["retry-after"] == "1"
            else:
                texts.add(body["choices"][0]["text"])
        assert len(texts) == 1  # same greedy answer for every admitted request
        assert httpx.get(live.url + "/health").status_code == 200
        after = httpx.post(
            live.url + "/v1/completions",
            json={"prompt": "import os", "max_tokens": 12, "temperature": 0},
        )
        assert after.status_code == 200 and after.json()["choices"][0]["text"] in texts
        metrics = wait_idle(live.url)
        assert metrics["vllm:request_rejected_total"] == codes.count(429)
        assert metrics["vllm:kv_cache_usage_perc"] == 0
