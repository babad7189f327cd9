"""Autoregressive generation with a static KV cache: greedy, sampled, streamed, batched.

A batch of prompts is left-padded to one length, so every row writes the same cache
slot at every step and a view of one (batch, length) bool of real slots hides the
padding (attention runs varlen over the real tokens, see ``ds_model.unpad``);
positions count real tokens only, so a padded prompt produces exactly what it produces
alone. The decode loop allocates no cache per step.

Prompts: a string or list of strings (needs ``model.tokenizer``), a list of token ids,
a list of lists, or a 1-D/2-D tensor. Results mirror the input: text for text, new
token ids for ids. End-of-sequence and ``stop`` token ids end a row and are not
returned; a ``stop`` string ends a row once the generated text contains it (text
results are cut before it).
"""

from __future__ import annotations

import dataclasses
import random
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ds_model.cache import StaticKVCache
from ds_model.cuda_graph import GraphedDecoder, graphable, static_step_supported
from ds_model.generation_config import KEYWORDS, resolve
from ds_model.mlp import project
from ds_model.sampling import SamplingParams, sample

__all__ = ["generate", "stream"]


@dataclass
class _Prompt:
    rows: list[list[int]]
    kind: str  # "text", "texts", "ids", "batch"


def _normalise(model, prompt: Any) -> _Prompt:
    tok = model.tokenizer
    if isinstance(prompt, str) or (
        isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt)
    ):
        if tok is None:
            raise ValueError(
                "a text prompt needs model.tokenizer (load a directory with tokenizer.json "
                "or tokenizer.model, or pass token ids)"
            )
        if isinstance(prompt, str):
            return _Prompt([tok.encode(prompt)], "text")
        return _Prompt([tok.encode(p) for p in prompt], "texts")
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 1:
            return _Prompt([prompt.tolist()], "ids")
        if prompt.dim() == 2:
            return _Prompt(prompt.tolist(), "batch")
        raise ValueError(f"prompt tensor must be 1-D or 2-D, got shape {tuple(prompt.shape)}")
    if isinstance(prompt, Sequence) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return _Prompt([list(prompt)], "ids")
        if all(isinstance(r, Sequence) and not isinstance(r, str) for r in prompt):
            return _Prompt([list(r) for r in prompt], "batch")
    raise TypeError(
        "prompt must be a str, a list of str, a list of token ids, a list of such lists or "
        f"a 1-D/2-D tensor; got {type(prompt).__name__}"
    )


def _stop_sets(model, stop: Any) -> tuple[set[int], list[str]]:
    ids = set(model.config.eos_token_ids)
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    strings: list[str] = []
    items = [] if stop is None else [stop] if isinstance(stop, (int, str)) else list(stop)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise TypeError(f"stop items must be token ids or strings, got {item!r}")
        if isinstance(item, int):
            ids.add(item)
        elif item:
            if model.tokenizer is None:
                raise ValueError(f"stop string {item!r} needs model.tokenizer")
            strings.append(item)
    return ids, strings


def _steps(
    model,
    rows: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams,
    stop_ids: set[int],
    stop_strings: list[str],
    seed: int | None,
    cuda_graph: bool | None = None,
    compile: bool = False,
) -> Iterator[list[int | None]]:
    """Yields, per decode step, each row's new token (``None`` once the row is done)."""
    config = model.config
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise ValueError("every prompt needs at least one token")
    longest = max(lengths)
    context = config.max_position_embeddings
    if longest > context:
        raise ValueError(
            f"prompt of {longest} tokens is longer than the model's context "
            f"(max_position_embeddings={context})"
        )
    if longest + max_new_tokens > context:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
            f"model's context (max_position_embeddings={context})"
        )
    for r in rows:
        bad = [t for t in r if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {config.vocab_size})"
            )
    if max_new_tokens == 0:
        return
    device, batch = model.device, len(rows)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = torch.full((batch, longest), pad, dtype=torch.long, device=device)
    key_valid = torch.ones(batch, longest + max_new_tokens, dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        ids[b, longest - len(r) :] = torch.tensor(r, dtype=torch.long)
        key_valid[b, : longest - len(r)] = False
    padded = any(n != longest for n in lengths)
    # Row b draws with seed + b, so the rows of a batch differ and each is reproducible.
    base_seed = seed if seed is not None else random.getrandbits(62)
    row_params = [dataclasses.replace(params, seed=(base_seed + b) % 2**63) for b in range(batch)]
    decoder = _graphed_decoder(model, cuda_graph, compile, batch, longest + max_new_tokens)
    if decoder is not None:
        cache = decoder.cache
        cache.length = 0
        decoder.in_use = True
    else:
        cache = StaticKVCache(config, batch, longest + max_new_tokens, model.dtype, device)
    positions = torch.tensor(lengths, dtype=torch.long, device=device)[:, None]
    done = [False] * batch
    texts = [""] * batch
    generated: list[list[int]] = [[] for _ in rows]
    penalised = rows if params.repetition_penalty != 1.0 else None  # counts the prompt too
    stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    # Inference mode around each computation, never across a ``yield``: a context held
    # open over a yield leaks into the caller, and two interleaved streams would undo
    # each other's (the second resumed outside it).
    try:
        with torch.inference_mode():
            out = model(
                ids,
                attention_mask=key_valid[:, :longest] if padded else None,
                cache=cache,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1]
            if decoder is not None:
                decoder.start(key_valid[:, :longest])
        for i in range(max_new_tokens):
            with torch.inference_mode():
                token = sample(
                    logits, row_params, output_ids=generated, prompt_ids=penalised
                ).token_ids
                is_stop = torch.isin(token, stop_tensor).tolist() if stop_ids else [False] * batch
            token_list = token.tolist()
            step: list[int | None] = []
            for b in range(batch):
                if done[b] or is_stop[b]:
                    done[b] = True
                    step.append(None)
                    continue
                step.append(token_list[b])
                generated[b].append(token_list[b])
                if stop_strings:
                    texts[b] = model.tokenizer.decode(generated[b])
                    if any(s in texts[b] for s in stop_strings):
                        done[b] = True
            yield step
            if all(done) or i == max_new_tokens - 1:
                return
            with torch.inference_mode():
                logits = _next_logits(model, decoder, cache, token, positions, key_valid, padded)
                positions += 1
    finally:
        if decoder is not None:
            decoder.in_use = False


def _next_logits(model, decoder, cache, token, positions, key_valid, padded) -> torch.Tensor:
    """One decode step: each row's ``token`` (batch,) at ``positions`` (batch, 1) ->
    next-token logits (batch, vocab); through the captured/compiled step if any."""
    if decoder is not None:
        return decoder.step(token, positions)
    hidden = model.model(
        token[:, None],
        positions,
        key_valid=key_valid[:, : cache.length + 1] if padded else None,
        cache=cache.writer(1),
        history=True,
    )
    cache.length += 1
    return project(model.lm_head, hidden[:, -1])


# One fixed-shape decode step per model (the latest batch size), dropped with the model.
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _graphed_decoder(
    model, cuda_graph: bool | None, compile: bool, batch: int, needed: int
) -> GraphedDecoder | None:
    """The model's fixed-shape decode step for this batch size (captured as a CUDA
    graph, compiled, or both), kept while it fits (``GraphedDecoder.fits``); ``None``
    for the ordinary eager step."""
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be True, False or None, got {cuda_graph!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    capture = graphable(model) if cuda_graph is None else cuda_graph
    if not capture and not compile:
        return None
    if not static_step_supported(model) or (capture and not graphable(model)):
        flag = "cuda_graph=True" if capture else "compile=True"
        raise ValueError(
            f"{flag} needs a {'CUDA ' if capture else ''}model without sliding_window, a "
            f"forced attention_backend or a per-query attention pattern (device "
            f"{model.device}, sliding_window={model.config.sliding_window}, "
            f"attention_backend={model.config.attention_backend!r}, attention="
            f"{model.config.attention.kind!r})"
        )
    held = _DECODERS.get(model)
    if held is not None and held.in_use:
        # Another generation of this model is mid-way (interleaved streams): its cache
        # must not be shared, so this one gets a decode step of its own, not kept.
        return GraphedDecoder(model, batch, needed, capture=capture, compile=compile)
    if held is not None and held.fits(model, batch, needed, capture, compile):
        return held
    _DECODERS.pop(model, None)  # free the old graph and cache before building anew
    decoder = _DECODERS[model] = GraphedDecoder(
        model, batch, needed, capture=capture, compile=compile
    )
    return decoder


def _prepare(model, prompt: Any, stop: Any, keywords: dict[str, Any]):
    """The prompt's rows, the resolved settings and the stop ids and strings."""
    p = _normalise(model, prompt)
    settings = resolve(model, max((len(r) for r in p.rows), default=0), keywords)
    stop_ids, stop_strings = _stop_sets(model, stop)
    return p, settings, stop_ids | settings.stop_ids, stop_strings


def generate(
    model,
    prompt: Any,
    max_new_tokens: int | None = None,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    stop: int | str | Sequence[int | str] | None = None,
    seed: int | None = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
    max_length: int | None = None,
    do_sample: bool | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> Any:
    """Generate up to ``max_new_tokens`` per prompt (default 32, or the checkpoint's
    ``generation_config.json``). Returns text for text prompts (a list for a list), else
    new token ids (a list of lists for a batch). Greedy unless ``temperature`` > 0 or
    ``do_sample=True``; transformers' keywords (``max_length``, ``do_sample``,
    ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``) mean what they mean there
    (``ds_model.generation_config``).

    ``cuda_graph``: replay each decode step as one captured CUDA graph
    (``ds_model.cuda_graph``); ``None`` does so on CUDA whenever the model allows it,
    ``False`` keeps the eager step. The first call for a batch size captures (a few
    eager steps' time); later calls of that size reuse the graph. ``compile=True`` runs
    that fixed-shape step through ``torch.compile`` on any device, compiled on the first
    call for a batch size (seconds; before any capture); fusing the step's many small
    ops pays off over long or repeated generations."""
    given = {name: value for name, value in locals().items() if name in KEYWORDS}
    p, settings, stop_ids, stop_strings = _prepare(model, prompt, stop, given)
    params, max_new_tokens = settings.params, settings.max_new_tokens
    outs: list[list[int]] = [[] for _ in p.rows]
    steps = _steps(
        model, p.rows, max_new_tokens, params, stop_ids, stop_strings, seed, cuda_graph, compile
    )
    for step in steps:
        for b, t in enumerate(step):
            if t is not None:
                outs[b].append(t)
    if p.kind in ("text", "texts"):
        texts = [_cut(model.tokenizer.decode(o), stop_strings) for o in outs]
        return texts[0] if p.kind == "text" else texts
    return outs[0] if p.kind == "ids" else outs


def _cut(text: str, stop_strings: list[str]) -> str:
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def stream(
    model,
    prompt: Any,
    max_new_tokens: int | None = None,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    stop: int | str | Sequence[int | str] | None = None,
    seed: int | None = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
    max_length: int | None = None,
    do_sample: bool | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> Iterator[Any]:
    """Like ``generate`` but yields as it goes: text pieces for one text prompt, token
    ids for one id prompt, and per-step lists (``None`` for finished rows) for batches."""
    given = {name: value for name, value in locals().items() if name in KEYWORDS}
    p, settings, stop_ids, stop_strings = _prepare(model, prompt, stop, given)
    params, max_new_tokens = settings.params, settings.max_new_tokens
    steps = _steps(
        model, p.rows, max_new_tokens, params, stop_ids, stop_strings, seed, cuda_graph, compile
    )
    if p.kind != "text":
        single = p.kind == "ids"
        for step in steps:
            if single:
                if step[0] is not None:
                    yield step[0]
            else:
                yield step
        return
    tokens: list[int] = []
    sent = ""
    for step in steps:
        if step[0] is None:
            continue
        tokens.append(step[0])
        text = _cut(model.tokenizer.decode(tokens), stop_strings)
        if text.endswith("\ufffd"):
            continue  # an incomplete UTF-8 sequence: wait for the next token
        if len(text) > len(sent):
            yield text[len(sent) :]
            sent = text
    final = _cut(model.tokenizer.decode(tokens), stop_strings) if tokens else ""
    if len(final) > len(sent):
        yield final[len(sent) :]  # bytes that never completed a character
