"""A generation request and the state the scheduler keeps on it."""

from __future__ import annotations

import enum
import operator
import time
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["FinishReason", "Request", "RequestStatus"]

# The largest token id accepted (prompts, EOS / stop ids, sampled tokens): the engine
# puts token ids into int64 tensors.
MAX_TOKEN_ID = 2**63 - 1
_INT_ONLY = {int}


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again; its KV was dropped and will be recomputed
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a request ended; equal to the OpenAI ``finish_reason`` strings."""

    STOP = "stop"  # sampled its EOS or one of its stop token ids
    LENGTH = "length"  # produced max_tokens tokens
    ABORT = "abort"  # abort(request_id) was called

    def __str__(self) -> str:
        return self.value


def token_id(token: object, name: str, key: object) -> int:
    """``token`` as a plain int token id in [0, MAX_TOKEN_ID]; a bad one raises, naming
    it ``name[key]`` (``key`` shown as its repr)."""
    try:
        value = operator.index(token)
    except TypeError:
        raise TypeError(
            f"{name}[{key!r}] must be an int token id, got {type(token).__name__} {token!r}"
        ) from None
    if not 0 <= value <= MAX_TOKEN_ID:
        raise ValueError(f"{name}[{key!r}] must be a token id in [0, 2**63), got {value}")
    return value


def _token_list(name: str, tokens: object) -> list[int]:
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Iterable):
        raise TypeError(f"{name} must be a sequence of int token ids, got {type(tokens).__name__}")
    out = list(tokens)
    # At C speed for the common case, plain ints in range; else each token by index.
    if out and (set(map(type, out)) != _INT_ONLY or min(out) < 0 or max(out) > MAX_TOKEN_ID):
        out = [token_id(token, name, i) for i, token in enumerate(out)]
    return out


class Request:
    """One generation request.

    ``prompt_token_ids`` are fed to the model; generation stops after ``max_tokens``
    sampled tokens, on ``eos_token_id`` (None: no EOS) or on any ``stop_token_ids``
    (the stopping token is part of the output). ``sampling_params`` is carried
    untouched for the engine's sampler; ``lora_name`` names the adapter to run with
    (it also keys the prefix cache, since KV differs per adapter). Under the
    ``priority`` policy a lower ``priority`` value is served first.
    ``skip_prefix_cache`` computes the whole prompt even when a cached prefix exists
    (its blocks are still published): an engine that scores every prompt token needs
    the logits of every prompt position.

    Once the request is added, the scheduler updates ``status``, ``finish_reason``,
    ``num_computed_tokens``, ``num_cached_tokens``, ``num_preemptions``, ``block_table``
    (the KV blocks it holds) and appends sampled tokens to ``all_token_ids``; its own
    bookkeeping stays in the scheduler.
    """

    __slots__ = (
        "all_token_ids",
        "arrival_time",
        "block_table",
        "eos_token_id",
        "finish_reason",
        "lora_name",
        "max_tokens",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_preemptions",
        "num_prompt_tokens",
        "priority",
        "request_id",
        "sampling_params",
        "skip_prefix_cache",
        "status",
        "stop_token_ids",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        *,
        eos_token_id: int | None = None,
        stop_token_ids: Iterable[int] = (),
        sampling_params: Any = None,
        lora_name: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        skip_prefix_cache: bool = False,
    ) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise TypeError(f"request_id must be a non-empty str, got {request_id!r}")
        prompt = _token_list("prompt_token_ids", prompt_token_ids)
        if not prompt:
            raise ValueError(
                f"prompt_token_ids of request {request_id!r} is empty; need >= 1 token"
            )
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if eos_token_id is not None:
            eos_token_id = _token_list("eos_token_id", [eos_token_id])[0]
        if lora_name is not None and not isinstance(lora_name, str):
            raise TypeError(f"lora_name must be a str or None, got {type(lora_name).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, got {priority!r}")
        self.request_id = request_id
        self.all_token_ids = prompt  # prompt followed by every sampled token
        self.num_prompt_tokens = len(prompt)
        self.max_tokens = max_tokens
        self.eos_token_id = eos_token_id
        self.stop_token_ids = frozenset(_token_list("stop_token_ids", stop_token_ids))
        self.sampling_params = sampling_params
        self.lora_name = lora_name
        self.priority = priority
        self.skip_prefix_cache = bool(skip_prefix_cache)
        self.arrival_time = time.monotonic() if arrival_time is None else float(arrival_time)
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (or being written)
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.num_preemptions = 0
        self.block_table: list[int] = []

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.all_token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, "
            f"prompt={self.num_prompt_tokens}, output={self.num_output_tokens}/{self.max_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
