"""Request decoding: every malformed body becomes a 400 that names the field."""

from __future__ import annotations

import json

import msgspec
import pytest
from ds_serve.api import ChatCompletionRequest, CompletionRequest, ErrorResponse
from ds_serve.errors import APIError, error_from_msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stream",
    "stop",
    "seed",
    "stream_options",
    "logprobs",
    "echo",
    "bogus",
]


@settings(max_examples=200)
@given(
    body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
    kind=st.sampled_from([CompletionRequest, ChatCompletionRequest]),
)
def test_any_json_object_decodes_or_gives_a_named_400(body, kind):
    try:
        msgspec.json.decode(json.dumps(body).encode(), type=kind)
    except msgspec.DecodeError as exc:
        error = error_from_msgspec(exc)
        assert error.status == 400
        assert error.param is None or error.param.split(".")[0] in FIELDS
        decoded = msgspec.json.decode(error.body(), type=ErrorResponse)
        assert decoded.error.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"prompt": "x", "temperature": 3}', "temperature"),
        (b'{"prompt": "x", "n": 0}', "n"),
        (b'{"prompt": "x", "stream_options": {"frobnicate": 1}}', "stream_options.frobnicate"),
        (b'{"prompt": [1, -5]}', "prompt.1"),
        (b'{"max_tokens": 3}', "prompt"),
    ],
)
def test_the_field_at_fault_is_named(body, param):
    try:
        msgspec.json.decode(body, type=CompletionRequest)
    except msgspec.DecodeError as exc:
        assert error_from_msgspec(exc).param == param
    else:
        pytest.fail("decoded an invalid body")


def test_error_body_is_openai_shaped():
    body = json.loads(APIError(429, "full", type="rate_limit_error", code="queue_full").body())
    assert body == {
        "error": {
            "message": "full",
            "type": "rate_limit_error",
            "param": None,
            "code": "queue_full",
        }
    }
