"""A failing model step must not hang clients: requests end, health turns 503."""

from __future__ import annotations

import httpx
from ds_serve import create_app
from serve_live import LiveServer


def test_a_runner_failure_ends_requests_and_turns_health_unavailable(checkpoint):
    app = create_app(checkpoint, num_blocks=32, dtype="float32")

    def broken_step(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    app.engine.runner.step = broken_step
    with LiveServer(app) as live:
        response = httpx.post(
            live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=30
        )
        assert response.status_code == 200
        assert response.json()["choices"][0]["finish_reason"] == "abort"
        health = httpx.get(live.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        again = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4})
        assert again.status_code == 503
        assert again.json()["error"]["code"] == "shutting_down"


def test_a_request_larger_than_the_whole_kv_pool_is_a_400(checkpoint):
    # 4 blocks x 16 slots = 64 tokens of KV, while the context allows 512.
    app = create_app(checkpoint, num_blocks=4, dtype="float32")
    with LiveServer(app) as live:
        response = httpx.post(
            live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 200}, timeout=30
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "kv_cache_too_small"
        ok = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 8})
        assert ok.status_code == 200


def test_the_engine_satisfies_the_protocol(checkpoint):
    from ds_serve import EngineProtocol

    app = create_app(checkpoint, num_blocks=4, dtype="float32")
    assert isinstance(app.engine, EngineProtocol)
