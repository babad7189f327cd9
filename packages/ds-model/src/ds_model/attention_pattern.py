"""``AttentionPattern``: which keys each query attends to, chosen per model in config.json.

Persisted under our own key ``"attention": {"kind": ..., <its parameters>}``; a config
without the key is ``dense`` (what every published checkpoint uses). Kinds:

- ``dense``: causal attention over every earlier token.
- ``sliding_window`` (``window``): the last ``window`` tokens, the query's own included.
- ``dynamic_window``: the growing window of ds-attention's ``dynamic_attention_mask``,
  per position: the token at position ``p`` sees ``dynamic_window(p + 1) = min(512,
  (p + 1) // 2)`` keys back, which is what the published mask gives the newest token
  of a ``p + 1``-token sequence. Per position, so a KV cache and training agree.
- ``block_sparse`` (``sparse_ratio``, ``block_size``, ``local_blocks``): each query keeps
  the top ``ceil(sparse_ratio * candidates)`` key blocks by its score against each
  block's mean key, plus block 0 and its ``local_blocks`` local blocks (ds-attention's
  ``SparseAttention`` selection, made per query so that it never reads a later token).
- ``nsa`` (``block_size``, ``num_selected``, ``window``): native sparse attention, three
  branches (compressed blocks, ``num_selected`` selected blocks, a sliding window) mixed
  by a learned per-head sigmoid gate, as ds-attention's ``NativeSparseAttention``, with
  the selection per query.
- ``gated``: dense attention mixed with the layer input by a learned per-channel gate,
  ``g * attn(x) + (1 - g) * x`` with ``g = sigmoid(W x + b)`` (ds-attention's
  ``DynamicAttention``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["ATTENTION_KINDS", "AttentionPattern"]

ATTENTION_KINDS = ("dense", "sliding_window", "dynamic_window", "block_sparse", "nsa", "gated")

# Each kind's parameters and their defaults.
_PARAMS: dict[str, dict[str, Any]] = {
    "dense": {},
    "sliding_window": {"window": 512},
    "dynamic_window": {},
    "block_sparse": {"sparse_ratio": 0.25, "block_size": 64, "local_blocks": 1},
    "nsa": {"block_size": 32, "num_selected": 4, "window": 128},
    "gated": {},
}

# Kinds whose attention runs through ds_model.patterns (an explicit per-query selection)
# rather than ds-attention's causal/window call.
MASKED_KINDS = ("dynamic_window", "block_sparse", "nsa")


def _error(message: str) -> Exception:
    from ds_model.config import ConfigError  # config imports this module

    return ConfigError(message)


@dataclass(frozen=True)
class AttentionPattern:
    """One attention pattern and its parameters (``None``: not a parameter of ``kind``)."""

    kind: str = "dense"
    window: int | None = None
    sparse_ratio: float | None = None
    block_size: int | None = None
    local_blocks: int | None = None
    num_selected: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise _error(
                f"attention kind={self.kind!r} is not supported; supported: "
                f"{', '.join(ATTENTION_KINDS)}"
            )
        allowed = _PARAMS[self.kind]
        for name in ("window", "sparse_ratio", "block_size", "local_blocks", "num_selected"):
            value = getattr(self, name)
            if name not in allowed:
                if value is not None:
                    params = ", ".join(allowed) or "none"
                    raise _error(
                        f"attention {name}={value!r} is not a parameter of kind "
                        f"{self.kind!r} (its parameters: {params})"
                    )
                continue
            if value is None:
                object.__setattr__(self, name, allowed[name])
        for name in ("window", "local_blocks", "num_selected"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise _error(f"attention {name}={value!r} must be a positive integer")
        if self.block_size is not None:
            bs = self.block_size
            if not _is_int(bs) or bs < 16 or bs & (bs - 1):
                raise _error(f"attention block_size={bs!r} must be a power of two >= 16")
        if self.sparse_ratio is not None:
            r = self.sparse_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise _error(f"attention sparse_ratio={r!r} must be a number in (0, 1]")
            if not 0 < r <= 1:
                raise _error(f"attention sparse_ratio={r!r} must be in (0, 1]")
            object.__setattr__(self, "sparse_ratio", float(r))

    @property
    def masked(self) -> bool:
        """Whether attention runs through a per-query selection (``ds_model.patterns``)."""
        return self.kind in MASKED_KINDS

    @classmethod
    def parse(cls, raw: Any) -> AttentionPattern:
        """From config.json's ``attention`` value: an object with ``kind``, a kind name,
        an ``AttentionPattern`` or ``None`` (dense)."""
        if raw is None:
            return cls()
        if isinstance(raw, AttentionPattern):
            return raw
        if isinstance(raw, str):
            return cls(kind=raw)
        if not isinstance(raw, dict):
            raise _error(
                f"attention={raw!r}: expected an object with 'kind' (one of "
                f"{', '.join(ATTENTION_KINDS)}), a kind name or null"
            )
        raw = dict(raw)
        kind = raw.pop("kind", "dense")
        if not isinstance(kind, str):
            raise _error(f"attention kind={kind!r}: expected a string")
        if kind not in _PARAMS:
            return cls(kind=kind)  # raises, naming the supported kinds
        unknown = sorted(set(raw) - set(_PARAMS.get(kind, {})))
        if unknown:
            params = ", ".join(_PARAMS[kind]) or "none"
            verb = "is not a parameter" if len(unknown) == 1 else "are not parameters"
            raise _error(
                f"attention {', '.join(unknown)} {verb} of kind {kind!r} (its parameters: {params})"
            )
        return cls(kind=kind, **raw)

    def to_dict(self) -> dict[str, Any]:
        """The ``attention`` object config.json stores: the kind and its parameters."""
        return {"kind": self.kind, **{name: getattr(self, name) for name in _PARAMS[self.kind]}}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
