"""Shared helpers of the training tests (no tests here): a tiny llama-shaped causal LM
with the ds-model forward contract, generated text data, and a loader for this module
(test modules are imported by path, so they load it with ``support()``)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.input_layernorm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.post_attention_layernorm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        # -1 heads: works when tensor parallelism shards the projections' columns.
        q = self.q_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLM(nn.Module):
    """forward(input_ids (batch, seqlen), attention_mask=None, labels=None) -> .logits
    (batch, seqlen, vocab) and, with labels, .loss (shifted cross-entropy, -100 ignored)."""

    tp_plan = None  # set per instance to shard attention too

    def __init__(self, vocab: int = 259, dim: int = 32, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab)
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, 2 * dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, labels=None):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return SimpleNamespace(logits=logits, loss=loss)


def tiny_lm(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kw)


LLAMA_TINY = {
    "model_type": "llama",
    "vocab_size": 259,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "bos_token_id": 256,
    "eos_token_id": 257,
}


def real_lm(seed: int = 0, **overrides):
    """ds-model's own DeepSeekForCausalLM (llama-shaped), small enough for CPU tests,
    with the byte tokenizer's vocabulary."""
    import ds_model

    return ds_model.from_config({**LLAMA_TINY, **overrides}, seed=seed)


WORDS = "the cat sat on a mat and dog ran to big red ball".split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Short sentences from a 13-word vocabulary with a repeating structure: learnable."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        subject = rng.choice(["the cat", "a dog", "the red ball"])
        out.append(f"{subject} sat on the mat and {subject} ran to the big dog.")
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def support():
    """This module, imported once under a stable name."""
    name = "ds_model_train_support"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models train fastest on one thread, and the CI machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
