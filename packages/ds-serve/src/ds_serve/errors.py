"""OpenAI-shaped errors: every non-2xx answer is ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import re

import msgspec

from ds_serve.api import ErrorBody, ErrorResponse

__all__ = ["APIError", "error_from_msgspec"]

_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"unknown field `(?P<name>[^`]+)`")
_MISSING_FIELD = re.compile(r"missing required field `(?P<name>[^`]+)`")


class APIError(Exception):
    """An error the HTTP layer answers with ``status`` and an OpenAI error body.

    ``param`` names the request field at fault (dotted path, e.g. ``messages.0.role``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> bytes:
        error = ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return msgspec.json.encode(ErrorResponse(error=error))


def _dotted(path: str) -> str:
    """msgspec's ``.messages[0].role`` as ``messages.0.role``; a mapping's value
    (``.logit_bias[...]``) as the mapping's name."""
    return re.sub(r"\[(\d+)\]", r".\1", path.replace("[...]", "")).lstrip(".")


def error_from_msgspec(exc: msgspec.DecodeError) -> APIError:
    """A 400 naming the field from msgspec's decode/validation message."""
    text = str(exc)
    param: str | None = None
    match = _PATH.search(text)
    prefix = _dotted(match.group("path")) if match else ""
    for pattern in (_UNKNOWN_FIELD, _MISSING_FIELD):
        named = pattern.search(text)
        if named:
            param = f"{prefix}.{named.group('name')}" if prefix else named.group("name")
            break
    else:
        param = prefix or None
    if isinstance(exc, msgspec.ValidationError):
        message = f"Invalid request: {text}"
    else:
        message = f"Request body is not valid JSON: {text}"
    return APIError(400, message, param=param, code="invalid_request")
