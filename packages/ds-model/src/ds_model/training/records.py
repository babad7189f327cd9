"""Reading training records from JSON / JSONL files, with file:line for every record.

A ``.jsonl`` file holds one JSON object per line. A ``.json`` file holds either a JSON
array of objects or, like DeepSeek's published ``custom_dataset.json`` example, JSON lines. Every record
carries the 1-based line where it starts, so a bad record is reported as ``path:line``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["BadRecordError", "Record", "check_record", "iter_records", "record_kind"]


class BadRecordError(ValueError):
    """A record that cannot be used for training; ``where`` is ``path:line``."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One parsed record and where it came from (``source`` is ``path:line`` or ``#index``)."""

    data: Any
    source: str


def iter_records(source: str | os.PathLike[str] | Iterable[Any]) -> Iterator[Record]:
    """Yield records from a path (.json / .jsonl) or from an in-memory iterable.

    Strings in an iterable become ``{"text": ...}`` records. A JSON syntax error is
    raised at once as :class:`BadRecordError` (a file that cannot be parsed is never
    skipped silently); per-record content is checked later by :func:`check_record`.
    """
    if isinstance(source, (str, os.PathLike)):
        yield from _iter_file(os.fspath(source))
        return
    if isinstance(source, (bytes, dict)):
        raise TypeError(
            f"train data must be a path or an iterable of records, got {type(source).__name__}"
        )
    for index, item in enumerate(source):
        if isinstance(item, str):
            item = {"text": item}
        yield Record(item, f"#{index}")


def _iter_file(path: str) -> Iterator[Record]:
    if os.path.isdir(path):
        raise ValueError(f"data path {path!r} is a directory; expected a .json or .jsonl file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path {path!r} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = 1 + raw.count(b"\n", 0, e.start)
        raise BadRecordError(
            f"{path}:{line}", f"not UTF-8 text (invalid byte at byte offset {e.start})"
        ) from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _iter_json_array(path, text)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadRecordError(f"{path}:{lineno}", f"invalid JSON ({e.msg})") from None
        yield Record(data, f"{path}:{lineno}")


def _iter_json_array(path: str, text: str) -> Iterator[Record]:
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line = 1 + text.count("\n", 0, pos)
    counted_to = pos

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def where(i: int) -> str:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, i)
        counted_to = i
        return f"{path}:{line}"

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        end = skip_ws(pos + 1)
        if end < len(text):
            raise BadRecordError(where(end), "trailing content after the JSON array")
        return
    while True:
        pos = skip_ws(pos)
        loc = where(pos)
        try:
            data, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise BadRecordError(f"{path}:{e.lineno}", f"invalid JSON ({e.msg})") from None
        yield Record(data, loc)
        pos = skip_ws(pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            end = skip_ws(pos + 1)
            if end < len(text):
                raise BadRecordError(where(end), "trailing content after the JSON array")
            return
        raise BadRecordError(where(min(pos, len(text))), "invalid JSON (expected ',' or ']')")


_ROLES = ("system", "user", "assistant", "tool")


def record_kind(data: Any) -> str:
    """``"text"``, ``"prompt_completion"``, ``"chat"`` or ``"preference"``; raises ValueError."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if {"prompt", "chosen", "rejected"} <= data.keys():
        return "preference"
    if "messages" in data:
        return "chat"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    if "text" in data:
        return "text"
    raise ValueError(
        f"record has keys {sorted(data)}; expected 'text', 'prompt'+'completion', "
        "'messages', or 'prompt'+'chosen'+'rejected'"
    )


def check_record(data: Any, allowed: tuple[str, ...]) -> str:
    """Validate one record's content and return its kind; raises ValueError with the reason."""
    kind = record_kind(data)
    if kind not in allowed:
        raise ValueError(f"record of kind {kind!r} is not usable here; expected {list(allowed)}")
    if kind == "text":
        _nonempty_str(data, "text")
    elif kind == "prompt_completion":
        if not isinstance(data["prompt"], str):
            raise ValueError(f"'prompt' must be a string, got {type(data['prompt']).__name__}")
        _nonempty_str(data, "completion")
    elif kind == "preference":
        if not isinstance(data["prompt"], str):
            raise ValueError(f"'prompt' must be a string, got {type(data['prompt']).__name__}")
        _nonempty_str(data, "chosen")
        _nonempty_str(data, "rejected")
        for key in ("ref_chosen_logp", "ref_rejected_logp"):
            if key in data and not isinstance(data[key], (int, float)):
                raise ValueError(f"{key!r} must be a number, got {data[key]!r}")
    else:
        messages = data["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be an object with a string 'content'")
            if m.get("role") not in _ROLES:
                raise ValueError(
                    f"messages[{i}].role={m.get('role')!r}: expected one of {list(_ROLES)}"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("'messages' has no assistant turn, so nothing would be trained")
    return kind


def _nonempty_str(data: dict[str, Any], key: str) -> None:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key!r} must be a non-empty string, got {value!r}")
