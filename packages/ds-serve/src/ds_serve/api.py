"""The OpenAI wire format as msgspec Structs: decoded, validated and encoded by msgspec.

Unknown top-level request fields are accepted and ignored, as vLLM does: clients and
frameworks send fields of newer API versions (``store``, ``metadata``...). The HTTP
layer logs their names and counts them in /metrics. Nested objects (messages, content
parts, stream options) still forbid unknown fields. Known fields with bad values are a
400 naming the field: numeric ranges are msgspec ``Meta`` constraints, so the decoder
reports the offending field's path (``$.temperature``) in its error.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

__all__ = [
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatDelta",
    "ChatLogprobs",
    "ChatMessage",
    "ChatResponseMessage",
    "ChatTokenLogprob",
    "ChatTopLogprob",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionChunkChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "ContentPart",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "ErrorBody",
    "ErrorResponse",
    "FunctionCall",
    "FunctionDefinition",
    "FunctionName",
    "HealthResponse",
    "JSONSchemaFormat",
    "ModelCard",
    "ModelList",
    "NamedToolChoice",
    "ResponseFormat",
    "StreamOptions",
    "TokenizeRequest",
    "TokenizeResponse",
    "TokenizerInfo",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "VersionResponse",
]

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
# top_k is a vLLM extension; -1 (or 0) means "no top-k filter", as in vLLM.
TopK = Annotated[int, Meta(ge=-1)]
MaxTokens = Annotated[int, Meta(ge=1)]
# Completions accept max_tokens 0: score the prompt (echo + logprobs), generate nothing.
CompletionMaxTokens = Annotated[int, Meta(ge=0)]
NumLogprobs = Annotated[int, Meta(ge=0, le=20)]
Bias = Annotated[float, Meta(ge=-100.0, le=100.0)]
NumChoices = Annotated[int, Meta(ge=1, le=16)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Meta(ge=0, lt=2**31)]
StopList = Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=16)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class _SamplingFields(Struct, kw_only=True):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    n: NumChoices = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | StopList | None = None
    seed: Seed | None = None
    user: str | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # Token id (as a JSON object key) -> value added to its logit.
    logit_bias: dict[str, Bias] | None = None
    # vLLM's sampling extensions.
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=2.0)] | None = None
    min_tokens: Annotated[int, Meta(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=64)] | None = None
    # Accepted so that clients which always send them work; only the default is
    # supported, anything else is a 400 naming the field (see validation.py).
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


class CompletionRequest(_SamplingFields, kw_only=True):
    """``POST /v1/completions``. ``prompt`` is text, token ids, or a list of either.

    msgspec allows one array type per union, so the list's items are a union and
    ``validation.prompts`` checks that they are all of one kind.
    """

    prompt: str | Annotated[list[str | TokenId | list[TokenId]], Meta(min_length=1)]
    max_tokens: CompletionMaxTokens | None = 16
    # Top alternatives per token (0: only the chosen token's logprob).
    logprobs: NumLogprobs | None = None
    echo: bool = False
    best_of: NumChoices | None = None
    suffix: str | None = None
    response_format: ResponseFormat | None = None  # as vLLM: constrained like chat


class ContentPart(Struct, forbid_unknown_fields=True):
    type: Literal["text"]
    text: str


class FunctionCall(Struct, forbid_unknown_fields=True):
    name: str
    arguments: str  # a JSON document, as OpenAI sends it


class ToolCall(Struct, forbid_unknown_fields=True, kw_only=True):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(Struct, forbid_unknown_fields=True, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


FunctionNameStr = Annotated[str, Meta(min_length=1, max_length=64, pattern="^[A-Za-z0-9_.-]+$")]


class FunctionDefinition(Struct, forbid_unknown_fields=True, kw_only=True):
    name: FunctionNameStr
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class Tool(Struct, forbid_unknown_fields=True, kw_only=True):
    function: FunctionDefinition
    type: Literal["function"] = "function"


class FunctionName(Struct, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(Struct, forbid_unknown_fields=True, kw_only=True):
    function: FunctionName
    type: Literal["function"] = "function"


class JSONSchemaFormat(Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    schema: dict | None = None  # None: any JSON object
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Struct, forbid_unknown_fields=True, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    """``POST /v1/chat/completions``; the prompt is the tokenizer's chat template."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    add_generation_prompt: bool = True
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = None


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(Struct):
    """The legacy completions format: parallel lists, one entry per token. The first
    prompt token of an ``echo`` has no logprob (null) and no alternatives (null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    object: str = "text_completion"


class CompletionChunkChoice(Struct):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    object: str = "text_completion"
    usage: Usage | None = None


class ChatResponseMessage(Struct):
    content: str | None
    role: str = "assistant"
    tool_calls: list[ToolCall] | None = None


class ChatTopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(Struct):
    content: list[ChatTokenLogprob] | None


class ChatChoice(Struct):
    index: int
    message: ChatResponseMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class ToolCallDelta(Struct, omit_defaults=True, kw_only=True):
    """One streamed piece of the ``index``-th tool call; the first carries id, type, name."""

    index: int
    id: str | None = None
    type: str | None = None
    function: dict[str, str] | None = None


class ChatDelta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None = None


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str = "deepseek-stack"
    object: str = "model"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class VersionResponse(Struct):
    version: str


class TokenizerInfo(Struct, omit_defaults=True):
    """vLLM's ``GET /tokenizer_info``: what a client needs to tokenize as the server does."""

    tokenizer_class: str
    vocab_size: int
    model_max_length: int
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None


class TokenizeRequest(Struct, kw_only=True):
    """vLLM's ``POST /tokenize``: either ``prompt`` or chat ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(Struct):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(Struct, kw_only=True):
    tokens: list[TokenId]
    model: str | None = None


class DetokenizeResponse(Struct):
    prompt: str


class HealthResponse(Struct):
    status: str
    model: str
    running: int
    waiting: int
    kv_cache_usage: float


class ErrorBody(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(Struct):
    error: ErrorBody
