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

import functools
import hashlib
import struct
from collections.abc import Sequence

__all__ = ["BlockHash", "hash_block_tokens", "hash_full_blocks"]

BlockHash = bytes

_ROOT = b"ds-batching-root"
MAX_TOKEN_ID = 2**63 - 1  # token ids are hashed as signed 64-bit integers


@functools.lru_cache(maxsize=64)
def _packer(num_tokens: int):
    return struct.Struct(f"<{num_tokens}q").pack


@functools.lru_cache(maxsize=256)
def _extra_bytes(extra_key: str | None) -> bytes:
    return b"" if extra_key is None else b"\x00lora:" + extra_key.encode()


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_key: str | None = None
) -> BlockHash:
    """Hash of one full block: ``H(parent_hash, token_ids, extra_key)``."""
    payload = (parent_hash if parent_hash is not None else _ROOT) + _packer(len(token_ids))(
        *token_ids
    )
    return hashlib.blake2b(payload + _extra_bytes(extra_key), digest_size=16).digest()


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
    if start + block_size > end:
        return hashes
    # hash_block_tokens inlined (same bytes): this runs once per block per request, in
    # the scheduler's update(), so the per-call lookups are hoisted out of the loop.
    pack = _packer(block_size)
    extra = _extra_bytes(extra_key)
    blake2b = hashlib.blake2b
    parent = hashes[-1] if hashes else _ROOT
    while start + block_size <= end:
        parent = blake2b(
            parent + pack(*token_ids[start : start + block_size]) + extra, digest_size=16
        ).digest()
        hashes.append(parent)
        start += block_size
    return hashes
