"""What every layer of one forward pass shares: rotary tables at each token's
position, the attention pattern, and the cache writer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ds_model.unpad import Padding

__all__ = ["ForwardContext"]


@dataclass
class ForwardContext:
    """``cos``/``sin``: (batch, seqlen, 1, rope_dim / 2), gathered at each token's position.

    At most one batch layout applies: ``padding`` (``ds_model.unpad.Padding``) for padded
    batches, run as varlen attention over the real tokens; ``cu_seqlens`` (cu_q, cu_k)
    for packed ragged batches (the runner); ``mask`` (batch, 1, seqlen_q, seqlen_k) bool,
    an arbitrary caller-built visibility mask (torch SDPA); or none of them (plain
    causal, bottom-right aligned). ``cache`` is a writer from ``ds_model.cache`` or
    ``None``.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None = None
    padding: Padding | None = None
    cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None
    window: tuple[int | None, int | None] | None = None
    cache: Any = None
    history: bool = False  # True when some key precedes the new tokens (decode)
    backend: str | None = None  # ds-attention backend name; None: its default
