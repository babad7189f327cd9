"""Tensor-parallel serving: a model split over two gloo ranks (the server starts the
second) serves the same greedy outputs as ``ds_model.generate``; sizes the model cannot
be split into are refused naming the flag; a rank that dies fails the server with a
503 naming it, within seconds, instead of hanging."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import ds_model
import httpx
import pytest
from ds_serve import create_app
from ds_serve.cli import main
from ds_serve.sampling import SamplingParams
from ds_serve.server import build_engine
from serve_checkpoints import write_checkpoint
from serve_live import LiveServer

from conftest import greedy_reference

PROMPTS = [
    "def fibonacci(n):\n    if n < 2:",
    "class Stack:",
    "import os\n",
    "The quick brown",
    "while True:\n    line = input()",
    "for i in range(10):",
]
MAX_TOKENS = 12
# Starting a worker process (a fresh Python importing torch) on a busy 2-core machine.
FAILURE_SECONDS = 15.0


def llama_config(**overrides) -> ds_model.ModelConfig:
    fields = {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return ds_model.ModelConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory, sp_model_path):
    return write_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny-llama", sp_model_path, config=llama_config()
    )


# ---- sizes the model cannot be split into (ds-model's tests cover the split itself) ---


@pytest.mark.parametrize("size", [3, 8])
def test_create_app_names_the_flag_for_a_size_the_model_cannot_split_into(checkpoint, size):
    with pytest.raises(ValueError, match=rf"--tensor-parallel-size {size}: .*allowed sizes"):
        create_app(checkpoint, num_blocks=8, dtype="float32", tensor_parallel_size=size)


def test_zero_and_unsupported_combinations_are_refused(checkpoint):
    with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1, got 0"):
        create_app(checkpoint, tensor_parallel_size=0)
    with pytest.raises(ValueError, match=r"quantization is not supported with tensor_parallel"):
        create_app(checkpoint, quantization="int8", tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"decode_steps is not supported with tensor_parallel"):
        create_app(checkpoint, decode_steps="compile", tensor_parallel_size=2)


def test_the_cli_names_the_flag(checkpoint, capsys):
    with pytest.raises(SystemExit):
        main([str(checkpoint), "--tensor-parallel-size", "0"])
    assert "--tensor-parallel-size" in capsys.readouterr().err
    assert main([str(checkpoint), "--tensor-parallel-size", "3", "--dtype", "float32"]) == 2
    assert "--tensor-parallel-size 3" in capsys.readouterr().err


# ---- two gloo ranks ------------------------------------------------------------------


async def _served_greedy(engine, prompts: list[list[int]]) -> list[list[int]]:
    """Every prompt submitted at once (one batch of steps), greedy, to MAX_TOKENS."""
    engine.start()
    ids = [engine.submit(p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0)) for p in prompts]

    async def collect(rid):
        return [t async for delta in engine.stream(rid) for t in delta.token_ids]

    return await asyncio.wait_for(asyncio.gather(*(collect(r) for r in ids)), 120)


def test_two_ranks_of_a_llama_model_serve_generate_greedy_outputs(llama_checkpoint):
    reference = ds_model.from_pretrained(llama_checkpoint, dtype="float32")
    tok = reference.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    engine = build_engine(llama_checkpoint, num_blocks=32, dtype="float32", tensor_parallel_size=2)
    try:
        served = asyncio.run(_served_greedy(engine, prompts))
    finally:
        engine.shutdown()
    for prompt, got in zip(prompts, served):
        want = list(ds_model.generate(reference, prompt, max_new_tokens=MAX_TOKENS))
        assert got == want
    assert all(proc.poll() is not None for proc in engine.runner.ranks.workers.values())


def test_two_ranks_of_a_v3_model_serve_http_and_a_killed_rank_gives_503(
    checkpoint, reference_model
):
    app = create_app(checkpoint, num_blocks=64, dtype="float32", tensor_parallel_size=2)
    worker = app.engine.runner.ranks.workers[1]

    async def run(url):
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        url + "/v1/completions",
                        json={"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0},
                    )
                    for p in PROMPTS
                )
            )

    async def killed_in_flight(url):
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"prompt": "x", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
            request = asyncio.create_task(client.post(url + "/v1/completions", json=body))
            await asyncio.sleep(0.5)
            os.kill(worker.pid, signal.SIGKILL)
            start = time.monotonic()
            response = await asyncio.wait_for(request, FAILURE_SECONDS)
            return response, time.monotonic() - start

    with LiveServer(app) as live:
        responses = asyncio.run(run(live.url))
        for prompt, response in zip(PROMPTS, responses):
            assert response.status_code == 200, response.text
            want, _ = greedy_reference(reference_model, prompt, MAX_TOKENS)
            assert response.json()["choices"][0]["text"] == want
        response, waited = asyncio.run(killed_in_flight(live.url))
        assert response.status_code == 200
        assert response.json()["choices"][0]["finish_reason"] == "abort"
        assert waited < FAILURE_SECONDS
        health = httpx.get(live.url + "/health", timeout=10)
        assert health.status_code == 503
        again = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert again.status_code == 503
        assert "tensor-parallel rank 1" in again.json()["error"]["message"]
        assert "signal 9" in again.json()["error"]["message"]


@pytest.mark.slow
def test_two_ranks_behind_an_engine_process_serve_and_report_a_killed_rank(
    checkpoint, reference_model
):
    app = create_app(
        checkpoint, engine_process=True, num_blocks=64, dtype="float32", tensor_parallel_size=2
    )
    engine_pid = app.engine.process.pid
    children = f"/proc/{engine_pid}/task/{engine_pid}/children"
    with open(children) as f:  # the rank-1 worker the engine process started
        (worker,) = (int(pid) for pid in f.read().split())
    with LiveServer(app) as live:
        for prompt in PROMPTS[:3]:
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            response = httpx.post(live.url + "/v1/completions", json=body, timeout=120)
            want, _ = greedy_reference(reference_model, prompt, MAX_TOKENS)
            assert response.json()["choices"][0]["text"] == want
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + FAILURE_SECONDS
        while httpx.get(live.url + "/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "a killed rank was not reported"
            time.sleep(0.2)
        again = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert again.status_code == 503
        assert "tensor-parallel rank 1" in again.json()["error"]["message"]
