"""Turning a decoded request into engine inputs, or a 400 that names the field.

msgspec has already checked types and ranges; this checks what depends on the model
(vocabulary, context length, adapter names) and the options we accept but do not
implement, which are refused rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_serve.api import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from ds_serve.errors import APIError
from ds_serve.sampling import SamplingParams
from ds_serve.structured import GrammarSpec
from ds_serve.tools import ToolCallParser, ToolFormat, call_grammar, render_messages, tool_format

__all__ = [
    "MAX_CHARS_PER_TOKEN",
    "MAX_PROMPTS_PER_REQUEST",
    "ModelInfo",
    "Prepared",
    "check_prompt_chars",
    "prepare_chat",
    "prepare_completion",
]

MAX_PROMPTS_PER_REQUEST = 64
# No token of a byte-level BPE or SentencePiece vocabulary covers this many characters,
# so a text longer than max_model_len * MAX_CHARS_PER_TOKEN cannot fit the context:
# refused before it is tokenized. (A tokenizer that collapses whitespace runs could fit
# more; such prompts are refused too.)
MAX_CHARS_PER_TOKEN = 128


def _template_errors() -> tuple[type[Exception], ...]:
    try:  # chat templates render with jinja2 (ds-model's tokenizer); raise_exception in
        from jinja2 import TemplateError  # a template raises TemplateError

        return (TemplateError,)
    except ImportError:  # pragma: no cover - a tokenizer without templates
        return ()


_TEMPLATE_ERRORS = _template_errors()


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about the served model."""

    name: str
    adapters: tuple[str, ...]
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Prepared:
    """A validated request: token prompts, one ``SamplingParams`` per choice, the adapter."""

    prompts: list[list[int]]
    params: list[SamplingParams]  # n entries; choice j of every prompt uses params[j]
    adapter: str | None
    model: str
    grammar: GrammarSpec | None = None  # response_format or a forced tool call
    tools: tuple[ToolFormat, frozenset[str]] | None = None  # parse calls out of the text
    skip_special_tokens: bool = True  # drop special tokens from the text
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text

    def tool_parser(self) -> ToolCallParser | None:
        return None if self.tools is None else ToolCallParser(self.tools[0], set(self.tools[1]))


def resolve_model(requested: str | None, info: ModelInfo) -> tuple[str, str | None]:
    """(model name to report, adapter to use). The base model's name means no adapter."""
    if requested is None or requested == info.name:
        return info.name, None
    if requested in info.adapters:
        return requested, requested
    known = [info.name, *info.adapters]
    raise APIError(
        404,
        f"The model `{requested}` does not exist. Available models: {known}",
        param="model",
        code="model_not_found",
    )


def _refuse_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    unsupported = {}
    if isinstance(req, CompletionRequest):
        unsupported["suffix"] = req.suffix is not None
        unsupported["best_of"] = req.best_of is not None and req.best_of != req.n
    for name, refused in unsupported.items():
        if refused:
            raise APIError(
                400,
                f"`{name}` is not supported by this server; omit it or use its default",
                param=name,
                code="unsupported_parameter",
            )
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs and not req.logprobs:
        raise APIError(400, "`top_logprobs` needs `logprobs: true`", param="top_logprobs")
    if req.stream_options is not None and not req.stream:
        raise APIError(
            400, "`stream_options` is only allowed when `stream` is true", param="stream_options"
        )


def _check_ids(ids: list[int], info: ModelInfo, param: str) -> list[int]:
    if not ids:
        raise APIError(400, "The prompt is empty after tokenization", param=param)
    bad = [t for t in ids if t >= info.vocab_size]
    if bad:
        raise APIError(
            400,
            f"Token id {bad[0]} is out of range: the vocabulary has {info.vocab_size} tokens "
            f"(ids 0 to {info.vocab_size - 1})",
            param=param,
        )
    return ids


def _check_length(ids: list[int], max_tokens: int, info: ModelInfo, param: str) -> None:
    if len(ids) >= info.max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {info.max_model_len} tokens; the prompt "
            f"has {len(ids)} tokens, which leaves no room for a completion",
            param=param,
            code="context_length_exceeded",
        )
    if len(ids) + max_tokens > info.max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {info.max_model_len} tokens. However, you "
            f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} "
            "in the completion). Reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )


def _logit_bias(req, info: ModelInfo) -> dict[int, float] | None:
    if not req.logit_bias:
        return None
    bias = {}
    for key, value in req.logit_bias.items():
        token = int(key) if key.strip().isdigit() else -1
        if not 0 <= token < info.vocab_size:
            raise APIError(
                400,
                f"`logit_bias` keys must be token ids in [0, {info.vocab_size}), got {key!r}",
                param="logit_bias",
            )
        bias[token] = value
    return bias


def _stop_token_ids(req, info: ModelInfo) -> tuple[int, ...]:
    """The ids that end a sequence: EOS (unless ``ignore_eos``), then ``stop_token_ids``."""
    extra = list(req.stop_token_ids or ())
    bad = [t for t in extra if t >= info.vocab_size]
    if bad:
        raise APIError(
            400,
            f"`stop_token_ids` must be token ids in [0, {info.vocab_size}), got {bad[0]}",
            param="stop_token_ids",
        )
    eos = () if req.ignore_eos else info.eos_token_ids
    return tuple(dict.fromkeys([*eos, *extra]))


def _sampling(req, max_tokens: int, info: ModelInfo) -> list[SamplingParams]:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if req.min_tokens > max_tokens:
        raise APIError(
            400,
            f"`min_tokens` ({req.min_tokens}) must be <= max_tokens ({max_tokens})",
            param="min_tokens",
        )
    if isinstance(req, CompletionRequest):
        logprobs = req.logprobs
        # echo + logprobs also scores the prompt, as OpenAI's legacy completions do.
        prompt_logprobs = req.logprobs if req.echo else None
    else:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        prompt_logprobs = None
    bias = _logit_bias(req, info)
    stop_token_ids = _stop_token_ids(req, info)
    params = []
    for choice in range(req.n):
        # Choice j of a seeded request uses seed + j, so n > 1 gives n different samples
        # that are each reproducible.
        seed = None if req.seed is None else (req.seed + choice) % (2**63)
        params.append(
            SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=-1 if req.top_k is None else req.top_k,
                min_p=req.min_p or 0.0,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=req.repetition_penalty or 1.0,
                logit_bias=bias,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                seed=seed,
                stop=stop,
                stop_token_ids=stop_token_ids,
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
        )
    return params


def completion_prompts(req: CompletionRequest, tokenizer) -> list[list[int]]:
    """The request's prompts as token id lists (a str, a list of str, ids, or lists of ids)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    kinds = {type(item) for item in prompt}
    if kinds == {str}:
        prompts = [tokenizer.encode(item) for item in prompt]
    elif kinds == {int}:
        prompts = [list(prompt)]
    elif kinds == {list}:
        prompts = [list(item) for item in prompt]
    else:
        raise APIError(
            400,
            "`prompt` must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists, not a mixture",
            param="prompt",
        )
    if len(prompts) > MAX_PROMPTS_PER_REQUEST:
        raise APIError(
            400,
            f"At most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(prompts)}",
            param="prompt",
        )
    return prompts


def prepare_completion(req: CompletionRequest, info: ModelInfo, tokenizer) -> Prepared:
    model, adapter = resolve_model(req.model, info)
    _refuse_unsupported(req)
    prompts = [_check_ids(p, info, "prompt") for p in completion_prompts(req, tokenizer)]
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    for ids in prompts:
        _check_length(ids, max_tokens, info, "prompt")
    grammar = _response_grammar(req)
    return Prepared(
        prompts,
        _sampling(req, max_tokens, info),
        adapter,
        model,
        grammar,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
    )


def chat_prompt(
    messages, tokenizer, add_generation_prompt: bool, tools=None, offer_tools: bool = False
) -> list[int]:
    rendered, extra = render_messages(messages, tools, tool_format(tokenizer), offer_tools)
    try:
        return list(
            tokenizer.apply_chat_template(
                rendered, add_generation_prompt=add_generation_prompt, tokenize=True, **extra
            )
        )
    except (ValueError, TypeError, KeyError, LookupError, *_TEMPLATE_ERRORS) as exc:
        raise APIError(
            400, f"The chat template rejected the messages: {exc}", param="messages"
        ) from exc


def _response_grammar(req: CompletionRequest | ChatCompletionRequest) -> GrammarSpec | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_object")
    if fmt.json_schema is None:
        raise APIError(
            400,
            "`response_format.json_schema` is required when `response_format.type` is "
            "'json_schema'",
            param="response_format.json_schema",
        )
    schema = fmt.json_schema.schema if fmt.json_schema.schema is not None else {"type": "object"}
    return GrammarSpec(
        "json_schema", schema, bool(fmt.json_schema.strict), "response_format.json_schema"
    )


def _tool_setup(req: ChatCompletionRequest, tokenizer):
    """(tools offered in the prompt, grammar of a forced call, parser) for the request."""
    tools = req.tools or []
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise APIError(400, "`tool_choice` needs a non-empty `tools` list", param="tool_choice")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, f"`tools` names a function twice: {names}", param="tools")
    if choice == "none":
        return [], None, None
    fmt = tool_format(tokenizer)
    parse = (fmt, frozenset(names))
    if choice == "auto":
        return tools, None, parse
    forced = tools
    if not isinstance(choice, str):
        forced = [t for t in tools if t.function.name == choice.function.name]
        if not forced:
            raise APIError(
                400,
                f"`tool_choice` names function {choice.function.name!r}, which is not in "
                f"`tools` ({names})",
                param="tool_choice",
            )
    grammar = GrammarSpec("lark", call_grammar(forced, fmt, req.parallel_tool_calls), True, "tools")
    return tools, grammar, parse


def prepare_chat(req: ChatCompletionRequest, info: ModelInfo, tokenizer) -> Prepared:
    model, adapter = resolve_model(req.model, info)
    _refuse_unsupported(req)
    tools, tool_grammar, parse = _tool_setup(req, tokenizer)
    grammar = _response_grammar(req)
    if grammar is not None and tool_grammar is not None:
        raise APIError(
            400,
            "`response_format` cannot constrain the output while `tool_choice` forces a "
            "tool call; drop one of them",
            param="response_format",
        )
    ids = _check_ids(
        chat_prompt(req.messages, tokenizer, req.add_generation_prompt, tools, bool(tools)),
        info,
        "messages",
    )
    requested = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    # Chat has no default cap in the OpenAI API: the rest of the context is the limit.
    max_tokens = requested if requested is not None else max(1, info.max_model_len - len(ids))
    _check_length(ids, max_tokens, info, "messages")
    return Prepared(
        [ids],
        _sampling(req, max_tokens, info),
        adapter,
        model,
        grammar or tool_grammar,
        parse,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
    )


def _texts(req: CompletionRequest | ChatCompletionRequest | TokenizeRequest) -> list[str]:
    if isinstance(req, ChatCompletionRequest) or getattr(req, "messages", None) is not None:
        return [m.text() for m in req.messages]
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    return [p for p in prompt or () if isinstance(p, str)]


def check_prompt_chars(
    req: CompletionRequest | ChatCompletionRequest | TokenizeRequest, info: ModelInfo
) -> None:
    """Refuse, before tokenizing, a prompt (or a chat's messages together) of more
    characters than ``max_model_len`` tokens can hold; cheap, on the event loop."""
    limit = info.max_model_len * MAX_CHARS_PER_TOKEN
    texts = _texts(req)
    each = isinstance(req, CompletionRequest)  # several prompts: each is one sequence
    for size in [len(t) for t in texts] if each else [sum(map(len, texts))]:
        if size > limit:
            param = "messages" if getattr(req, "messages", None) is not None else "prompt"
            raise APIError(
                400,
                f"This model's maximum context length is {info.max_model_len} tokens; the "
                f"prompt has {size} characters, more than the {limit} that many tokens can "
                f"span ({MAX_CHARS_PER_TOKEN} characters per token at most); it was refused "
                "without tokenizing",
                param=param,
                code="context_length_exceeded",
            )


def tokenize_ids(req: TokenizeRequest, info: ModelInfo, tokenizer) -> list[int]:
    resolve_model(req.model, info)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "Give exactly one of `prompt` and `messages`", param="prompt")
    if req.prompt is not None:
        return tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return chat_prompt(req.messages, tokenizer, req.add_generation_prompt)
