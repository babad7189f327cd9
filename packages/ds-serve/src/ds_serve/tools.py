"""Tool calls: rendered into the prompt by the chat template, constrained by a grammar
when the request requires a call, and parsed back into OpenAI ``tool_calls``.

Two formats, chosen by the tokenizer:

- ``deepseek``: the tokenizer has DeepSeek-V3's tool-call tokens and its template reads
  ``tool_calls``. Messages go to the template as they are (assistant ``tool_calls``,
  ``role: "tool"``), and a call is
  ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>``.
- ``json`` (every other model, the built-in one included): a system message listing the
  tools is put first; an assistant's call is the text
  ``<tool_call>{"name": NAME, "arguments": {...}}</tool_call>`` (one per call, nothing
  between them); a tool result is a user message
  ``<tool_response>{"tool_call_id": ID, "content": TEXT}</tool_response>``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ds_serve.api import ChatMessage, FunctionCall, Tool, ToolCall

__all__ = [
    "DEEPSEEK_TOKENS",
    "ToolCallParser",
    "ToolFormat",
    "call_grammar",
    "render_messages",
    "tool_format",
]

DEEPSEEK_TOKENS = {
    "calls_begin": "<｜tool▁calls▁begin｜>",
    "calls_end": "<｜tool▁calls▁end｜>",
    "call_begin": "<｜tool▁call▁begin｜>",
    "call_end": "<｜tool▁call▁end｜>",
    "sep": "<｜tool▁sep｜>",
}
JSON_CALL = ("<tool_call>", "</tool_call>")
JSON_RESULT = ("<tool_response>", "</tool_response>")
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
GUIDANCE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolFormat:
    """How calls look in this model's text: ``kind`` "deepseek" or "json"."""

    kind: str
    token_ids: dict[str, int]  # deepseek: DEEPSEEK_TOKENS' ids


def tool_format(tokenizer: Any) -> ToolFormat:
    template = getattr(tokenizer, "chat_template", None) or ""
    if "tool_calls" not in template:
        return ToolFormat("json", {})
    ids = {key: tokenizer.token_to_id(token) for key, token in DEEPSEEK_TOKENS.items()}
    if all(i is not None for i in ids.values()):
        return ToolFormat("deepseek", ids)
    return ToolFormat("json", {})


def _arguments(call: ToolCall) -> Any:
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


def _json_call_text(name: str, arguments: Any) -> str:
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{JSON_CALL[0]}{body}{JSON_CALL[1]}"


def _tools_prompt(tools: list[Tool]) -> str:
    lines = [
        "You can call the functions below. To call one, answer with "
        f'{JSON_CALL[0]}{{"name": <function name>, "arguments": <JSON object>}}{JSON_CALL[1]}.',
        "Functions:",
    ]
    for tool in tools:
        fn = tool.function
        spec = {"name": fn.name, "parameters": fn.parameters or NO_ARGUMENTS}
        if fn.description:
            spec["description"] = fn.description
        lines.append(json.dumps(spec, ensure_ascii=False))
    return "\n".join(lines)


def render_messages(
    messages: list[ChatMessage], tools: list[Tool] | None, fmt: ToolFormat, offer_tools: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages for the chat template, extra template arguments). ``offer_tools``: the
    tool list goes into the prompt (False for ``tool_choice: "none"``)."""
    rendered: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    if fmt.kind == "deepseek":
        for m in messages:
            item: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.tool_calls:
                item["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": c.function.arguments},
                    }
                    for c in m.tool_calls
                ]
            if m.tool_call_id is not None:
                item["tool_call_id"] = m.tool_call_id
            rendered.append(item)
        if tools and offer_tools:
            extra["tools"] = [{"type": "function", "function": _function_dict(t)} for t in tools]
        return rendered, extra
    if tools and offer_tools:
        rendered.append({"role": "system", "content": _tools_prompt(tools)})
    for m in messages:
        if m.role == "tool":
            body = json.dumps({"tool_call_id": m.tool_call_id, "content": m.text()})
            rendered.append({"role": "user", "content": f"{JSON_RESULT[0]}{body}{JSON_RESULT[1]}"})
        elif m.tool_calls:
            calls = "".join(_json_call_text(c.function.name, _arguments(c)) for c in m.tool_calls)
            rendered.append({"role": m.role, "content": m.text() + calls})
        else:
            rendered.append({"role": m.role, "content": m.text()})
    return rendered, extra


def _function_dict(tool: Tool) -> dict[str, Any]:
    fn = tool.function
    out: dict[str, Any] = {"name": fn.name, "parameters": fn.parameters or NO_ARGUMENTS}
    if fn.description:
        out["description"] = fn.description
    return out


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid lark string literal


def _schema(parameters: dict | None) -> str:
    schema = {**(parameters or NO_ARGUMENTS)}
    schema["x-guidance"] = {**GUIDANCE, **schema.get("x-guidance", {})}
    return json.dumps(schema)


def call_grammar(tools: list[Tool], fmt: ToolFormat, parallel: bool) -> str:
    """A lark grammar (llguidance's dialect) of one call, or one or more with ``parallel``,
    to any of ``tools``: names are fixed strings, arguments follow each JSON schema."""
    repeat = "+" if parallel else ""
    if fmt.kind == "deepseek":
        ids = {key: f"<[{i}]>" for key, i in fmt.token_ids.items()}
        alternatives = [
            f"{_lark_string(t.function.name + chr(10) + '```json' + chr(10))} "
            f"args_{k} {_lark_string(chr(10) + '```')} {ids['call_end']}"
            for k, t in enumerate(tools)
        ]
        rules = [
            f"start: {ids['calls_begin']} call{repeat} {ids['calls_end']}",
            f'call: {ids["call_begin"]} "function" {ids["sep"]} fn',
            "fn: " + " | ".join(alternatives),
        ]
    else:
        heads = [f'{{"name": {json.dumps(t.function.name)}, "arguments": ' for t in tools]
        alternatives = [f'{_lark_string(head)} args_{k} "}}"' for k, head in enumerate(heads)]
        rules = [
            f"start: call{repeat}",
            f"call: {_lark_string(JSON_CALL[0])} fn {_lark_string(JSON_CALL[1])}",
            "fn: " + " | ".join(alternatives),
        ]
    rules += [f"args_{k}: %json {_schema(t.function.parameters)}" for k, t in enumerate(tools)]
    return "\n".join(rules) + "\n"


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """Splits generated text into content and tool calls, incrementally: ``push`` returns
    the content that is certainly not part of a call and the calls completed so far;
    text that may be the start of a call marker is held back until it is decided.
    A call that does not parse, or names no offered tool, stays content."""

    def __init__(self, fmt: ToolFormat, tool_names: set[str]) -> None:
        self.fmt = fmt
        self.names = tool_names
        if fmt.kind == "deepseek":
            self.begin, self.end = DEEPSEEK_TOKENS["call_begin"], DEEPSEEK_TOKENS["call_end"]
            self.noise = (DEEPSEEK_TOKENS["calls_begin"], DEEPSEEK_TOKENS["calls_end"])
        else:
            self.begin, self.end = JSON_CALL
            self.noise = ()
        self.buffer = ""
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buffer += text
        for marker in self.noise:
            self.buffer = self.buffer.replace(marker, "")
        content, calls = [], []
        while True:
            start = self.buffer.find(self.begin)
            if start < 0:
                keep = _partial_suffix(self.buffer, [self.begin, *self.noise])
                content.append(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
            end = self.buffer.find(self.end, start + len(self.begin))
            if end < 0:
                content.append(self.buffer[:start])
                self.buffer = self.buffer[start:]
                break
            body = self.buffer[start + len(self.begin) : end]
            call = self._parse(body)
            if call is None:
                content.append(self.buffer[: end + len(self.end)])
            else:
                content.append(self.buffer[:start])
                calls.append(call)
            self.buffer = self.buffer[end + len(self.end) :]
        self.calls += calls
        return "".join(content), calls

    def flush(self) -> str:
        rest, self.buffer = self.buffer, ""
        return rest

    def _parse(self, body: str) -> ToolCall | None:
        if self.fmt.kind == "deepseek":
            match = re.fullmatch(
                r"(?s)function" + re.escape(DEEPSEEK_TOKENS["sep"]) + r"(.*?)\n```json\n(.*)\n```",
                body,
            )
            if match is None:
                return None
            name, raw = match.group(1), match.group(2)
        else:
            try:
                parsed = json.loads(body)
            except json.JSONDecodeError:
                return None
            if not isinstance(parsed, dict) or set(parsed) != {"name", "arguments"}:
                return None
            name, raw = parsed["name"], parsed["arguments"]
            raw = json.dumps(raw, ensure_ascii=False)
        try:
            arguments = json.loads(raw)
        except json.JSONDecodeError:
            return None
        if name not in self.names or not isinstance(arguments, dict):
            return None
        return ToolCall(
            id=_call_id(), function=FunctionCall(name, json.dumps(arguments, ensure_ascii=False))
        )


def _partial_suffix(text: str, markers: list[str]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of a marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best
