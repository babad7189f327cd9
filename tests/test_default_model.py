"""The model the repo ships (models/ds-tiny-coder) is sound and `ds-serve` serves it.

A broken checkpoint or tokenizer cannot land: the held-out loss on a sample of
standard-library files the model never trained on must stay near what the recipe
measured, and the server started exactly as the README says must answer the OpenAI
client with text made of the shipped tokenizer's tokens.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ds_model
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "ds-tiny-coder"
sys.path.insert(0, str(MODEL / "recipe"))
import evaluate_model  # noqa: E402  (the recipe's scorer and ds-serve launcher)

# The recipe measured 2.6757 nats/token on this sample (models/ds-tiny-coder/README.md);
# a few percent of slack absorbs kernel and thread-count differences, not damage.
HELDOUT_LOSS_LIMIT = 2.80


def test_shipped_model_fits_the_repo_budget():
    size = sum(p.stat().st_size for p in MODEL.iterdir() if p.is_file())
    assert size <= 25 * 1024 * 1024, f"models/ds-tiny-coder is {size / 2**20:.1f} MiB > 25 MiB"


def test_heldout_loss_is_below_the_recipe_threshold():
    model = ds_model.from_pretrained(MODEL, dtype=torch.float32)
    tokenizer = ds_model.load_tokenizer(MODEL)
    lines = (MODEL / "heldout-sample.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines if line]
    loss, _, _ = evaluate_model.heldout_bits_per_byte(model, tokenizer, texts)
    assert loss < HELDOUT_LOSS_LIMIT, f"held-out loss {loss:.4f} >= {HELDOUT_LOSS_LIMIT}"


@pytest.fixture
def readme_server():
    """`ds-serve` with no model argument, from the repository root, as the README runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DS_SERVE_DEFAULT_MODEL", None)
    with evaluate_model.running_server([], cwd=ROOT, env=env) as base:
        yield base


def test_ds_serve_serves_the_shipped_model_to_the_openai_client(readme_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{readme_server}/v1", api_key="unused", timeout=60)
    [model] = client.models.list().data
    completion = client.completions.create(
        model=model.id, prompt="def fibonacci(n):", max_tokens=24, temperature=0
    )
    text = completion.choices[0].text
    assert text.strip(), "the shipped model answered with empty text"
    assert completion.usage.completion_tokens > 0
    tokenizer = ds_model.load_tokenizer(MODEL)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_ds_model_generate_without_a_path_completes_with_the_shipped_model(monkeypatch, capsys):
    """`uv run ds-model generate "def fibonacci(n):"` as the README runs it (in-process)."""
    from ds_model.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("DS_DEFAULT_MODEL", raising=False)
    assert main(["generate", "def fibonacci(n):", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    # On a CPU the command runs the bf16 checkpoint in float32 (dtype auto).
    shipped = ds_model.from_pretrained(MODEL, dtype=torch.float32)
    assert printed.strip() and printed == shipped.generate("def fibonacci(n):", 12) + "\n"


SHIPPED_TEXT_FRAGMENTS = [
    " ",
    "   ",
    "    ",
    "\t",
    "\t\t",
    "\n",
    "\n\n",
    "\r\n",
    "def ",
    "class ",
    "return ",
    "self.",
    "(x, y):",
    "# comment",
    '"""doc"""',
    "<s>",
    "</s>",
    "<unk>",
    "12345",
    "0xFF",
    "ünïcödé",
    "日本語",
    "😀",
    "\x00",
    "\u3000",
]


@settings(max_examples=100, deadline=None)
@given(
    text=st.lists(
        st.one_of(st.sampled_from(SHIPPED_TEXT_FRAGMENTS), st.text(max_size=8)), max_size=30
    ).map("".join)
)
def test_shipped_tokenizer_loads_in_transformers_autotokenizer_with_identical_ids(text):
    """transformers.AutoTokenizer (offline) encodes every text to the ids of the shipped
    SentencePiece model and of ds-model's tokenizer, and decodes them to the same text."""
    import sentencepiece

    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    theirs = _auto_tokenizer(transformers)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(MODEL / "tokenizer.model"))
    ours = _auto_tokenizer(ds_model)
    expected = reference.encode(text)
    assert theirs(text, add_special_tokens=False)["input_ids"] == expected
    assert theirs(text)["input_ids"] == [reference.bos_id(), *expected] == ours.encode(text)
    assert theirs.decode(expected) == reference.decode(expected) == ours.decode(expected)
    if "\u2581" not in text:  # SentencePiece's space mark reads back as a space
        assert theirs.decode(expected) == text


_TOKENIZERS = {}


def _auto_tokenizer(library):
    """The shipped tokenizer loaded once per library (transformers or ds_model)."""
    if library.__name__ not in _TOKENIZERS:
        load = getattr(library, "AutoTokenizer", None)
        load = load.from_pretrained if load is not None else library.load_tokenizer
        _TOKENIZERS[library.__name__] = load(str(MODEL))
    return _TOKENIZERS[library.__name__]


def test_function_completion_score_in_the_model_card_reproduces():
    """pass@1 of the card's function-completion problems, scored through ds-serve by the
    recipe's evaluate_model.py, equals the figure the card states."""
    import re

    card = (MODEL / "README.md").read_text()
    match = re.search(r"pass@1 greedy through `ds-serve` \| \*\*(\d+)/(\d+)\*\*", card)
    assert match, "the model card states no pass@1 figure"
    results = evaluate_model.pass_at_1(MODEL)
    assert len(results) == int(match.group(2))
    assert sum(r["passed"] for r in results) == int(match.group(1)), [
        r["name"] for r in results if r["passed"]
    ]
