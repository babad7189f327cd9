"""Incremental detokenization and stop strings, against one-shot decoding."""

from __future__ import annotations

import pytest
from ds_serve.detokenizer import IncrementalDetokenizer, StopMatcher
from hypothesis import given, settings
from hypothesis import strategies as st


def stream_text(sp, prompt: list[int], output: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(sp.decode, prompt)
    deltas = [detok.push(t) for t in output]
    deltas.append(detok.flush())
    return deltas


@settings(max_examples=60)
@given(data=st.data())
def test_deltas_concatenate_to_the_decoded_text(sp, data):
    vocab = sp.get_piece_size()
    ids = st.integers(min_value=3, max_value=vocab - 1)
    prompt = data.draw(st.lists(ids, min_size=1, max_size=8))
    output = data.draw(st.lists(ids, min_size=0, max_size=24))
    deltas = stream_text(sp, prompt, output)
    full, head = sp.decode(prompt + output), sp.decode(prompt)
    if full.startswith(head):  # SentencePiece merges only within the output here
        assert "".join(deltas) == full[len(head) :]


def test_multibyte_characters_are_never_emitted_half(sp):
    text = "你好，世界！ café 😀 ü"  # the emoji and ü are not in the corpus: byte pieces
    output = sp.encode(text)
    assert any(sp.id_to_piece(t).startswith("<0x") for t in output)
    prompt = sp.encode("print(")
    deltas = stream_text(sp, prompt, output)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas).strip() == text.strip()


def test_first_output_token_keeps_its_leading_space(sp):
    prompt = sp.encode("The quick")
    output = sp.encode("The quick brown fox")[len(prompt) :]
    assert "".join(stream_text(sp, prompt, output)).startswith(" ")


def reference_stop(pieces: list[str], stops: list[str], include=False) -> tuple[str, bool]:
    """Check after every piece, as the engine does: cut at the earliest stop start (or,
    with ``include``, after that stop; the shorter one where two start together)."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [(text.find(s), len(s)) for s in stops if s in text]
        if hits:
            start, length = min(hits)
            return text[: start + length if include else start], True
    return text, False


alphabet = st.sampled_from("abc \n")


@settings(max_examples=300)
@given(
    pieces=st.lists(st.text(alphabet, max_size=4), max_size=12),
    stops=st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3),
)
def test_stop_strings_split_across_pieces_are_caught_and_never_emitted(pieces, stops):
    matcher = StopMatcher(stops)
    emitted = []
    for piece in pieces:
        emitted.append(matcher.push(piece))
        # Nothing emitted so far may contain a stop string or end in a stop's prefix
        # that later text completes: checked by comparing with the reference below.
    emitted.append(matcher.flush())
    expected, stopped = reference_stop(pieces, stops)
    assert "".join(emitted) == expected
    assert matcher.stopped == stopped
    for stop in stops:
        assert stop not in "".join(emitted)


@settings(max_examples=200)
@given(
    pieces=st.lists(st.text(alphabet, max_size=4), max_size=12),
    stops=st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3),
)
def test_include_keeps_the_matched_stop_string_and_nothing_after(pieces, stops):
    matcher = StopMatcher(stops, include=True)
    emitted = "".join(matcher.push(piece) for piece in pieces) + matcher.flush()
    expected, stopped = reference_stop(pieces, stops, include=True)
    assert emitted == expected
    assert matcher.stopped == stopped
    if stopped:
        assert any(emitted.endswith(stop) for stop in stops)


def test_stop_string_split_across_tokens_example():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("hello S") == "hello "
    assert matcher.push("TO") == ""
    assert matcher.push("P and more") == ""
    assert matcher.stopped
    assert matcher.flush() == ""


def test_held_text_that_is_not_a_stop_is_released():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("ST") == ""
    assert matcher.push("ART") == "START"
    assert matcher.push("ST") == ""
    assert matcher.flush() == "ST"


def test_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["ok", ""])
