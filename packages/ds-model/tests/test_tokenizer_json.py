"""SentencePiece tokenizers written by ds-model come with a tokenizer.json that
transformers.AutoTokenizer loads offline and that gives the same ids and text."""

from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path

import ds_model
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sentencepiece = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n\tdef __init__(self):\n\t\tself.items = []\n",
    "for i in range(10):\n        print(i, 'ünïcödé', 3.14159)\n",
    "    x = {'key': [1, 2, 3]}  # a comment\n\n\n",
] * 20

FRAGMENTS = [
    " ",
    "  ",
    "    ",
    "\t",
    "\n",
    "\r\n",
    "def ",
    "return",
    "self.",
    "):",
    "<s>",
    "</s>",
    "<unk>",
    "<pad>",
    "123",
    "ünï",
    "☃",
    "😀",
    "\x00",
    "▁",
    "    return x\n",
]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=24).map(
    "".join
)


def recipe_sentencepiece(vocab_size: int = 320, **overrides) -> bytes:
    """A BPE model trained with the settings the ds-tiny-coder recipe uses."""
    model = io.BytesIO()
    options = dict(
        vocab_size=vocab_size,
        model_type="bpe",
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "\t"],
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        pad_id=0,
        unk_id=3,
        minloglevel=2,
    )
    options.update(overrides)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, **options
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    source.write_bytes(recipe_sentencepiece())
    out = tmp_path_factory.mktemp("saved")
    ds_model.load_tokenizer(source).save_pretrained(out)
    return out


def auto_tokenizer(path: Path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    return transformers.AutoTokenizer.from_pretrained(str(path))


def test_save_writes_files_transformers_loads(saved: Path) -> None:
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert hasattr(transformers, config["tokenizer_class"])
    assert (saved / "tokenizer.json").is_file() and (saved / "tokenizer.model").is_file()
    assert auto_tokenizer(saved).bos_token_id == 1


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_autotokenizer_matches_sentencepiece_ids_and_decode(saved: Path, text: str) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(saved / "tokenizer.model"))
    ours = ds_model.load_tokenizer(saved)  # reads tokenizer.json now
    theirs = auto_tokenizer(saved)
    expected = sp.encode(text)
    assert theirs(text, add_special_tokens=False)["input_ids"] == expected
    assert ours.encode(text, add_special_tokens=False) == expected
    assert theirs(text)["input_ids"] == [1, *expected] == ours.encode(text)
    decoded = sp.decode(expected)
    assert theirs.decode(expected) == decoded == ours.decode(expected)
    assert theirs.decode([1, *expected], skip_special_tokens=True) == decoded


def test_deepseek_train_checkpoint_has_transformers_tokenizer(tmp_path: Path) -> None:
    from ds_model.training import cli

    source = tmp_path / "tokenizer.model"
    source.write_bytes(recipe_sentencepiece())
    model = S.real_lm(vocab_size=320, bos_token_id=1, eos_token_id=2)
    model.tokenizer = ds_model.load_tokenizer(source)
    model.save_pretrained(tmp_path / "base")
    data = S.write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in CORPUS[:8]])
    out = tmp_path / "out"
    cli.main(
        ["--model", str(tmp_path / "base"), "--dataset", str(data), "--output", str(out),
         "--max_steps", "1", "--batch_size", "2", "--seq_len", "16"]
    )  # fmt: skip
    saved = [p.parent for p in out.rglob("tokenizer.json")]
    assert saved, "deepseek-train wrote no tokenizer.json"
    for path in saved:
        text = "def f(x):\n\treturn  x + 1  # ünï\n"
        ids = ds_model.load_tokenizer(path).encode(text)
        assert auto_tokenizer(path)(text)["input_ids"] == ids


def test_unsupported_sentencepiece_settings_are_named() -> None:
    from ds_model.sentencepiece_json import sentencepiece_to_tokenizer_json

    with pytest.raises(ValueError, match="add_dummy_prefix"):
        sentencepiece_to_tokenizer_json(recipe_sentencepiece(add_dummy_prefix=True))
    with pytest.raises(ValueError, match="model_type"):
        sentencepiece_to_tokenizer_json(recipe_sentencepiece(model_type="unigram"))
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        sentencepiece_to_tokenizer_json(b"")
