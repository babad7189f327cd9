"""Exact and near-duplicate removal; the first file of each group (in corpus order) stays.

Exact: SHA-256 of the text with trailing whitespace stripped from every line.

Near: MinHash over 5-token shingles (tokens: identifiers, numbers, single punctuation
characters), 128 hash functions, banded LSH (16 bands of 8 rows: pairs with Jaccard
similarity above ~0.7 share a band with high probability); a candidate is a duplicate
when its estimated Jaccard similarity with a kept file is at least 0.85. Tokens are hashed
with BLAKE2b (stable across runs); the hash functions are ``a * h + b mod 2**64`` with
odd ``a`` (bijections of the 64-bit shingle hash), evaluated with numpy.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import numpy as np

SHINGLE = 5
PERMUTATIONS = 128
BANDS = 16
THRESHOLD = 0.85
TOKEN = re.compile(r"\w+|[^\w\s]")
_MIX = np.uint64(0x9E3779B97F4A7C15)
_rng = np.random.default_rng(0)
_A = _rng.integers(1, 2**63, size=PERMUTATIONS, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_B = _rng.integers(0, 2**63, size=PERMUTATIONS, dtype=np.uint64)
_CHUNK = 1 << 14  # shingles per block of the (permutations x shingles) product


def content_hash(text: str) -> str:
    normal = "\n".join(line.rstrip() for line in text.splitlines())
    return hashlib.sha256(normal.encode()).hexdigest()


class MinHasher:
    """MinHash signatures; token hashes are cached (source code reuses few tokens)."""

    def __init__(self) -> None:
        self._token_hash: dict[str, int] = {}

    def _hashes(self, text: str) -> np.ndarray:
        cache = self._token_hash
        out = []
        for token in TOKEN.findall(text):
            h = cache.get(token)
            if h is None:
                h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "big")
                cache[token] = h
            out.append(h)
        return np.array(out, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray | None:
        """The (PERMUTATIONS,) uint64 signature, or None for texts under one shingle."""
        tokens = self._hashes(text)
        if len(tokens) < SHINGLE:
            return None
        with np.errstate(over="ignore"):
            shingles = tokens[: len(tokens) - SHINGLE + 1].copy()
            for k in range(1, SHINGLE):
                shingles = shingles * _MIX + tokens[k : len(tokens) - SHINGLE + 1 + k]
            shingles = np.unique(shingles)
            best = np.full(PERMUTATIONS, np.iinfo(np.uint64).max, dtype=np.uint64)
            for start in range(0, len(shingles), _CHUNK):
                block = shingles[None, start : start + _CHUNK]
                best = np.minimum(best, (_A[:, None] * block + _B[:, None]).min(axis=1))
        return best


class NearDuplicateIndex:
    """Banded LSH over kept signatures: ``add`` returns the index of a kept near
    duplicate (the text is then not kept), or None after keeping it."""

    def __init__(self) -> None:
        self._buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(BANDS)]
        self._kept: list[np.ndarray] = []

    def add(self, signature: np.ndarray) -> int | None:
        rows = PERMUTATIONS // BANDS
        keys = [signature[b * rows : (b + 1) * rows].tobytes() for b in range(BANDS)]
        seen = set()
        for band, key in enumerate(keys):
            for other in self._buckets[band].get(key, ()):
                if other in seen:
                    continue
                seen.add(other)
                if float(np.mean(self._kept[other] == signature)) >= THRESHOLD:
                    return other
        index = len(self._kept)
        self._kept.append(signature)
        for band, key in enumerate(keys):
            self._buckets[band][key].append(index)
        return None


def jaccard(a: str, b: str) -> float:
    """Exact shingle Jaccard similarity (for tests and reports)."""

    def shingles(text: str) -> set[tuple[str, ...]]:
        tokens = TOKEN.findall(text)
        return {tuple(tokens[i : i + SHINGLE]) for i in range(len(tokens) - SHINGLE + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / max(1, len(sa | sb))
