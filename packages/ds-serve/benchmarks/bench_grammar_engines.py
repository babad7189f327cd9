"""Per-step token-mask cost of three grammar engines on the built-in model's vocabulary.

Each engine walks the tokens of a valid JSON document for each schema (the document is
encoded with the model's own tokenizer) and computes the mask of allowed tokens before
every token, as a server does once per decode step. Compile time (schema -> grammar,
once per request) is reported separately. Only llguidance is a dependency of ds-serve;
the others are installed by hand for this comparison:

    uv pip install xgrammar outlines-core
    OMP_NUM_THREADS=1 uv run --no-sync python packages/ds-serve/benchmarks/bench_grammar_engines.py
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
from ds_model.tokenizer import load_tokenizer
from ds_serve.structured import token_vocabulary

MODEL = Path(__file__).resolve().parents[3] / "models" / "ds-tiny-coder"

SCHEMAS = {
    "flat object": (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        {"name": "Ada Lovelace", "age": 36},
    ),
    "nested + enum + array": (
        {
            "type": "object",
            "properties": {
                "kind": {"enum": ["file", "dir", "link"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "owner": {
                    "type": "object",
                    "properties": {"uid": {"type": "integer"}, "ok": {"type": "boolean"}},
                    "required": ["uid", "ok"],
                    "additionalProperties": False,
                },
            },
            "required": ["kind", "tags", "owner"],
            "additionalProperties": False,
        },
        {"kind": "dir", "tags": ["src", "tests", "docs"], "owner": {"uid": 1000, "ok": True}},
    ),
    "string pattern": (
        {
            "type": "object",
            "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
            "required": ["date"],
            "additionalProperties": False,
        },
        {"date": "2026-12-06"},
    ),
    "any JSON object": ({"type": "object"}, {"x": [1, 2.5, None, "y"], "z": {"w": False}}),
}


def _tokens(tokenizer, document) -> list[int]:
    return tokenizer.encode(json.dumps(document), add_special_tokens=False)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab):
        import llguidance.torch as lgt
        from ds_serve.structured import GrammarCompiler

        self.lgt = lgt
        self.compiler = GrammarCompiler(tokenizer, vocab_size=vocab.size, eos_ids=vocab.eos_ids)
        self.mask = lgt.allocate_token_bitmask(1, vocab.size)

    def compile(self, schema):
        return self.compiler.json_schema(schema)

    def fill(self, m):
        self.lgt.fill_next_token_bitmask(m.matcher, self.mask)

    def allowed(self, m, token):
        return bool((self.mask[0, token // 32] >> (token % 32)) & 1)

    def accept(self, m, token):
        return m.accept(token)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab):
        import xgrammar as xgr

        self.xgr = xgr
        # xgrammar treats an empty token as special (never allowed inside the grammar).
        encoded = [b"" if i in vocab.special_ids else b for i, b in enumerate(vocab.tokens)]
        info = xgr.TokenizerInfo(
            encoded, xgr.VocabType.RAW, vocab_size=vocab.size, stop_token_ids=list(vocab.eos_ids)
        )
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.mask = xgr.allocate_token_bitmask(1, vocab.size)

    def compile(self, schema):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m):
        m.fill_next_token_bitmask(self.mask, 0)  # packed bits only: the unpacking is not timed

    def allowed(self, m, token):
        return bool((self.mask[0, token // 32] >> (token % 32)) & 1)

    def accept(self, m, token):
        return m.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab):
        import outlines_core as oc

        self.oc = oc
        pieces: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab.tokens):
            if i not in vocab.special_ids and b:
                pieces.setdefault(b, []).append(i)
        eos = vocab.eos_ids[0]
        self.vocabulary = oc.Vocabulary(eos, pieces)
        self.mask = torch.zeros((vocab.size + 31) // 32, dtype=torch.int32)

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocabulary))

    def fill(self, m):
        m.write_mask_into(self.mask.data_ptr(), self.mask.numel(), 4)

    def allowed(self, m, token):
        return bool((self.mask[token // 32] >> (token % 32)) & 1)

    def accept(self, m, token):
        m.advance(token)
        return True


def measure(engine, schema, tokens, repeats: int = 5) -> tuple[float, float]:
    """(median compile ms, median per-step mask us) over ``repeats`` walks of ``tokens``."""
    compile_ms, step_us = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        matcher = engine.compile(schema)
        compile_ms.append((time.perf_counter() - start) * 1e3)
        per_step = []
        for token in tokens:
            start = time.perf_counter()
            engine.fill(matcher)
            per_step.append(time.perf_counter() - start)
            if not engine.allowed(matcher, token):
                raise AssertionError(f"{engine.name} refused token {token} of a valid document")
            engine.accept(matcher, token)
        step_us.append(statistics.median(per_step) * 1e6)
    return statistics.median(compile_ms), statistics.median(step_us)


def main() -> None:
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(MODEL)
    vocab = token_vocabulary(tokenizer)
    engines = []
    for cls in (LLGuidance, XGrammar, OutlinesCore):
        try:
            engines.append(cls(tokenizer, vocab))
        except ImportError as exc:
            print(f"skipping {cls.name}: {exc}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"vocabulary: {vocab.size} tokens ({MODEL.name})\n")
    print("| schema | tokens | engine | compile ms | mask per step µs |")
    print("| --- | ---: | --- | ---: | ---: |")
    for label, (schema, document) in SCHEMAS.items():
        tokens = _tokens(tokenizer, document)
        for engine in engines:
            try:
                compile_ms, step_us = measure(engine, schema, tokens)
                print(
                    f"| {label} | {len(tokens)} | {engine.name} | {compile_ms:.1f} | {step_us:.1f} |"
                )
            except Exception as exc:  # an engine that cannot handle a schema is a result too
                print(f"| {label} | {len(tokens)} | {engine.name} | failed: {exc} | |")


if __name__ == "__main__":
    main()
