"""Incremental detokenization and stop strings.

Decoding token by token is wrong for byte-level and SentencePiece tokenizers: a
character can span tokens (an incomplete UTF-8 sequence decodes to U+FFFD) and
SentencePiece drops the leading space of the first piece it decodes. So, as TGI and
vLLM do, each step decodes a short window that starts a few tokens back (seeded with
the prompt's tail) and emits only the text past the window's already-read part, and
holds back text that ends in U+FFFD until the next token completes it.

Stop strings are matched on the text, not on tokens, and a stop string may be split
across tokens: ``StopMatcher`` holds back the longest suffix of the pending text that
could still begin a stop string, so a stop string is never partly emitted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["IncrementalDetokenizer", "StopMatcher"]

# How many prompt tokens seed the window: enough context for the leading-space rule.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation is the decoded text."""

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: Sequence[int]) -> None:
        self._decode = decode
        self._tokens = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)

    def push(self, token_id: int) -> str:
        """Add one token; returns the new text it completes (may be empty)."""
        self._tokens.append(token_id)
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._tokens[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held at the end (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._tokens[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._tokens)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Finds stop strings in streamed text; what follows the first match is dropped, and
    the matched stop string too unless ``include`` (vLLM's ``include_stop_str_in_output``)."""

    def __init__(self, stop: Sequence[str], include: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self._stop = tuple(stop)
        self._include = include
        self._pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add decoded text; returns what is safe to emit now. Sets ``stopped`` on a match."""
        if self.stopped:
            return ""
        if not self._stop:
            return delta
        text = self._pending + delta
        hits = [(i, len(s)) for i, s in ((text.find(s), s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            start, length = min(hits)
            return text[: start + length] if self._include else text[:start]
        hold = self._longest_stop_prefix_suffix(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """At the end of generation, held text that never became a stop string is emitted."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
