"""The sampler: one batched draw per row of a step's logits, with vLLM's parameters.

``sample(logits, params, ...)`` turns a (rows, vocab) block of next-token logits into
one token per row, every row with its own ``SamplingParams``. Everything runs as whole
tensor operations over the rows; the only Python work per step is reading each row's
parameters into a handful of (rows,) tensors.

The order is vLLM's: ``allowed`` mask, ``logit_bias`` and the ``min_tokens`` block on
stop tokens; then the repetition, frequency and presence penalties; then temperature.
The reported logprobs are ``log_softmax`` of those processed logits (temperature 0
divides by nothing), so they describe the distribution the token was drawn from
before the ``min_p`` / ``top_k`` / ``top_p`` truncation; with no penalties and
temperature 0 or 1 they are the model's own log-probabilities. Then ``min_p``,
``top_k`` and ``top_p`` filter, and temperature 0 rows take the argmax.

``top_p`` keeps a token while the probability mass of the tokens ranked above it is
below ``top_p`` (vLLM's rule; the top token always stays), over the top-k distribution
when ``top_k`` is set. ``top_k`` keeps the k largest logits (ties at the k-th are
broken by ``torch.topk``'s order). Both filter among the likeliest
``NUCLEUS_CANDIDATES`` tokens found by one ``topk`` and fall back to a full sort only
when a nucleus is wider than that.

Random draws are counter-based: row ``i`` draws one uniform number from a hash of its
seed and the number of tokens it has generated so far (``len(output_ids[i])``), and
takes the token where that number falls in the cumulative distribution. A seeded row
therefore gives the same token whatever shares its batch, with no generator state and
no per-row loop; an unseeded ``SamplingParams`` draws a random seed when it is made.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Sampled", "SamplingParams", "sample"]

_MAX_LOGPROBS = 1024


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled and when it stops (vLLM's names and defaults).

    ``temperature=0`` is greedy. ``top_k`` 0 or -1 and ``top_p=1`` disable those
    filters; ``min_p=0`` disables it. ``repetition_penalty`` (> 0, 1 = off) divides
    positive and multiplies negative logits of tokens seen in the prompt or output;
    ``frequency_penalty`` subtracts ``count * value`` and ``presence_penalty`` subtracts
    ``value`` for tokens in the output. ``logit_bias`` maps token ids to values added to
    their logits. ``min_tokens`` blocks ``stop_token_ids`` until that many tokens are
    generated. ``logprobs``: how many top alternatives to report per generated token
    (0: only the chosen token's); ``prompt_logprobs`` the same for prompt tokens
    (``None``: none). ``max_tokens``, ``stop``, ``stop_token_ids`` and ``ignore_eos``
    are read by whoever runs the generation loop. ``seed`` None draws a fresh seed.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # The seed the draws use: ``seed``, or a random one when ``seed`` is None.
    draw_seed: int = field(init=False, repr=False, compare=False)
    _bias: tuple[torch.Tensor, torch.Tensor] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _number("temperature", self.temperature, low=0.0)
        _number("top_p", self.top_p, low=0.0, high=1.0, open_low=True)
        _integer("top_k", self.top_k, low=-1)
        _number("min_p", self.min_p, low=0.0, high=1.0)
        _number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _number("repetition_penalty", self.repetition_penalty, low=0.0, open_low=True)
        _integer("max_tokens", self.max_tokens, low=0)
        _integer("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _integer(name, value, low=0, high=_MAX_LOGPROBS)
        for t in self.stop_token_ids:
            _integer("stop_token_ids", t, low=0)
        bias = None
        if self.logit_bias:
            ids = [_integer("logit_bias token id", int(t), low=0) for t in self.logit_bias]
            values = [_number("logit_bias value", float(v)) for v in self.logit_bias.values()]
            bias = (torch.tensor(ids, dtype=torch.long), torch.tensor(values))
        object.__setattr__(self, "_bias", bias)
        if self.seed is not None:
            _integer("seed", self.seed, low=-(2**63), high=2**63 - 1)
        seed = self.seed if self.seed is not None else random.getrandbits(63)
        object.__setattr__(self, "draw_seed", seed % (2**63))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def _plain(self) -> bool:
        """True when the logits need no processing before the argmax or the draw."""
        return (
            self._bias is None
            and self.min_tokens == 0
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
            and self.repetition_penalty == 1.0
        )


def _number(name: str, value, low=None, high=None, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name}={value!r} must be a number")
    if low is not None and (value <= low if open_low else value < low):
        raise ValueError(f"{name}={value!r} must be {'>' if open_low else '>='} {low}")
    if high is not None and value > high:
        raise ValueError(f"{name}={value!r} must be <= {high}")
    return float(value)


def _integer(name: str, value, low=None, high=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an int")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(
            f"{name}={value!r} must be in [{low}, {high if high is not None else 'inf'}]"
        )
    return value


@dataclass(frozen=True)
class Sampled:
    """What ``sample`` returns. ``token_ids``: (rows,) long. When any row asked for
    logprobs: ``logprobs`` (rows,) float32, the chosen token's log-probability, and
    ``top_ids`` / ``top_logprobs`` (rows, k), the k most likely tokens of each row
    (k = the largest ``logprobs`` asked; a row asking fewer reads its first columns).
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    *,
    output_ids: Sequence[Sequence[int]] | None = None,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    allowed: torch.Tensor | None = None,
) -> Sampled:
    """One token per row of ``logits`` (rows, vocab); row ``i`` uses ``params[i]``.

    ``output_ids[i]``: the tokens row ``i`` has generated so far (the penalties, the
    ``min_tokens`` block and the draw's counter read it; None: nothing yet).
    ``prompt_ids[i]``: its prompt, which ``repetition_penalty`` also counts (None: the
    penalty sees the output only).
    ``allowed``: an optional (rows, vocab) bool mask, True = the token may be chosen,
    applied before everything else (grammar-constrained decoding feeds its masks
    here); a row that allows no token is a ``ValueError``.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(
            f"logits must be (rows, vocab) with rows == len(params) == {len(params)}, "
            f"got shape {tuple(logits.shape)}"
        )
    rows, vocab = logits.shape
    for name, lists in (("output_ids", output_ids), ("prompt_ids", prompt_ids)):
        if lists is not None and len(lists) != rows:
            raise ValueError(f"{name} must have one entry per row ({rows}), got {len(lists)}")
    want_logprobs = [p.logprobs for p in params if p.logprobs is not None]
    if allowed is None and not want_logprobs and all(p.greedy and p._plain for p in params):
        # max's indices are argmax's (the first of tied maxima, NaN counting as the
        # largest) at a third of the time on CPU.
        return Sampled(logits.max(dim=-1).indices)
    x = logits.float().clone()
    if allowed is not None:
        _apply_allowed(x, allowed)
    _apply_logit_bias(x, params)
    _apply_min_tokens(x, params, output_ids)
    _apply_penalties(x, params, output_ids, prompt_ids)
    temperatures = [p.temperature if p.temperature > 0 else 1.0 for p in params]
    if any(t != 1.0 for t in temperatures):
        x /= torch.tensor(temperatures, device=x.device)[:, None]
    tokens = x.max(dim=-1).indices
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        chosen = [params[i] for i in drawn]
        index = torch.tensor(drawn, device=x.device)
        filtered = _filter(x[index], chosen)
        steps = [len(output_ids[i]) if output_ids is not None else 0 for i in drawn]
        uniforms = _uniforms([p.draw_seed for p in chosen], steps).to(x.device)
        tokens[index] = _inverse_cdf(filtered.softmax(dim=-1), uniforms)
    if not want_logprobs:
        return Sampled(tokens)
    logprobs = x.log_softmax(dim=-1)
    k = min(max(want_logprobs), vocab)
    top = logprobs.topk(k, dim=-1) if k > 0 else None
    return Sampled(
        tokens,
        logprobs.gather(1, tokens[:, None])[:, 0],
        top.indices if top is not None else tokens.new_zeros(rows, 0),
        top.values if top is not None else logprobs.new_zeros(rows, 0),
    )


def _apply_allowed(x: torch.Tensor, allowed: torch.Tensor) -> None:
    if allowed.dtype != torch.bool or tuple(allowed.shape) != tuple(x.shape):
        raise ValueError(
            f"allowed must be a bool tensor of shape {tuple(x.shape)} (rows, vocab), got "
            f"{allowed.dtype} {tuple(allowed.shape)}"
        )
    allowed = allowed.to(x.device)
    empty = (~allowed.any(dim=-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"allowed rows {empty} permit no token; each row needs at least one")
    x.masked_fill_(~allowed, float("-inf"))


def _apply_logit_bias(x: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    biased = [(i, p._bias) for i, p in enumerate(params) if p._bias is not None]
    if not biased:
        return
    ids = torch.cat([b[0] for _, b in biased]).to(x.device)
    if int(ids.max()) >= x.shape[1]:
        raise ValueError(f"logit_bias token ids must be < the vocabulary size {x.shape[1]}")
    row = torch.cat([torch.full_like(b[0], i) for i, b in biased]).to(x.device)
    x.index_put_((row, ids), torch.cat([b[1] for _, b in biased]).to(x.device), accumulate=True)


def _apply_min_tokens(x, params, output_ids) -> None:
    blocked = [
        (i, p.stop_token_ids)
        for i, p in enumerate(params)
        if p.min_tokens
        and p.stop_token_ids
        and (0 if output_ids is None else len(output_ids[i])) < p.min_tokens
    ]
    if not blocked:
        return
    row = [i for i, ids in blocked for _ in ids]
    col = [t for _, ids in blocked for t in ids]
    x[torch.tensor(row, device=x.device), torch.tensor(col, device=x.device)] = float("-inf")


def _token_counts(lists: Sequence[Sequence[int]], rows: list[int], vocab: int, device):
    """(len(rows), vocab) counts of each row's tokens, by one bincount over all of them."""
    tensors = [torch.as_tensor(lists[i], dtype=torch.long) for i in rows]
    lengths = torch.tensor([len(t) for t in tensors])
    flat = torch.cat(tensors) if tensors else torch.zeros(0, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    counts = torch.bincount(owner * vocab + flat, minlength=len(rows) * vocab)
    return counts.view(len(rows), vocab).to(device)


def _apply_penalties(x, params, output_ids, prompt_ids) -> None:
    rows = [
        i
        for i, p in enumerate(params)
        if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
    ]
    if not rows:
        return
    vocab, dev = x.shape[1], x.device
    empty: list[list[int]] = [[] for _ in params]
    out_counts = _token_counts(output_ids or empty, rows, vocab, dev)
    chosen = [params[i] for i in rows]
    index = torch.tensor(rows, device=dev)
    sub = x[index]
    rep = torch.tensor([p.repetition_penalty for p in chosen], device=dev)[:, None]
    if bool((rep != 1.0).any()):
        seen = out_counts > 0
        if prompt_ids is not None:
            seen |= _token_counts(prompt_ids, rows, vocab, dev) > 0
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalised, sub)
    freq = torch.tensor([p.frequency_penalty for p in chosen], device=dev)[:, None]
    pres = torch.tensor([p.presence_penalty for p in chosen], device=dev)[:, None]
    sub = sub - freq * out_counts - pres * (out_counts > 0)
    x[index] = sub


# How many of the likeliest tokens a top-p row is first filtered among: the nucleus is
# nearly always far smaller, and a top-k over the vocabulary costs a fraction of a full
# sort (which runs only when some row's nucleus is wider than this).
NUCLEUS_CANDIDATES = 1024


def _filter(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """``x`` with the tokens outside min_p, top-k and the top-p nucleus set to -inf."""
    dev = x.device
    min_p = [p.min_p for p in params]
    if any(min_p):
        probs = x.softmax(dim=-1)
        floor = torch.tensor(min_p, device=dev)[:, None] * probs.max(dim=-1, keepdim=True).values
        x = x.masked_fill(probs < floor, float("-inf"))
    vocab = x.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    ps = [p.top_p for p in params]
    if all(k == vocab for k in ks) and all(p >= 1.0 for p in ps):
        return x
    top_k = torch.tensor(ks, device=dev)
    top_p = torch.tensor(ps, device=dev)
    limited = [k for k in ks if k < vocab]
    unlimited = len(limited) < len(ks)
    width = min(vocab, max([*limited, NUCLEUS_CANDIDATES if unlimited else 0]))
    values, order = x.topk(width, dim=-1)  # sorted, largest first
    kept = _keep(values, top_k, top_p, x.logsumexp(dim=-1, keepdim=True))
    if kept is None:  # some nucleus is wider than the candidates: sort everything
        values, order = x.sort(dim=-1, descending=True)
        kept = _keep(values, top_k, top_p, None)
    out = torch.full_like(x, float("-inf")).scatter_(
        1, order, values.masked_fill(~kept, float("-inf"))
    )
    # Rows with neither filter keep every token (their candidates were cut at width).
    open_rows = (top_k == vocab) & (top_p >= 1.0)
    return torch.where(open_rows[:, None], x, out) if bool(open_rows.any()) else out


def _keep(values, top_k, top_p, full_norm):
    """Which of each row's candidates (``values``, sorted descending) survive top-k
    (the first k columns) and top-p (mass ranked above below top_p, over the top-k
    renormalised distribution, or over the whole vocabulary without top-k); None when
    a candidate set misses part of a row's nucleus."""
    width = values.shape[1]
    kept = torch.arange(width, device=values.device)[None, :] < top_k[:, None]
    if not bool((top_p < 1.0).any()):
        return kept
    masked = values.masked_fill(~kept, float("-inf"))
    norm = masked.logsumexp(dim=-1, keepdim=True)
    if full_norm is not None:
        limited = (top_k <= width)[:, None]
        norm = torch.where(limited, norm, full_norm)
    probs = (masked - norm).exp()
    cumulative = probs.cumsum(dim=-1)
    if full_norm is not None:
        # A row's whole nucleus lies among its candidates once their mass reaches top_p.
        complete = (cumulative[:, -1] >= top_p) | (top_k <= width) | (top_p >= 1.0)
        if not bool(complete.all()):
            return None
    return kept & ((cumulative - probs) < top_p[:, None])


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors (products stay below 2**59: no overflow)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def _uniforms(seeds: list[int], steps: list[int]) -> torch.Tensor:
    """One float64 in [0, 1) per row from (seed, step): 53 bits of two chained hashes."""
    seed = torch.tensor(seeds, dtype=torch.long)
    step = torch.tensor(steps, dtype=torch.long)
    h = _mix32((seed & _MASK32) ^ _mix32((seed >> 32) ^ _mix32(step + 0x9E3779B9)))
    h2 = _mix32(h ^ 0x5BD1E995)
    return ((h >> 6) * 2**27 + (h2 >> 5)).double() / 2**53


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Row i's token where ``uniforms[i]`` falls in its cumulative distribution."""
    cdf = probs.double().cumsum(dim=-1)
    target = (uniforms[:, None] * cdf[:, -1:]).contiguous()
    index = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[1] - 1)
    # Rounding at the very top of the cdf can land past the last likely token.
    ok = probs.gather(1, index) > 0
    return torch.where(ok, index, probs.argmax(dim=-1, keepdim=True))[:, 0]
