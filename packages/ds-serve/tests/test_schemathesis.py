"""The published OpenAPI document drives schemathesis against a live server: requests
generated from every operation's schema (valid and invalid bodies) never get a 5xx,
and every error is in the OpenAI format."""

from __future__ import annotations

import json

import msgspec
import pytest
from ds_serve import create_app
from ds_serve.api import ErrorResponse
from ds_serve.openapi import openapi_schema
from hypothesis import HealthCheck, settings
from serve_live import LiveServer

schemathesis = pytest.importorskip("schemathesis")

schema = schemathesis.openapi.from_dict(openapi_schema())
# Random generation only: the deterministic coverage phase adds hundreds of boundary
# cases per operation, minutes on the shared 2-core machine.
schema.config.phases.update(phases=["fuzzing"])


def header(response, name: str) -> str:
    value = response.headers.get(name, "")
    return value[0] if isinstance(value, list) else value


@pytest.fixture(scope="module")
def server(checkpoint):
    app = create_app(
        checkpoint,
        num_blocks=64,
        max_num_seqs=8,
        max_model_len=48,
        dtype="float32",
        served_model_name="tiny-coder",
    )
    with LiveServer(app) as live:
        yield live


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_generated_requests_never_5xx_and_errors_are_openai_shaped(case, server):
    response = case.call(base_url=server.url, timeout=60)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert header(response, "content-type").startswith("application/json")
        error = msgspec.json.decode(response.content, type=ErrorResponse).error
        assert error.message and error.type
    elif header(response, "content-type").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]")
    else:
        json.loads(response.content)
