"""Fixtures: a tiny SentencePiece tokenizer trained here (no downloads)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

# The tiny test models are far faster on one thread, and on a shared 2-core machine
# several torch threads per process spin against each other (measured: ~70x slower).
torch.set_num_threads(1)

# The helpers next to this file (serve_checkpoints.py, serve_live.py) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

# A few KB of code and prose, with multi-byte text so byte-fallback pieces occur.
CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):",
    "for i in range(10):\n    print(i, i * i)  # squares",
    "import os\nimport sys\nprint(sys.argv, os.getcwd())",
    "The quick brown fox jumps over the lazy dog. Stop here. END of text.",
    "深度求索 的 模型 可以 写 代码。 你好，世界！ café naïve résumé",
    "while True:\n    line = input()\n    if not line:\n        break",
    "return {'key': [1, 2, 3], 'value': None}",
] * 20


def train_tokenizer(directory: Path, vocab_size: int = 512) -> Path:
    """Trains a byte-fallback BPE SentencePiece model into ``directory/tokenizer.model``."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        remove_extra_whitespaces=False,
        minloglevel=2,
        num_threads=1,
    )
    path = directory / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def sp(sp_model_path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(sp_model_path))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, sp_model_path) -> Path:
    from serve_checkpoints import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-coder", sp_model_path)


@pytest.fixture(scope="session")
def reference_model(checkpoint):
    """The same checkpoint loaded for ``ds_model.generate`` (fp32): the parity reference."""
    import ds_model

    return ds_model.from_pretrained(checkpoint, dtype="float32")


def greedy_reference(model, prompt: str, max_tokens: int) -> tuple[str, str]:
    """(text, finish_reason) that ``ds_model.generate`` produces greedily for ``prompt``,
    decoded in the prompt's context as a streaming server must."""
    import ds_model

    tok = model.tokenizer
    prompt_ids = tok.encode(prompt)
    out = list(ds_model.generate(model, prompt_ids, max_new_tokens=max_tokens))
    eos = {*model.config.eos_token_ids, tok.eos_token_id}
    reason = "length"
    if out and out[-1] in eos:
        out, reason = out[:-1], "stop"
    head = tok.decode(prompt_ids)
    return tok.decode(prompt_ids + out)[len(head) :], reason


def forbid_eos(engine) -> None:
    """Make the served model unable to sample EOS, so a test's requests run to max_tokens
    (a random model can end any request early otherwise)."""
    step = engine.runner.step
    eos = list(engine.eos_token_ids)

    def step_without_eos(*args, **kwargs):
        out = step(*args, **kwargs)
        logits, rest = out if isinstance(out, tuple) else (out, None)
        logits = logits.clone()  # an inference tensor: copy to edit
        logits[:, eos] = float("-inf")
        return logits if rest is None else (logits, rest)

    engine.runner.step = step_without_eos
