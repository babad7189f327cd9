"""Per-request sampling: temperature, top-k, top-p and a per-request seeded generator.

Every request carries its own ``torch.Generator``; one draw is made from it per
generated token, so a seeded request produces the same tokens whatever else shares its
batch. Temperature 0 is greedy (argmax), which is what makes the server's output equal
to ``ds-model generate`` for the same prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

__all__ = ["SamplingParams", "sample"]


@dataclass(frozen=True)
class SamplingParams:
    """What one sequence is sampled with. ``top_k <= 0`` and ``top_p == 1`` disable them.

    ``seed`` None draws a fresh seed, so unseeded requests still differ from each other.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        generator = torch.Generator()
        seed = self.seed if self.seed is not None else random.getrandbits(63)
        generator.manual_seed(seed % (2**63))
        object.__setattr__(self, "generator", generator)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` (vocab,) with the tokens outside top-k / the top-p nucleus set to -inf."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token while the mass before it is below top_p: the top token always stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams]) -> list[int]:
    """One token per row. ``logits``: (num_seqs, vocab), any float dtype; row i uses params[i]."""
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(
            f"logits must be (num_seqs, vocab) with num_seqs == len(params) == {len(params)}, "
            f"got shape {tuple(logits.shape)}"
        )
    logits = logits.float()
    tokens = logits.max(dim=-1).indices.tolist()  # = argmax, 3x faster on CPU
    for row, p in enumerate(params):
        if p.greedy:
            continue
        row_logits = _filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row_logits, dim=-1)
        tokens[row] = int(torch.multinomial(probs, 1, generator=p.generator).item())
    return tokens
