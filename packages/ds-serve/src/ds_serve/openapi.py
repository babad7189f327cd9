"""``GET /openapi.json``, generated from the msgspec types in ``api.py``, and ``GET /docs``.

The schemas come from ``msgspec.json.schema_components`` over the request and
response Structs, so the published document cannot drift from what the server decodes
and encodes. ``/docs`` is one static page that renders the document with a few lines
of inline script (no assets fetched from elsewhere).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ds_serve import api

__all__ = ["DOCS_HTML", "openapi_schema"]

_REF = "#/components/schemas/{name}"

# (method, path, summary, request type or None, response type, streams SSE)
_ROUTES: list[tuple[str, str, str, type | None, type, bool]] = [
    (
        "post",
        "/v1/completions",
        "Create a completion",
        api.CompletionRequest,
        api.CompletionResponse,
        True,
    ),
    (
        "post",
        "/v1/chat/completions",
        "Create a chat completion",
        api.ChatCompletionRequest,
        api.ChatCompletionResponse,
        True,
    ),
    ("get", "/v1/models", "List the served models", None, api.ModelList, False),
    ("get", "/v1/models/{model}", "Retrieve one model", None, api.ModelCard, False),
    (
        "post",
        "/tokenize",
        "Tokenize a prompt or chat",
        api.TokenizeRequest,
        api.TokenizeResponse,
        False,
    ),
    (
        "post",
        "/detokenize",
        "Detokenize token ids",
        api.DetokenizeRequest,
        api.DetokenizeResponse,
        False,
    ),
    ("get", "/tokenizer_info", "The tokenizer's configuration", None, api.TokenizerInfo, False),
    ("get", "/health", "Liveness and load", None, api.HealthResponse, False),
    ("get", "/version", "The server's version", None, api.VersionResponse, False),
]

# Response types of streamed requests (one per server-sent event).
_CHUNKS = {
    "/v1/completions": api.CompletionChunk,
    "/v1/chat/completions": api.ChatCompletionChunk,
}


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP API."""
    from ds_serve import __version__

    types = [t for _, _, _, req, resp, _ in _ROUTES for t in (req, resp) if t is not None]
    types += [*_CHUNKS.values(), api.ErrorResponse]
    refs, components = msgspec.json.schema_components(types, ref_template=_REF)
    ref = dict(zip(types, refs))
    error = {
        "description": "An OpenAI-format error",
        "content": {"application/json": {"schema": ref[api.ErrorResponse]}},
    }
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, request, response, streams in _ROUTES:
        content: dict[str, Any] = {"application/json": {"schema": ref[response]}}
        if streams:
            content["text/event-stream"] = {"schema": ref[_CHUNKS[path]]}
        op: dict[str, Any] = {
            "summary": summary,
            "responses": {
                "200": {"description": "Success", "content": content},
                "400": error,
                "404": error,
            },
        }
        if request is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref[request]}},
            }
            op["responses"].update({"413": error, "429": error, "503": error})
        if "{model}" in path:
            op["parameters"] = [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ]
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "ds-serve", "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }


DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ds-serve API</title>
<style>
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
code,pre{background:#f4f4f4;padding:.1rem .3rem}pre{padding:.6rem;overflow:auto}
h2{border-bottom:1px solid #ddd}summary{cursor:pointer}
</style></head>
<body><h1>ds-serve API</h1>
<p>The OpenAPI document: <a href="/openapi.json">/openapi.json</a>.</p>
<div id="paths"></div><h2>Schemas</h2><div id="schemas"></div>
<script>
fetch("/openapi.json").then(r => r.json()).then(doc => {
  const esc = s => String(s).replace(/[&<>]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;"}[c]));
  const name = s => s && s.$ref ? s.$ref.split("/").pop() : "";
  let html = "<h2>Endpoints</h2><ul>";
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const body = op.requestBody ? name(op.requestBody.content["application/json"].schema) : "";
      const out = name(op.responses["200"].content["application/json"].schema);
      html += `<li><code>${method.toUpperCase()} ${esc(path)}</code> ${esc(op.summary)}` +
        (body ? ` &mdash; body <a href="#${body}">${body}</a>` : "") +
        ` &rarr; <a href="#${out}">${out}</a></li>`;
    }
  }
  document.getElementById("paths").innerHTML = html + "</ul>";
  let schemas = "";
  for (const [key, schema] of Object.entries(doc.components.schemas)) {
    schemas += `<details id="${key}"><summary><code>${key}</code></summary>` +
      `<pre>${esc(JSON.stringify(schema, null, 2))}</pre></details>`;
  }
  document.getElementById("schemas").innerHTML = schemas;
});
</script></body></html>
"""
