"""Chained content hashes of full KV blocks, the keys of the prefix cache.

A block's hash covers its parent block's hash, its own token ids and an extra key
(the LoRA adapter name: the same tokens under another adapter give different KV).
Because the parent hash is chained in, equal hashes mean equal *prefixes*, not just
equal blocks, so a hit on block ``i`` implies hits on blocks ``0..i-1``.

We use BLAKE2b with a 16-byte digest rather than Python's ``hash``: a collision would
silently hand one request another request's KV, and 128 bits make that negligible,
while ``hash`` of a tuple is only 64 bits and structured.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

__all__ = ["BlockHash", "hash_block_tokens", "hash_full_blocks"]

BlockHash = bytes

_ROOT = b"ds-batching-root"


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_key: str | None = None
) -> BlockHash:
    """Hash of one full block: ``H(parent_hash, token_ids, extra_key)``."""
    h = hashlib.blake2b(parent_hash if parent_hash is not None else _ROOT, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    if extra_key is not None:
        h.update(b"\x00lora:" + extra_key.encode())
    return h.digest()


def hash_full_blocks(
    token_ids: Sequence[int],
    block_size: int,
    hashes: list[BlockHash],
    extra_key: str | None = None,
    limit_tokens: int | None = None,
) -> list[BlockHash]:
    """Extend ``hashes`` (the chain so far, in place) over every full block of ``token_ids``.

    Only blocks that end at or before ``limit_tokens`` (default: all tokens) are hashed.
    Returns ``hashes``.
    """
    end = len(token_ids) if limit_tokens is None else min(limit_tokens, len(token_ids))
    start = len(hashes) * block_size
    parent = hashes[-1] if hashes else None
    while start + block_size <= end:
        parent = hash_block_tokens(parent, token_ids[start : start + block_size], extra_key)
        hashes.append(parent)
        start += block_size
    return hashes
