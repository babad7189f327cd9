"""Padded batch <-> packed variable-length rows, as flash-attn's ``unpad_input`` /
``pad_input`` (and transformers' FlashAttention-2 path) do it.

A padded batch has ``batch`` rows of ``seqlen_k`` key slots: the cached slots, then the
``seqlen_q`` new ones (queries are always the last ``seqlen_q`` slots). ``key_valid``
(batch, seqlen_k) bool marks the real tokens; padding may sit anywhere (left, right,
or in cache slots written by an earlier padded call).

``Padding.unpad_q`` gathers the real queries of (batch, seqlen_q, heads, d) into
(1, total_q, heads, d), ``unpad_k`` the real keys/values of (batch, seqlen_k, heads, d)
into (1, total_k, heads, d), row after row, which is ds-attention's varlen layout with
``cu_seqlens=(cu_seqlens_q, cu_seqlens_k)``. ``pad_q`` scatters (1, total_q, heads, d)
back to (batch, seqlen_q, heads, d) with zeros in the padding slots.

Every real query is also a real key, and the new slots come after the cached ones, so
a row's real queries are its last ``len_q`` real keys: varlen's bottom-right-aligned
causal mask (and window) over real tokens is exactly the padded row's pattern, with
positions counted over real tokens as the model counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Padding"]


@dataclass(frozen=True)
class Padding:
    """Where the real tokens of a padded batch are. ``q_index``: (rows, slots), two
    (total_q,) int64 tensors indexing (batch, seqlen_q); ``k_index`` likewise (total_k,)
    into (batch, seqlen_k); ``cu_seqlens_q`` / ``cu_seqlens_k`` (batch + 1,) int32."""

    q_index: tuple[torch.Tensor, torch.Tensor]
    k_index: tuple[torch.Tensor, torch.Tensor]
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    batch: int
    seqlen_q: int
    seqlen_k: int
    total_q: int  # real queries in the whole batch (0: nothing to attend)
    key_valid: torch.Tensor  # (batch, seqlen_k) bool, as given

    @classmethod
    def from_key_valid(cls, key_valid: torch.Tensor, seqlen_q: int) -> Padding:
        """``key_valid`` (batch, seqlen_k) bool, the new tokens being its last ``seqlen_q``
        slots. Built once per forward pass and shared by every layer."""
        if key_valid.dim() != 2 or key_valid.dtype != torch.bool:
            raise ValueError(
                f"key_valid must be a (batch, seqlen_k) bool tensor, got shape "
                f"{tuple(key_valid.shape)} dtype {key_valid.dtype}"
            )
        batch, seqlen_k = key_valid.shape
        if not 1 <= seqlen_q <= seqlen_k:
            raise ValueError(f"seqlen_q must be in 1..seqlen_k={seqlen_k}, got {seqlen_q}")
        query_valid = key_valid[:, seqlen_k - seqlen_q :]

        def cumulative(valid: torch.Tensor) -> torch.Tensor:
            return F.pad(valid.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))

        cu_q = cumulative(query_valid)
        return cls(
            q_index=query_valid.nonzero(as_tuple=True),
            k_index=key_valid.nonzero(as_tuple=True),
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cumulative(key_valid),
            batch=batch,
            seqlen_q=seqlen_q,
            seqlen_k=seqlen_k,
            total_q=int(cu_q[-1]),
            key_valid=key_valid,
        )

    @property
    def cu_seqlens(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cu_seqlens_q, self.cu_seqlens_k

    def unpad_q(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen_q, ...) -> (1, total_q, ...): the real queries, packed."""
        return _gather(x, self.q_index, self.batch, self.seqlen_q, "query")

    def unpad_k(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen_k, ...) -> (1, total_k, ...): the real keys (or values), packed."""
        return _gather(x, self.k_index, self.batch, self.seqlen_k, "key/value")

    def pad_q(self, x: torch.Tensor) -> torch.Tensor:
        """(1, total_q, ...) -> (batch, seqlen_q, ...), zeros where the query is padding."""
        out = x.new_zeros(self.batch, self.seqlen_q, *x.shape[2:])
        return out.index_put(self.q_index, x[0])  # out of place: differentiable


def _gather(x: torch.Tensor, index, batch: int, seqlen: int, what: str) -> torch.Tensor:
    if tuple(x.shape[:2]) != (batch, seqlen):
        raise ValueError(
            f"{what} tensor must be (batch, seqlen, ...) = ({batch}, {seqlen}, ...) to match "
            f"the padding mask, got shape {tuple(x.shape)}"
        )
    # Advanced indexing reads only the real slots, even of a strided cache view.
    return x[index].unsqueeze(0)
