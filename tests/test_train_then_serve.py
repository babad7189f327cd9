"""Train, then serve, in the commands the README names: `deepseek-train` fine-tunes the
shipped model (models/ds-tiny-coder) for two steps, `ds-serve OUTPUT_DIR` serves what it
wrote to the OpenAI client, with the greedy output ds-model computes for the same files:
a LoRA run (base + adapter), a full fine-tune (its checkpoint-N), and a quantized save of
that fine-tune made with `ds-model quantize`.

Both commands run in this process through their ``main(argv)`` (one import of torch for
all of them); ``App.run`` is swapped for a server on a background thread so that the test
can talk to it and stop it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import ds_model
import openai
import pytest
import torch
from ds_model.training.cli import main as train_main
from ds_serve.app import App
from ds_serve.cli import main as serve_main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "ds-tiny-coder"
PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, x):"]
MAX_TOKENS = 8
TRAIN = ["--max_steps", "2", "--seq_len", "32", "--batch_size", "2", "--no_progress"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes on a shared machine: threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = [
        json.dumps({"text": f"def add_{i}(a, b):\n    return a + b + {i}\n"}) for i in range(16)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full-run"
    argv = ["--model", str(MODEL), "--data", str(data), "--output", str(out), *TRAIN]
    assert train_main([*argv, "--learning_rate", "1e-3"]) == 0
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ds_serve(*args: str):
    """`ds-serve ARGS --port P`, its server on a thread; yields an OpenAI client."""
    started: list = []

    def run_in_background(self, host, port, *, shutdown_grace=30.0, **options):
        server = self.make_server(host, port, shutdown_grace=shutdown_grace, **options)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread))

    port = free_port()
    original, App.run = App.run, run_in_background
    try:
        assert serve_main([*args, "--port", str(port), "--log-level", "warning"]) == 0
    finally:
        App.run = original
    server, thread = started[0]
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "ds-serve did not start"
            time.sleep(0.05)
        yield openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120
        )
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def served(client) -> list[str]:
    [card] = client.models.list().data
    return [
        client.completions.create(
            model=card.id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        .choices[0]
        .text
        for prompt in PROMPTS
    ]


def greedy(model) -> list[str]:
    """What the server must answer: ds-model's greedy tokens, decoded in the prompt's context."""
    tok, out = model.tokenizer, []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        new = list(model.generate(ids, max_new_tokens=MAX_TOKENS))
        if new and new[-1] in {*model.config.eos_token_ids, tok.eos_token_id}:
            new = new[:-1]
        out.append(tok.decode(ids + new)[len(tok.decode(ids)) :])
    return out


def test_a_lora_run_serves_the_shipped_model_with_its_adapter(tmp_path, data):
    out = tmp_path / "lora-run"
    argv = ["--model", str(MODEL), "--data", str(data), "--output", str(out), *TRAIN]
    assert train_main([*argv, "--lora_rank", "4", "--learning_rate", "5e-2"]) == 0
    adapter = out / "checkpoint-2"
    with ds_serve(str(out)) as client:
        got = served(client)
    tuned = ds_model.from_pretrained(MODEL, dtype="float32", adapter=adapter)
    assert got == greedy(tuned)
    assert got != greedy(ds_model.from_pretrained(MODEL, dtype="float32"))


def test_a_full_fine_tune_serves_its_checkpoint(full_run):
    with ds_serve(str(full_run)) as client:
        got = served(client)
    assert got == greedy(ds_model.from_pretrained(full_run / "checkpoint-2", dtype="float32"))


def test_a_quantized_save_of_the_fine_tune_serves_as_saved(full_run, tmp_path, capsys):
    from ds_model.cli import main as model_main

    quantized = tmp_path / "tuned-int4"
    source = str(full_run / "checkpoint-2")
    assert model_main(["quantize", source, str(quantized), "--method", "int4"]) == 0
    saved = ds_model.from_pretrained(quantized, dtype="float32")
    assert type(saved.model.layers[0].self_attn.o_proj).__name__ == "Int4WeightOnlyLinear"
    with ds_serve(str(quantized)) as client:
        got = served(client)
    assert got == greedy(saved)
    capsys.readouterr()
    assert serve_main([str(quantized), "--quantization", "int8"]) == 2
    assert "quantization='int8' conflicts with" in capsys.readouterr().err
