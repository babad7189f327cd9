"""Logprobs through the server equal ``log_softmax`` of ds-model's own forward (fp32),
for generated tokens and for echoed prompts, under chunked prefill, prefix-cache hits
and batching with other requests; the stop-token parameters on the built-in model."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import httpx
import openai
import pytest
import torch
from ds_serve import create_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_live import LiveServer
from serve_metrics import scrape

PIECES = ["def f(x):\n", "    return x\n", "class Stack:", "import os\n", "The quick brown", " fox"]


@pytest.fixture(scope="module")
def server(checkpoint):
    # Small blocks and a small token budget: long prompts prefill in several chunks and
    # share cached prefix blocks.
    app = create_app(
        checkpoint,
        num_blocks=96,
        block_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=12,
        dtype="float32",
        served_model_name="tiny-coder",
    )
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab): row p is log_softmax of the logits after ids[: p + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(-1)


def greedy_ids(model, ids: list[int], max_tokens: int) -> list[int]:
    import ds_model

    return list(ds_model.generate(model, ids, max_new_tokens=max_tokens))


def check_scores(got: dict, ids: list[int], first: int, lsm: torch.Tensor, k: int) -> None:
    """``got``: completions logprobs for ids[first:]; lsm scores the whole of ``ids``."""
    for j, position in enumerate(range(first, len(ids))):
        logprob, top = got["token_logprobs"][j], got["top_logprobs"][j]
        if position == 0:
            assert logprob is None and top is None
            continue
        row = lsm[position - 1]
        assert logprob == pytest.approx(float(row[ids[position]]), abs=1e-4)
        best = row.topk(max(k, 1)).values.tolist()
        # Every value is one of the top k or the chosen token's own (alternatives with
        # equal text, such as two partial UTF-8 bytes, share one key).
        assert len(top) <= k + 1
        for value in top.values():
            assert any(math.isclose(value, b, abs_tol=1e-4) for b in [*best[:k], logprob])


def post_all(url: str, bodies: list[dict]) -> list[dict]:
    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            responses = await asyncio.gather(
                *(http.post(url + "/v1/completions", json=b) for b in bodies)
            )
        for r in responses:
            assert r.status_code == 200, r.text
        return [r.json() for r in responses]

    return asyncio.run(run())


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=5),
    k=st.integers(0, 5),
    max_tokens=st.integers(0, 3),
    warm_cache=st.booleans(),
)
def test_logprobs_equal_the_models_log_softmax(
    server, reference_model, pieces, k, max_tokens, warm_cache
):
    tok = reference_model.tokenizer
    prompt = "".join(pieces)
    ids = tok.encode(prompt)
    if warm_cache:  # a plain request leaves the prompt's blocks in the prefix cache
        post_all(server.url, [{"prompt": ids, "max_tokens": 1, "temperature": 0}])
    others = [
        {"prompt": PIECES[i % len(PIECES)] * 3, "max_tokens": 4, "temperature": 0.8, "seed": i}
        for i in range(3)
    ]
    scored, generated, *_ = post_all(
        server.url,
        [
            {
                "prompt": ids,
                "echo": True,
                "logprobs": k,
                "max_tokens": max_tokens,
                "temperature": 0,
            },
            {"prompt": ids, "logprobs": k, "max_tokens": max(1, max_tokens), "temperature": 0},
            *others,
        ],
    )
    out = greedy_ids(reference_model, ids, max(1, max_tokens))
    full = ids + out
    lsm = reference_logprobs(reference_model, full[:-1] if len(full) > 1 else full)
    echo = scored["choices"][0]
    assert echo["text"].startswith(tok.decode(ids))
    n_scored = len(ids) + min(max_tokens, len(out))
    assert len(echo["logprobs"]["tokens"]) == n_scored
    if max_tokens == 0:
        assert echo["text"] == tok.decode(ids) and scored["usage"]["completion_tokens"] == 0
    check_scores(echo["logprobs"], full[:n_scored], 0, lsm, k)
    gen = generated["choices"][0]["logprobs"]
    check_scores(gen, full[: len(ids) + len(gen["tokens"])], len(ids), lsm, k)
    offsets = echo["logprobs"]["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_typed_clients_parse_completion_and_chat_logprobs(client, reference_model):
    prompt = "def f(x):\n    return x\n"
    scored = client.completions.create(
        model="tiny-coder", prompt=prompt, echo=True, logprobs=2, max_tokens=0
    )
    lp = scored.choices[0].logprobs
    n = scored.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(lp.text_offset) == n and scored.usage.completion_tokens == 0
    assert "".join(lp.tokens).strip() == prompt.strip()

    chat = client.chat.completions.create(
        model="tiny-coder",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert entry.bytes == list(entry.token.encode())
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)


def test_streamed_logprobs_equal_the_whole_response(client):
    for echo in (False, True):
        kwargs = dict(
            model="tiny-coder",
            prompt="class Stack:",
            max_tokens=6,
            temperature=0,
            logprobs=2,
            echo=echo,
        )
        whole = client.completions.create(**kwargs).choices[0]
        chunks = [
            c.choices[0]
            for c in client.completions.create(stream=True, **kwargs)
            if c.choices and c.choices[0].logprobs
        ]
        tokens = [t for c in chunks for t in c.logprobs.tokens]
        values = [v for c in chunks for v in c.logprobs.token_logprobs]
        offsets = [o for c in chunks for o in c.logprobs.text_offset]
        assert tokens == whole.logprobs.tokens
        assert values == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)
        assert offsets == whole.logprobs.text_offset
    messages = [{"role": "user", "content": "hello"}]
    chat = dict(
        model="tiny-coder",
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    whole = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [
        e
        for c in client.chat.completions.create(stream=True, **chat)
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in whole]


def first_tokens(client, prompt: str, n: int, **extra) -> tuple[list[str], object]:
    result = client.completions.create(
        model="tiny-coder", prompt=prompt, max_tokens=n, temperature=0, logprobs=0, **extra
    )
    return result.choices[0].logprobs.tokens, result


@pytest.fixture(scope="module")
def builtin():
    """The shipped model (models/ds-tiny-coder) served, and loaded for reference."""
    import ds_model
    from ds_serve.default_model import find_default_model

    try:
        path = find_default_model(Path(__file__).parent)
    except FileNotFoundError:
        pytest.skip("the built-in model is not in this checkout")
    app = create_app(path, num_blocks=64, dtype="float32", served_model_name="tiny-coder")
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=60)
        yield client, ds_model.from_pretrained(path, dtype="float32")


def test_stop_token_ids_min_tokens_ignore_eos_and_logit_bias(builtin):
    client, model = builtin
    tok = model.tokenizer
    prompt = "def fibonacci(n):\n"
    ids = tok.encode(prompt)
    out = greedy_ids(model, ids, 6)
    assert len(out) >= 3, "the built-in model ends this prompt at once"
    stop = out[2]
    first = out.index(stop)
    _, result = first_tokens(client, prompt, 6, extra_body={"stop_token_ids": [stop]})
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens == first + 1
    # min_tokens holds the stop token off the first tokens.
    _, result = first_tokens(
        client, prompt, 6, extra_body={"stop_token_ids": [out[0]], "min_tokens": 3}
    )
    assert result.usage.completion_tokens >= 3
    # A huge bias makes EOS the greedy choice: the request ends at once, unless ignore_eos.
    eos = tok.eos_token_id
    bias = {str(eos): 100}
    _, result = first_tokens(client, prompt, 4, logit_bias=bias)
    assert result.choices[0].finish_reason == "stop" and result.usage.completion_tokens == 1
    _, result = first_tokens(client, prompt, 4, logit_bias=bias, extra_body={"ignore_eos": True})
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 4
    assert result.choices[0].logprobs.token_logprobs[0] > -1e-3  # the biased distribution


def test_skip_special_tokens_and_include_stop_str_in_output(builtin):
    client, model = builtin
    tok = model.tokenizer
    prompt = "def fibonacci(n):\n"
    # A huge bias makes BOS, a special token, the greedy choice.
    forced = dict(model="tiny-coder", prompt=prompt, max_tokens=2, temperature=0)
    forced["logit_bias"] = {str(tok.bos_token_id): 100}
    assert client.completions.create(**forced).choices[0].text == ""
    kept = client.completions.create(**forced, extra_body={"skip_special_tokens": False})
    assert kept.choices[0].text == tok.decode([tok.bos_token_id] * 2, skip_special_tokens=False)
    assert kept.choices[0].text.startswith("<s>")
    # A stop string: cut before it by default, kept with include_stop_str_in_output.
    plain = client.completions.create(
        model="tiny-coder", prompt=prompt, max_tokens=12, temperature=0
    )
    text = plain.choices[0].text
    assert len(text) > 4, "the built-in model ends this prompt at once"
    stop = text[2:4]
    cut = text[: text.index(stop)]
    base = dict(model="tiny-coder", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert client.completions.create(**base).choices[0].text == cut
    both = client.completions.create(**base, extra_body={"include_stop_str_in_output": True})
    assert both.choices[0].text == cut + stop
    assert both.choices[0].finish_reason == "stop"


def test_bad_sampling_values_name_the_field(server):
    cases = [
        ({"logprobs": 21}, "logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"logit_bias": {"3": 101}}, "logit_bias"),
        ({"stop_token_ids": [999999]}, "stop_token_ids"),
        ({"min_tokens": 9, "max_tokens": 2}, "min_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 2}, "min_p"),
    ]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for extra, param in cases:
            response = http.post("/v1/completions", json={"prompt": "x", **extra})
            assert response.status_code == 400, (extra, response.text)
            assert response.json()["error"]["param"] == param
        chat = {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
        response = http.post("/v1/chat/completions", json=chat)
        assert response.json()["error"]["param"] == "top_logprobs"


def test_unknown_fields_are_ignored_logged_and_counted(server, caplog):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        before = scrape(server.url).get("ds_serve:ignored_request_fields_total", 0)
        body = {"prompt": "x", "max_tokens": 1, "store": False, "metadata": {"a": "b"}}
        with caplog.at_level("WARNING", logger="ds_serve.app"):
            assert http.post("/v1/completions", json=body).status_code == 200
        chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "user2": 1}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
        after = scrape(server.url)["ds_serve:ignored_request_fields_total"]
    assert after - before == 3
    assert any("metadata, store" in r.getMessage() for r in caplog.records)


def test_model_retrieve_openapi_docs_version_and_tokenizer_info(server, client):
    assert client.models.retrieve("tiny-coder").id == "tiny-coder"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    assert info.value.body["code"] == "model_not_found"
    with httpx.Client(base_url=server.url, timeout=60) as http:
        doc = http.get("/openapi.json").json()
        assert doc["openapi"].startswith("3.")
        schemas = doc["components"]["schemas"]
        request = schemas["CompletionRequest"]["properties"]
        assert {"logprobs", "echo", "logit_bias", "min_tokens"} <= set(request)
        assert "CompletionLogprobs" in schemas and "ChatTokenLogprob" in schemas
        assert "/v1/models/{model}" in doc["paths"]
        page = http.get("/docs")
        assert page.status_code == 200 and "/openapi.json" in page.text
        assert page.headers["content-type"].startswith("text/html")
        from ds_serve import __version__

        assert http.get("/version").json() == {"version": __version__}
        info = http.get("/tokenizer_info").json()
        assert info["eos_token"] == "</s>" and info["model_max_length"] > 0
        assert info["vocab_size"] > 0 and info["tokenizer_class"]
