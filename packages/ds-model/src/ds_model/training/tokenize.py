"""Turning records into token ids and loss labels (``-100`` = not trained on).

Works with any tokenizer that has ``encode(text) -> list[int]`` and the usual
``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` attributes; chat records use the
tokenizer's ``apply_chat_template`` or ``chat_template`` (a Jinja string) when it has
one. :class:`ByteTokenizer` is a dependency-free fallback for models built from a
preset, whose random weights have no tokenizer of their own.
"""

from __future__ import annotations

import inspect
from typing import Any

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "ByteTokenizer", "encode_record", "encode_text", "render_chat"]

_DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then ``<bos>`` 256, ``<eos>`` 257, ``<pad>`` 258."""

    vocab_size = 259
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    chat_template = _DEFAULT_CHAT_TEMPLATE

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i for i in ids if i < 256)
        return data.decode("utf-8", errors="replace")


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (BOS/EOS are added by the caller)."""
    encode = tokenizer.encode
    try:
        accepts = "add_special_tokens" in inspect.signature(encode).parameters
    except (TypeError, ValueError):
        accepts = False
    ids = encode(text, add_special_tokens=False) if accepts else encode(text)
    if hasattr(ids, "ids"):  # a `tokenizers.Encoding`
        ids = ids.ids
    return [int(i) for i in ids]


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat ``messages`` as text, through the tokenizer's own template if it has one."""
    if not messages and not add_generation_prompt:
        return ""
    apply = getattr(tokenizer, "apply_chat_template", None)
    template = getattr(tokenizer, "chat_template", None)
    if callable(apply) and (template or not hasattr(tokenizer, "chat_template")):
        return apply(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    import jinja2

    # No template of its own (a base model): a plain role-tagged format.
    template = template or _DEFAULT_CHAT_TEMPLATE
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token="",
        eos_token="",
    )


def _special(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    return int(value) if value is not None else None


def encode_record(tokenizer: Any, data: dict[str, Any], kind: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one validated record of ``kind``.

    ``text``: every token is trained on. ``prompt_completion``: the prompt is masked.
    ``chat``: only assistant turns (their content and the template's closing tokens)
    are trained on. BOS starts and EOS ends every example; the EOS is trained on so the
    model learns to stop.
    """
    bos = _special(tokenizer, "bos_token_id")
    eos = _special(tokenizer, "eos_token_id")
    segments: list[tuple[list[int], bool]] = []
    if kind == "text":
        segments.append((encode_text(tokenizer, data["text"]), True))
    elif kind == "prompt_completion":
        segments.append((encode_text(tokenizer, data["prompt"]), False))
        segments.append((encode_text(tokenizer, data["completion"]), True))
    elif kind == "chat":
        segments.extend(_chat_segments(tokenizer, data["messages"]))
    else:
        raise ValueError(f"kind={kind!r}: expected 'text', 'prompt_completion' or 'chat'")
    # A chat template may render the BOS itself (DeepSeek's does): never add a second.
    starts_with_bos = bool(segments and segments[0][0] and segments[0][0][0] == bos)
    ids: list[int] = [] if bos is None or starts_with_bos else [bos]
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    for seg, trained in segments:
        ids.extend(seg)
        labels.extend(seg if trained else [IGNORE_INDEX] * len(seg))
    if eos is not None:
        ids.append(eos)
        labels.append(eos)
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError("record has no token to train on after tokenization")
    return ids, labels


def _chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[list[int], bool]]:
    # Render growing prefixes and tokenize the differences, so each token is known to
    # belong to an assistant turn or not whatever the template looks like.
    segments: list[tuple[list[int], bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
            if not header.startswith(done):
                raise ValueError("the chat template does not render prefixes consistently")
            segments.append((encode_text(tokenizer, header[len(done) :]), False))
            done = header
        full = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(done):
            raise ValueError("the chat template does not render prefixes consistently")
        segments.append((encode_text(tokenizer, full[len(done) :]), message["role"] == "assistant"))
        done = full
    return segments
