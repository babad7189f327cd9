"""Grammar-constrained decoding with llguidance: the token vocabulary as bytes, one
grammar matcher per request, and the per-step mask applied to the logits.

A request with ``response_format`` json_object / json_schema, or tools called with
``tool_choice`` required / a named function, carries a ``Grammar``. Every decode step
the engine fills the allowed-token bitmask of each constrained row (one native
llguidance call per row, no Python loop over the vocabulary), unpacks them to a
boolean (rows, vocab) tensor with one vectorised shift, and sets the logits of
disallowed tokens to -inf before sampling. The sampled token then advances the
request's matcher; when the grammar admits nothing more the request finishes.

The engine choice (llguidance over xgrammar and outlines-core) and its measurements are
in docs/ds-serve.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Grammar",
    "GrammarCompiler",
    "GrammarError",
    "GrammarSpec",
    "TokenVocabulary",
    "token_vocabulary",
]

# Compact JSON with OpenAI's separators. Fixed whitespace keeps every output short and
# bounded: with flexible whitespace a small model can emit spaces and newlines forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_BITS = torch.arange(32, dtype=torch.int32)


class GrammarError(ValueError):
    """A schema or grammar the engine cannot compile (the request gets a 400)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to: ``kind`` "json_schema" (``source`` the
    schema), "json_object" or "lark" (``source`` the grammar). ``param`` names the request
    field it came from, for the 400 a grammar that does not compile gets."""

    kind: str
    source: Any = None
    strict: bool = False
    param: str = "response_format"


@dataclass(frozen=True)
class TokenVocabulary:
    """The bytes each token id stands for in generated text, and which ids are special
    (control tokens such as BOS/EOS, never part of constrained text)."""

    tokens: list[bytes]
    special_ids: frozenset[int]
    eos_ids: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.tokens)


def _sentencepiece_bytes(sp: Any, i: int) -> bytes:
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):  # byte-fallback piece <0xNN>
        return bytes([int(piece[3:-1], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def token_vocabulary(tokenizer: Any, eos_ids: tuple[int, ...] = ()) -> TokenVocabulary:
    """The vocabulary of a ds-model SentencePiece tokenizer as bytes: ``▁`` is a space,
    ``<0xNN>`` is the byte NN, control and unknown pieces are special."""
    if getattr(tokenizer, "kind", None) != "sentencepiece":
        raise TypeError(
            f"token_vocabulary reads SentencePiece tokenizers, got kind="
            f"{getattr(tokenizer, 'kind', None)!r} (tokenizer.json is read by llguidance itself)"
        )
    sp = tokenizer._backend
    n = sp.get_piece_size()
    special = frozenset(i for i in range(n) if sp.is_control(i) or sp.is_unknown(i))
    tokens = [
        sp.id_to_piece(i).encode() if i in special else _sentencepiece_bytes(sp, i)
        for i in range(n)
    ]
    eos = tuple(eos_ids) or (
        (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    )
    return TokenVocabulary(tokens, special, eos)


class _SentencePieceForLLG:
    """What llguidance's ``TokenizerWrapper`` reads: token bytes, special ids, EOS/BOS and a
    ``__call__`` that tokenizes bytes to ids whose bytes concatenate to exactly the input."""

    def __init__(self, tokenizer: Any, vocab: TokenVocabulary) -> None:
        self._tokenizer = tokenizer
        self._sp = tokenizer._backend
        self.tokens = vocab.tokens
        self.special_token_ids = sorted(vocab.special_ids)
        self.eos_token_id = vocab.eos_ids[0]
        self.bos_token_id = tokenizer.bos_token_id
        self._dummy_prefix = self._spell(self._sp.encode("a")) == b" a"

    def _spell(self, ids: list[int]) -> bytes:
        return b"".join(self.tokens[i] for i in ids)

    def __call__(self, data: bytes | str) -> list[int]:
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
        ids = self._sp.encode(text)
        # A model trained with a dummy prefix encodes "x" as "▁x": spell the first piece
        # without its added space, in byte-fallback pieces.
        if self._dummy_prefix and ids and self.tokens[ids[0]].startswith(b" "):
            head = self.tokens[ids[0]][1:]
            ids = [*(self._sp.piece_to_id(f"<0x{b:02X}>") for b in head), *ids[1:]]
        return ids


class GrammarCompiler:
    """Compiles request grammars against one model's vocabulary (built once per server).

    ``tokenizer`` is ds-model's ``Tokenizer``: SentencePiece vocabularies are converted
    with ``token_vocabulary``; a ``tokenizer.json`` is handed to llguidance as it is.
    ``vocab_size`` is the width of the model's logits (ids at or above the tokenizer's
    vocabulary are never allowed under a grammar).
    """

    def __init__(self, tokenizer: Any, *, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        # Not llguidance.torch: importing it sets up torch.compile (~18 s on the EPYC-512
        # host, 2026-12-06).
        import llguidance

        self._llg = llguidance
        self.vocab_size = vocab_size
        if getattr(tokenizer, "kind", None) == "sentencepiece":
            vocab = token_vocabulary(tokenizer, eos_ids)
            wrapper = llguidance.TokenizerWrapper(_SentencePieceForLLG(tokenizer, vocab))
            self.tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=vocab.size)
        elif getattr(tokenizer, "kind", None) == "hf":
            self.tokenizer = llguidance.LLTokenizer(
                tokenizer._backend.to_str(), eos_token=list(eos_ids)
            )
        else:
            raise TypeError(f"no grammar support for tokenizer {tokenizer!r}")
        self.eos_ids = torch.tensor(eos_ids, dtype=torch.long)

    # -- grammars ------------------------------------------------------------------------

    def compile(self, spec: GrammarSpec) -> Grammar:
        if spec.kind == "json_schema":
            return self.json_schema(spec.source, strict=spec.strict)
        if spec.kind == "json_object":
            return self.json_object()
        if spec.kind == "lark":
            return self.lark(spec.source)
        raise ValueError(
            f"GrammarSpec.kind must be json_schema, json_object or lark, got {spec.kind!r}"
        )

    def json_schema(self, schema: dict[str, Any], *, strict: bool = False) -> Grammar:
        """The grammar of JSON documents valid under ``schema``. Without ``strict`` a schema
        feature the engine does not implement (``contains``, an unknown ``format``) is
        ignored, OpenAI's best effort; with ``strict`` it is an error."""
        options = {**JSON_OPTIONS, "lenient": not strict, **schema.get("x-guidance", {})}
        schema = {**schema, "x-guidance": options}
        return self._compile("json_schema", json.dumps(schema), strict)

    def json_object(self) -> Grammar:
        return self.json_schema({"type": "object"})

    def lark(self, grammar: str) -> Grammar:
        return self._compile("lark", grammar, strict=True)

    def _compile(self, kind: str, source: str, strict: bool) -> Grammar:
        try:
            grammar = self._llg.grammar_from(kind, source)
            is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(
                grammar, self.tokenizer
            )
        except (ValueError, TypeError, RuntimeError) as exc:
            raise GrammarError(str(exc)) from exc
        if is_error or (strict and messages):
            raise GrammarError("; ".join(messages) or "the grammar is invalid")
        return Grammar(self._llg.LLMatcher(self.tokenizer, grammar, log_level=0))

    # -- per step ------------------------------------------------------------------------

    def allowed(self, grammars: list[Grammar]) -> torch.Tensor:
        """(len(grammars), vocab_size) bool: the tokens each grammar allows next."""
        words = (self.tokenizer.vocab_size + 31) // 32
        bitmask = torch.empty((len(grammars), words), dtype=torch.int32)
        # One native call per row on this thread, not llguidance's thread pool: a pool's
        # worker threads wait spinning and take CPU from the model step (measured on the
        # 2-core EPYC-512 host, 2026-12-06: 8 rows 1.37 ms per step with the pool, 1.31
        # ms without; 32 rows 4.9 ms with, 3.1 ms without).
        for i, grammar in enumerate(grammars):
            grammar.matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), words * 4)
        bits = ((bitmask.unsqueeze(-1) >> _BITS) & 1).bool().flatten(1)
        allowed = torch.zeros((len(grammars), self.vocab_size), dtype=torch.bool)
        width = min(self.vocab_size, self.tokenizer.vocab_size)
        allowed[:, :width] = bits[:, :width]
        # A grammar in an error state allows nothing: let it end the sequence instead.
        dead = (~allowed.any(dim=-1)).nonzero().flatten()
        if len(dead):
            allowed[dead.unsqueeze(1), self.eos_ids] = True
        return allowed


class Grammar:
    """One request's grammar state: advanced by each sampled token."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def fork(self) -> Grammar:
        """A copy in the same state (each choice of a request advances its own)."""
        return Grammar(self.matcher.deep_copy())

    def accept(self, token: int) -> bool:
        """Advance by ``token``; False if the grammar did not allow it."""
        return bool(self.matcher.consume_token(token)) and not self.matcher.is_error()

    @property
    def terminated(self) -> bool:
        """Nothing but the end of the sequence can follow."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None
