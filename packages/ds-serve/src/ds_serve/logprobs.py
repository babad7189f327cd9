"""Logprobs in the OpenAI formats: the legacy completions lists and chat's ``content``.

Each token is shown as the text it adds after the tokens before it (decoded in a short
window, so SentencePiece's leading space and multi-token characters come out as they
do in the full text); an alternative is shown as the text it would have added at
that place. ``text_offset`` counts characters of those token texts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ds_serve.api import ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs
from ds_serve.engine import TokenLogprob

__all__ = ["chat_logprobs", "completion_logprobs"]

# Tokens of context decoded before each token: enough for the leading-space rule.
WINDOW = 4

Decode = Callable[[list[int]], str]


def _texts(
    decode: Decode, context: Sequence[int], entries: Sequence[TokenLogprob]
) -> list[tuple[str, dict[int, str]]]:
    """Per entry: its token's text and each alternative's text, in context."""
    ids = list(context[-WINDOW:])
    out = []
    for entry in entries:
        window = ids[-WINDOW:]
        skip = len(decode(window))
        alternatives = {t: decode([*window, t])[skip:] for t, _ in entry.top}
        out.append((decode([*window, entry.token_id])[skip:], alternatives))
        ids.append(entry.token_id)
    return out


def completion_logprobs(
    decode: Decode, context: Sequence[int], entries: Sequence[TokenLogprob], offset: int
) -> CompletionLogprobs:
    """``entries`` after ``context`` token ids; ``offset``: where the first token's text
    starts in the choice's text. The chosen token is always among its ``top_logprobs``
    (vLLM's convention); a null logprob (the first prompt token) has null alternatives."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for entry, (text, alternatives) in zip(entries, _texts(decode, context, entries)):
        tokens.append(text)
        token_logprobs.append(entry.logprob)
        if entry.logprob is None:
            top_logprobs.append(None)
        else:
            top = {alternatives[t]: lp for t, lp in entry.top}
            top.setdefault(text, entry.logprob)
            top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens, token_logprobs, top_logprobs, text_offset)


def chat_logprobs(
    decode: Decode, context: Sequence[int], entries: Sequence[TokenLogprob]
) -> ChatLogprobs:
    content = []
    for entry, (text, alternatives) in zip(entries, _texts(decode, context, entries)):
        top = [ChatTopLogprob(alternatives[t], lp, _bytes(alternatives[t])) for t, lp in entry.top]
        content.append(ChatTokenLogprob(text, entry.logprob, _bytes(text), top))
    return ChatLogprobs(content)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))
