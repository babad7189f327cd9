"""The grammar engine over ds-model's SentencePiece vocabulary, and tool-call parsing."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from ds_model.sampling import SamplingParams, sample
from ds_model.tokenizer import load_tokenizer
from ds_serve.api import FunctionDefinition, Tool
from ds_serve.default_model import find_default_model
from ds_serve.structured import GrammarCompiler, GrammarError, token_vocabulary
from ds_serve.tools import DEEPSEEK_TOKENS, ToolCallParser, ToolFormat, call_grammar, tool_format
from hypothesis import given, settings
from hypothesis import strategies as st

TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40
) | st.sampled_from(['{"a": [1, 2]}', "  def f(x):\n\treturn x", "深度求索 café 🙂", "\x00\x7f"])


@pytest.fixture(scope="module")
def builtin_tokenizer():
    # The SentencePiece model itself: the served checkpoint also ships a tokenizer.json
    # (same ids), which llguidance reads on its own.
    return load_tokenizer(Path(find_default_model(__file__)) / "tokenizer.model")


@pytest.fixture(scope="module")
def compiler(builtin_tokenizer):
    return GrammarCompiler(builtin_tokenizer, vocab_size=8192, eos_ids=(2,))


@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_token_bytes_concatenate_to_the_encoded_text(builtin_tokenizer, text):
    """What the grammar engine believes each token is, is what decoding produces: the
    bytes of encode(text) are exactly text's bytes (pieces, ▁ spaces, <0xNN> bytes)."""
    vocab = token_vocabulary(builtin_tokenizer)
    ids = builtin_tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(vocab.tokens[i] for i in ids) == text.encode("utf-8")


def test_vocabulary_marks_control_tokens_special(builtin_tokenizer):
    vocab = token_vocabulary(builtin_tokenizer)
    assert vocab.size == 8192
    assert {0, 1, 2, 3} <= vocab.special_ids  # <pad> <s> </s> <unk>
    assert vocab.tokens[builtin_tokenizer.token_to_id("<0x41>")] == b"A"
    assert vocab.eos_ids == (2,)


@settings(max_examples=30, deadline=None)
@given(text=TEXT)
def test_dummy_prefix_tokenizer_is_wrapped_without_the_added_space(sp_model_path, text):
    """A SentencePiece model trained with a dummy prefix encodes "x" as "▁x"; the
    tokenizer handed to the grammar engine must still spell exactly the input."""
    from ds_serve.structured import _SentencePieceForLLG

    tokenizer = load_tokenizer(sp_model_path)
    vocab = token_vocabulary(tokenizer)
    wrapped = _SentencePieceForLLG(tokenizer, vocab)
    ids = wrapped(text.encode("utf-8"))
    assert b"".join(vocab.tokens[i] for i in ids) == text.encode("utf-8")


def _walk(compiler, grammar, text, tokenizer):
    for token in tokenizer.encode(text, add_special_tokens=False):
        allowed = compiler.allowed([grammar])[0]
        if not allowed[token]:
            return False
        assert grammar.accept(token)
    return True


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


def test_schema_grammar_accepts_valid_and_refuses_invalid_documents(compiler, builtin_tokenizer):
    good = compiler.json_schema(SCHEMA)
    assert _walk(compiler, good, '{"city": "Paris", "days": 3}', builtin_tokenizer)
    assert good.terminated  # nothing may follow a complete document
    assert compiler.allowed([good])[0].nonzero().flatten().tolist() == [2]  # only EOS
    for bad in ['{"city": 3', '{"days": 3}', '{"city": "Paris", "days": 3, "x": 1}']:
        assert not _walk(compiler, compiler.json_schema(SCHEMA), bad, builtin_tokenizer)


def test_masks_of_a_batch_are_per_row(compiler, builtin_tokenizer):
    """Rows get their own grammar's mask, and the sampler picks only allowed tokens."""
    a, b = compiler.json_schema(SCHEMA), compiler.json_schema({"enum": ["yes", "no"]})
    allowed = compiler.allowed([a, b])
    assert allowed.shape == (2, 8192)
    # Forced bytes get their canonical token: '{"' starts the object, '"' the enum.
    brace, quote = builtin_tokenizer.token_to_id('{"'), builtin_tokenizer.token_to_id('"')
    assert allowed[0, brace] and not allowed[1, brace]
    assert allowed[1, quote] and not allowed[0, quote]
    logits = torch.randn(2, 8192)
    greedy = [SamplingParams(temperature=0.0)] * 2
    picked = sample(logits, greedy, allowed=allowed).token_ids.tolist()
    assert allowed[0, picked[0]] and allowed[1, picked[1]]
    assert picked[0] == logits[0].masked_fill(~allowed[0], float("-inf")).argmax().item()


def test_strict_refuses_what_lenient_ignores(compiler):
    schema = {"type": "string", "format": "no-such-format"}
    compiler.json_schema(schema)  # best effort: the unknown format is ignored
    with pytest.raises(GrammarError, match="no-such-format"):
        compiler.json_schema(schema, strict=True)
    with pytest.raises(GrammarError):
        compiler.json_schema({"type": "nonsense"})


TOOLS = [
    Tool(function=FunctionDefinition(name="get_weather", parameters=SCHEMA)),
    Tool(function=FunctionDefinition(name="now")),
]
JSON_FORMAT = ToolFormat("json", {})


def test_call_grammar_admits_only_calls_to_offered_functions(compiler, builtin_tokenizer):
    grammar = call_grammar(TOOLS, JSON_FORMAT, parallel=False)
    call = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>'
    )
    g = compiler.lark(grammar)
    assert _walk(compiler, g, call, builtin_tokenizer) and g.terminated
    assert _walk(
        compiler,
        compiler.lark(grammar),
        '<tool_call>{"name": "now", "arguments": {}}',
        builtin_tokenizer,
    )
    assert not _walk(
        compiler, compiler.lark(grammar), '<tool_call>{"name": "rm", ', builtin_tokenizer
    )
    assert not _walk(compiler, compiler.lark(grammar), "Sure! <tool_call>", builtin_tokenizer)


CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>'


@settings(max_examples=80, deadline=None)
@given(
    before=st.sampled_from(["", "Let me check. ", "<tool", "a < b "]),
    calls=st.integers(0, 3),
    bad=st.booleans(),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_parser_splits_content_and_calls_wherever_the_text_is_cut(before, calls, bad, cuts):
    """Streaming cuts the text anywhere: the parser's content and calls are the same as
    for the whole text, and text that is not a call to an offered tool stays content."""
    bad_call = '<tool_call>{"name": "rm", "arguments": {}}</tool_call>' if bad else ""
    text = before + bad_call + CALL * calls
    parser = ToolCallParser(JSON_FORMAT, {"get_weather", "now"})
    content, found = [], []
    bounds = sorted({0, len(text), *[c for c in cuts if c < len(text)]})
    for start, end in itertools.pairwise(bounds):
        piece, new = parser.push(text[start:end])
        content.append(piece)
        found += new
    content.append(parser.flush())
    assert "".join(content) == before + bad_call
    assert [c.function.name for c in found] == ["get_weather"] * calls
    assert all(json.loads(c.function.arguments) == {"city": "Oslo", "days": 2} for c in found)
    assert len({c.id for c in found}) == calls


def test_deepseek_calls_parse_from_their_special_tokens():
    fmt = ToolFormat("deepseek", {})
    text = (
        "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Oslo", "days": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    )
    content, calls = ToolCallParser(fmt, {"get_weather"}).push(text)
    assert content == "Checking."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "days": 2})
    ]


# ---- DeepSeek-V3's tool-call tokens ----------------------------------------------------

DEEPSEEK_SPECIALS = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    *DEEPSEEK_TOKENS.values(),
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
]
# DeepSeek-V3's template, reduced to the parts that render messages and tool calls.
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' and m.get('tool_calls') %}<｜Assistant｜>"
    "<｜tool▁calls▁begin｜>{% for c in m['tool_calls'] %}<｜tool▁call▁begin｜>{{ c['type'] }}"
    "<｜tool▁sep｜>{{ c['function']['name'] }}\n```json\n{{ c['function']['arguments'] }}"
    "\n```<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'tool' %}<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>"
    "{{ m['content'] }}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


@pytest.fixture(scope="module")
def deepseek_tokenizer():
    """A byte-level BPE tokenizer.json (DeepSeek-V3's kind) with its special tokens."""
    from ds_model.tokenizer import Tokenizer
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=DEEPSEEK_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(['{"city": "Oslo", "days": 2}\n```json\nfunction'] * 50, trainer)
    config = {
        "bos_token": DEEPSEEK_SPECIALS[0],
        "eos_token": DEEPSEEK_SPECIALS[1],
        "chat_template": DEEPSEEK_TEMPLATE,
    }
    return Tokenizer(backend, "hf", config, None)


DEEPSEEK_CALL = (
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
    '{"city": "Oslo", "days": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
)


def test_deepseek_format_renders_calls_and_results_through_the_template(deepseek_tokenizer):
    from ds_serve.api import ChatMessage, FunctionCall, ToolCall
    from ds_serve.validation import chat_prompt

    fmt = tool_format(deepseek_tokenizer)
    assert fmt.kind == "deepseek"
    messages = [
        ChatMessage(role="user", content="Weather in Oslo?"),
        ChatMessage(
            role="assistant",
            tool_calls=[
                ToolCall(
                    id="call_1", function=FunctionCall("get_weather", '{"city": "Oslo", "days": 2}')
                )
            ],
        ),
        ChatMessage(role="tool", tool_call_id="call_1", content="21 C"),
    ]
    ids = chat_prompt(messages, deepseek_tokenizer, True, TOOLS, True)
    text = deepseek_tokenizer.decode(ids, skip_special_tokens=False)
    assert DEEPSEEK_CALL in text
    assert "<｜tool▁output▁begin｜>21 C<｜tool▁output▁end｜>" in text
    assert text.endswith("<｜Assistant｜>")
    content, calls = ToolCallParser(fmt, {"get_weather"}).push(text.split("<｜Assistant｜>")[1])
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "days": 2})
    ]
    assert "get_weather" not in content and "tool▁calls" not in content


def test_deepseek_call_grammar_walks_the_special_tokens(deepseek_tokenizer):
    fmt = tool_format(deepseek_tokenizer)
    eos = deepseek_tokenizer.eos_token_id
    compiler = GrammarCompiler(
        deepseek_tokenizer, vocab_size=deepseek_tokenizer.vocab_size, eos_ids=(eos,)
    )
    grammar = compiler.lark(call_grammar(TOOLS, fmt, parallel=False))
    assert _walk(compiler, grammar, DEEPSEEK_CALL, deepseek_tokenizer)
    assert grammar.terminated
    plain = compiler.lark(call_grammar(TOOLS, fmt, parallel=False))
    # The call must open with the special token, not with its text spelled in bytes.
    assert not compiler.allowed([plain])[0][
        deepseek_tokenizer.encode("<", add_special_tokens=False)[0]
    ]
