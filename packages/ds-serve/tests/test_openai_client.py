"""The real OpenAI Python client against a live server on 127.0.0.1."""

from __future__ import annotations

import openai
import pytest
from ds_serve import create_app
from serve_live import LiveServer

from conftest import greedy_reference

API_KEY = "test-key"
PROMPTS = ["def fibonacci(n):", "class Stack:", "import os\n", "The quick brown"]


@pytest.fixture(scope="module")
def server(checkpoint):
    app = create_app(
        checkpoint,
        api_key=API_KEY,
        num_blocks=128,
        max_num_seqs=8,
        dtype="float32",
        served_model_name="tiny-coder",
    )
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models_lists_the_base_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-coder"]


def test_greedy_completion_equals_ds_model_generate(client, reference_model):
    for prompt in PROMPTS[:2]:
        result = client.completions.create(
            model="tiny-coder", prompt=prompt, max_tokens=12, temperature=0
        )
        text, reason = greedy_reference(reference_model, prompt, 12)
        assert result.choices[0].text == text
        assert result.choices[0].finish_reason == reason
        prompt_tokens = len(reference_model.tokenizer.encode(prompt))
        assert result.usage.prompt_tokens == prompt_tokens
        assert result.usage.total_tokens == prompt_tokens + result.usage.completion_tokens
        if reason == "length":
            assert result.usage.completion_tokens == 12


def test_streamed_completion_equals_the_unstreamed_one(client):
    whole = client.completions.create(
        model="tiny-coder", prompt=PROMPTS[0], max_tokens=10, temperature=0
    )
    chunks = list(
        client.completions.create(
            model="tiny-coder",
            prompt=PROMPTS[0],
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )


def test_chat_streamed_and_not(client):
    messages = [
        {"role": "system", "content": "Write code."},
        {"role": "user", "content": "def add(a, b):"},
    ]
    whole = client.chat.completions.create(
        model="tiny-coder", messages=messages, max_tokens=10, temperature=0
    )
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model="tiny-coder", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert whole.usage.prompt_tokens > 0


def test_stop_string_cuts_the_text_and_finishes_with_stop(client, reference_model):
    full, _ = greedy_reference(reference_model, PROMPTS[0], 24)
    visible = full.strip()
    assert len(visible) >= 6, f"the random model produced too little text: {full!r}"
    stop = visible[len(visible) // 2 : len(visible) // 2 + 2]
    result = client.completions.create(
        model="tiny-coder", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop]
    )
    assert result.choices[0].text == full[: full.find(stop)]
    assert result.choices[0].finish_reason == "stop"
    assert stop not in result.choices[0].text


def test_max_tokens_finishes_with_length(client):
    result = client.completions.create(
        model="tiny-coder", prompt=PROMPTS[1], max_tokens=3, temperature=0
    )
    assert result.usage.completion_tokens <= 3
    if result.choices[0].finish_reason == "length":
        assert result.usage.completion_tokens == 3


def test_n_choices_are_seeded_and_distinct(client):
    kwargs = dict(
        model="tiny-coder", prompt=PROMPTS[2], max_tokens=8, temperature=1.0, n=3, seed=1234
    )
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1
    assert 3 <= first.usage.completion_tokens <= 3 * 8


def test_bad_request_names_the_field(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-coder", prompt="x", temperature=7)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "temperature"
    assert info.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-5", prompt="x", max_tokens=2)
    assert info.value.body["param"] == "model"


def test_prompt_longer_than_the_context_is_refused(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-coder", prompt=[5] * 600, max_tokens=2)
    assert info.value.body["code"] == "context_length_exceeded"


def test_api_key_is_required_on_v1(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    import httpx

    assert httpx.get(server.url + "/health").status_code == 200


def test_streamed_chat_with_n_2_interleaves_both_choices(client):
    stream = client.chat.completions.create(
        model="tiny-coder",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0.8,
        n=2,
        seed=3,
        stream=True,
    )
    finished = {}
    for chunk in stream:
        for choice in chunk.choices:
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert set(finished) == {0, 1}
