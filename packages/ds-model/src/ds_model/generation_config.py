"""transformers' generation keywords and a checkpoint's ``generation_config.json``,
resolved into what ``generate`` / ``stream`` run with.

Precedence: a keyword the caller passes, then the checkpoint's
``generation_config.json`` (read by ``from_pretrained`` into
``model.generation_config``), then ds-model's defaults (32 new tokens, greedy).

- ``max_length`` counts the prompt, as in transformers (the longest prompt of a batch):
  ``max_new_tokens`` wins when both are given.
- ``do_sample=False`` is greedy whatever the temperature; ``do_sample=True`` samples at
  ``temperature`` (1.0 when none is given). Without ``do_sample`` a temperature above 0
  samples and 0 is greedy.
- ``eos_token_id`` (an id or a list) adds stop ids; ``pad_token_id`` is checked and
  otherwise unused: outputs are per-row lists, never padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ds_model.sampling import SamplingParams

__all__ = ["GENERATION_CONFIG_FILE", "KEYWORDS", "Settings", "resolve"]

GENERATION_CONFIG_FILE = "generation_config.json"
# The keywords resolved here (generate's and stream's, beside prompt, stop and the
# decode-step switches).
KEYWORDS = (
    "max_new_tokens",
    "max_length",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "eos_token_id",
    "pad_token_id",
)
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int
    params: SamplingParams
    stop_ids: frozenset[int]


def resolve(model: Any, longest_prompt: int, given: dict[str, Any]) -> Settings:
    """``given``: the keywords the caller passed (``None`` = not passed)."""
    saved = getattr(model, "generation_config", None) or {}

    def pick(name: str, default: Any = None) -> Any:
        if given.get(name) is not None:
            return given[name]
        return saved.get(name, default)

    vocab = model.config.vocab_size
    max_new = given.get("max_new_tokens")
    if max_new is None and given.get("max_length") is not None:
        max_new = _new_from_length(given["max_length"], longest_prompt, "max_length")
    if max_new is None:
        max_new = saved.get("max_new_tokens")
    if max_new is None and saved.get("max_length") is not None:
        max_new = _new_from_length(
            saved["max_length"], longest_prompt, "generation_config.json max_length"
        )
    if max_new is None:
        max_new = DEFAULT_MAX_NEW_TOKENS

    do_sample = pick("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be True or False, got {do_sample!r}")
    temperature = pick("temperature")
    if do_sample is False:
        temperature = 0.0
    elif do_sample is True:
        temperature = 1.0 if temperature is None else temperature
        if not temperature > 0:
            raise ValueError(
                f"do_sample=True needs temperature > 0, got temperature={temperature!r}"
            )
    elif temperature is None:
        temperature = 0.0
    top_k = pick("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0 disables it)")
    params = SamplingParams(
        temperature=temperature,
        top_p=pick("top_p", 1.0),
        top_k=top_k,
        repetition_penalty=pick("repetition_penalty", 1.0),
    )
    _token_id(pick("pad_token_id"), "pad_token_id", vocab)
    eos = pick("eos_token_id")
    eos_ids = eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    for token in eos_ids:
        _token_id(token, "eos_token_id", vocab)
    return Settings(max_new, params, frozenset(eos_ids))


def _new_from_length(max_length: Any, longest_prompt: int, name: str) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(f"{name} must be an int, got {max_length!r}")
    if max_length <= longest_prompt:
        raise ValueError(
            f"{name}={max_length} counts the prompt (transformers' meaning) and leaves no "
            f"room after a prompt of {longest_prompt} tokens; raise it or use max_new_tokens"
        )
    return max_length - longest_prompt


def _token_id(token: Any, name: str, vocab: int) -> None:
    if token is None:
        return
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
        raise ValueError(f"{name}={token!r} must be a token id in [0, {vocab})")
