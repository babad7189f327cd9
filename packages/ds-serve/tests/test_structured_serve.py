"""Structured output and tool calls against a live server on the built-in model: every
constrained output parses and validates, streamed and not, and the openai client's
typed objects parse every response."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from ds_serve import create_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from serve_live import LiveServer

MAX_TOKENS = 400  # far above what the schemas below allow (a few hundred bytes at most)
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def server():
    app = create_app(None, num_blocks=256, max_num_seqs=8, served_model_name="tiny")
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def chat(http, **body) -> ChatCompletion:
    """POST a chat request; the body must parse (validated, not constructed) as the
    openai client's ChatCompletion."""
    response = http.post("/v1/chat/completions", json={"model": "tiny", **body})
    assert response.status_code == 200, response.text
    return ChatCompletion.model_validate(response.json())


def chat_stream(http, **body) -> list[ChatCompletionChunk]:
    chunks = []
    with http.stream(
        "POST", "/v1/chat/completions", json={"model": "tiny", "stream": True, **body}
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(ChatCompletionChunk.model_validate_json(line[6:]))
    return chunks


# ---- schemas ---------------------------------------------------------------------------
# Bounded on purpose: strings have a maxLength or a bounded pattern, integers a range,
# arrays maxItems, objects no extra properties. The grammar then forces every document to
# end within MAX_TOKENS even when the model would go on.

KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)
PATTERNS = ["^[a-z]{1,5}$", "^[0-9]{3}-[0-9]{2}$", "^(yes|no|maybe)$", "^[A-Z][a-z]{0,4}$"]

scalars = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.sampled_from(PATTERNS).map(lambda p: {"type": "string", "pattern": p}),
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-100, 100),
        st.integers(0, 1000),
    ),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.one_of(st.integers(-5, 5), KEYS), min_size=1, max_size=4, unique=True).map(
        lambda values: {"enum": values}
    ),
)


def _array(items):
    return st.builds(
        lambda item, top: {"type": "array", "items": item, "maxItems": top},
        items,
        st.integers(0, 3),
    )


def _object(values):
    return st.dictionaries(KEYS, values, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": False,
            }
        )
    )


schemas = _object(st.one_of(scalars, _array(scalars), _object(st.one_of(scalars, _array(scalars)))))


def _response_format(schema, strict):
    return {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": schema, "strict": strict},
    }


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(schema=schemas, strict=st.booleans(), seed=st.integers(0, 2**31), greedy=st.booleans())
def test_json_schema_outputs_validate(http, schema, strict, seed, greedy):
    result = chat(
        http,
        messages=MESSAGES,
        response_format=_response_format(schema, strict),
        max_tokens=MAX_TOKENS,
        temperature=0 if greedy else 1.0,
        seed=seed,
    )
    choice = result.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), schema)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(schema=schemas, seed=st.integers(0, 2**31))
def test_streamed_json_schema_outputs_validate(http, schema, seed):
    chunks = chat_stream(
        http,
        messages=MESSAGES,
        response_format=_response_format(schema, True),
        max_tokens=MAX_TOKENS,
        temperature=1.0,
        seed=seed,
        n=2,
    )
    texts, reasons = ["", ""], [None, None]
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert reasons == ["stop", "stop"]
    for text in texts:
        jsonschema.validate(json.loads(text), schema)


def test_completions_take_response_format_too(http):
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    response = http.post(
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": ["# JSON:\n", "x = "],
            "n": 2,
            "max_tokens": 40,
            "temperature": 1.0,
            "seed": 3,
            "response_format": _response_format(schema, True),
        },
    )
    assert response.status_code == 200, response.text
    result = Completion.model_validate(response.json())
    assert len(result.choices) == 4
    for choice in result.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), schema)


def test_json_object_output_is_an_object_when_complete(http):
    """json_object allows any object, which a random-ish model may never close; within
    the limit, what ends is an object and what runs out is a prefix of one."""
    for seed in range(4):
        result = chat(
            http,
            messages=MESSAGES,
            response_format={"type": "json_object"},
            max_tokens=60,
            temperature=1.0,
            seed=seed,
        )
        text, reason = result.choices[0].message.content, result.choices[0].finish_reason
        assert text.startswith("{")
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert reason == "length"
            with pytest.raises(json.JSONDecodeError):
                json.loads(text)


def test_text_format_is_plain_generation(http):
    plain = chat(http, messages=MESSAGES, max_tokens=8, temperature=0)
    text = chat(
        http, messages=MESSAGES, max_tokens=8, temperature=0, response_format={"type": "text"}
    )
    assert text.choices[0].message.content == plain.choices[0].message.content


# ---- tools -----------------------------------------------------------------------------

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


def _check_calls(calls, allowed_names):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed_names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("parallel", [False, True])
def test_required_tool_choice_returns_valid_calls(http, seed, parallel):
    result = chat(
        http,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=parallel,
        max_tokens=MAX_TOKENS,
        temperature=1.0,
        seed=seed,
    )
    choice = result.choices[0]
    if not parallel:
        assert choice.finish_reason == "tool_calls"
        assert len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls, set(SCHEMAS))


@pytest.mark.parametrize("name", ["get_weather", "get_time"])
def test_named_tool_choice_calls_that_function(http, name):
    for stream in (False, True):
        body = dict(
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": name}},
            parallel_tool_calls=False,
            max_tokens=MAX_TOKENS,
            temperature=1.0,
            seed=7,
        )
        if not stream:
            choice = chat(http, **body).choices[0]
            assert choice.finish_reason == "tool_calls"
            _check_calls(choice.message.tool_calls, {name})
            continue
        chunks = chat_stream(http, **body)
        deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or []) if c.choices]
        assert [d.index for d in deltas] == [0]
        assert deltas[0].function.name == name
        jsonschema.validate(json.loads(deltas[0].function.arguments), SCHEMAS[name])
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_none_and_auto_leave_the_text_free(http):
    none = chat(http, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=12, temperature=0)
    assert none.choices[0].message.tool_calls is None
    auto = chat(http, messages=ASK, tools=TOOLS, max_tokens=12, temperature=0)
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_multi_turn_conversation_with_tool_results(http, client):
    """A call and its result go back into the prompt through the chat template (the JSON
    convention for this model), and the next turn is served; the openai client sends
    and parses the whole exchange."""
    first = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    prompt = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    text = http.post("/detokenize", json={"tokens": prompt}).json()["prompt"]
    rendered_call = {"name": call.function.name, "arguments": json.loads(call.function.arguments)}
    assert f"<tool_call>{json.dumps(rendered_call)}</tool_call>" in text
    assert '<tool_response>{"tool_call_id": "' + call.id in text
    second = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, max_tokens=16, temperature=0
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": _response_format({"type": "nonsense"}, False)},
            "response_format.json_schema",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "rm"}}},
            "tool_choice",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_bad_structured_requests_are_400_naming_the_field(http, body, param):
    response = http.post("/v1/chat/completions", json={"messages": ASK, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_unconstrained_requests_sharing_batches_are_unchanged(http):
    """Masks apply to their own rows only: a greedy request decoded alongside
    constrained ones gives the same text as alone."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"messages": ASK, "max_tokens": 24, "temperature": 0}
    alone = chat(http, **body).choices[0].message.content
    constrained = {
        "messages": MESSAGES,
        "response_format": {"type": "json_object"},
        "max_tokens": 24,
        "temperature": 1.0,
    }
    with ThreadPoolExecutor(5) as pool:
        others = [pool.submit(chat, http, **constrained, seed=s) for s in range(4)]
        together = pool.submit(chat, http, **body)
        assert all(o.result().choices[0].message.content.startswith("{") for o in others)
        assert together.result().choices[0].message.content == alone
