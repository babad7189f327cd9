"""A paged KV block pool with reference counts and an LRU prefix cache.

Block ``b`` holds the KV of ``block_size`` consecutive token positions of whichever
sequences list it in their block table. Position ``pos`` of a sequence lives in slot
``block_table[pos // block_size] * block_size + pos % block_size``.

Every block is in exactly one of three states:

* **in use**: ``ref_count > 0``; listed in that many block tables. Only a block that
  holds a cached full-block prefix (it has a hash) may be listed in more than one.
* **cached**: ``ref_count == 0`` but still holding a hashed full block, so a later
  request with the same prefix can take it back; evictable, least recently freed first.
* **free**: ``ref_count == 0`` and no hash.

so ``num_free + num_cached + num_in_use == num_blocks`` always. Allocation takes a free
block first and evicts a cached one only when no free block is left.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

from ds_batching.errors import NoFreeBlocksError
from ds_batching.hashing import BlockHash

__all__ = ["BlockManager"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


class BlockManager:
    """The pool of ``num_blocks`` KV blocks of ``block_size`` token slots each.

    The manager owns reference counts and the prefix cache; the caller (the scheduler)
    owns the block tables (plain ``list[int]`` of block ids per sequence).
    """

    def __init__(
        self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True
    ) -> None:
        self.num_blocks = _positive_int("num_blocks", num_blocks)
        self.block_size = _positive_int("block_size", block_size)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[BlockHash | None] = [None] * num_blocks
        self._hash_to_block: dict[BlockHash, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        # ref_count == 0 blocks that keep a cached prefix; first key = least recently freed.
        self._evictable: OrderedDict[int, None] = OrderedDict()

    # ---- figures -------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks that still hold a cached prefix (evictable)."""
        return len(self._evictable)

    @property
    def num_uncached_free_blocks(self) -> int:
        """Unreferenced blocks holding nothing worth keeping."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ``ref_count > 0``."""
        return self.num_blocks - len(self._free) - len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (referenced), 0.0 to 1.0; cached blocks count as free."""
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        """The cached-prefix hash a block holds, or None."""
        self._check_id(block_id)
        return self._block_hashes[block_id]

    def cached_block(self, block_hash: BlockHash) -> int | None:
        """The block that holds ``block_hash`` in the prefix cache, or None."""
        return self._hash_to_block.get(block_hash)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` token slots."""
        return -(-num_tokens // self.block_size)

    # ---- prefix cache --------------------------------------------------------------

    def find_cached_prefix(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        """Block ids of the longest leading run of ``block_hashes`` held in the cache.

        Pure lookup: nothing is referenced until these ids are passed to ``allocate``.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        lookup = self._hash_to_block.get
        for block_hash in block_hashes:
            block_id = lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Publish a referenced, fully computed block under ``block_hash``.

        Returns False (and changes nothing) when caching is off, the block already has a
        hash, or another block already holds this hash (the duplicate stays private).
        """
        self._check_id(block_id)
        if self._ref_counts[block_id] <= 0:
            raise ValueError(
                f"block_id {block_id} is not in use; only referenced blocks can be cached"
            )
        if (
            not self.enable_prefix_caching
            or self._block_hashes[block_id] is not None
            or block_hash in self._hash_to_block
        ):
            return False
        self._block_hashes[block_id] = block_hash
        self._hash_to_block[block_hash] = block_id
        return True

    def reset_prefix_cache(self) -> int:
        """Evict every cached block no sequence references; returns how many.

        Blocks in use keep their hash (sharers still rely on it) and are evicted
        later, once freed, like any other cached block.
        """
        evicted = len(self._evictable)
        for block_id in self._evictable:
            del self._hash_to_block[self._block_hashes[block_id]]
            self._block_hashes[block_id] = None
        self._free.extend(self._evictable)
        self._evictable.clear()
        return evicted

    # ---- allocation ----------------------------------------------------------------

    def can_allocate(self, num_tokens: int, cached_block_ids: Sequence[int] = ()) -> bool:
        """Whether ``allocate(num_tokens, cached_block_ids)`` would succeed now."""
        return self._num_fresh_needed(num_tokens, cached_block_ids) <= self._available_after_touch(
            cached_block_ids
        )

    def allocate(self, num_tokens: int, cached_block_ids: Sequence[int] = ()) -> list[int]:
        """A new block table covering ``num_tokens`` slots.

        It starts with ``cached_block_ids`` (a prefix from ``find_cached_prefix``, now
        referenced once more) and continues with fresh blocks. Raises
        ``NoFreeBlocksError`` without changing anything when the pool is short.
        """
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        for block_id in cached_block_ids:
            self._check_id(block_id)
            if self._block_hashes[block_id] is None:
                raise ValueError(f"cached_block_ids holds block {block_id}, which caches nothing")
        needed = self._num_fresh_needed(num_tokens, cached_block_ids)
        available = self._available_after_touch(cached_block_ids)
        if needed > available:
            raise NoFreeBlocksError(needed, available)
        table = list(cached_block_ids)
        for block_id in table:
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1
        for _ in range(needed):
            table.append(self._take_block())
        return table

    def can_append_slot(self, block_table: Sequence[int], num_tokens: int) -> bool:
        """Whether ``block_table`` can grow to cover ``num_tokens`` slots."""
        return self.num_blocks_for(num_tokens) - len(block_table) <= self.num_free_blocks

    def append_slot(self, block_table: list[int], num_tokens: int) -> list[int]:
        """Grow ``block_table`` in place to cover ``num_tokens`` slots; returns the new ids.

        Raises ``NoFreeBlocksError`` without changing anything when the pool is short.
        """
        needed = self.num_blocks_for(num_tokens) - len(block_table)
        if needed <= 0:
            return []
        available = self.num_free_blocks
        if needed > available:
            raise NoFreeBlocksError(needed, available)
        new_ids = [self._take_block() for _ in range(needed)]
        block_table.extend(new_ids)
        return new_ids

    def try_append_block(self, block_table: list[int]) -> bool:
        """Append one block to ``block_table`` if the pool has one (a decode crossing into a
        new block, the common case of ``append_slot``); returns False, changing nothing,
        when it has none."""
        if not self._free and not self._evictable:
            return False
        block_table.append(self._take_block())
        return True

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block (a sequence's whole table, typically).

        Blocks are released last to first, so when they are cached the tail of a
        sequence (least likely to be shared) is evicted before its head.
        """
        block_ids = list(block_ids)
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] <= 0:
                raise ValueError(f"block_id {block_id} is already free (double free)")
        for block_id in reversed(block_ids):
            ref = self._ref_counts[block_id] - 1
            self._ref_counts[block_id] = ref
            if ref == 0:
                if self._block_hashes[block_id] is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)

    # ---- internals -----------------------------------------------------------------

    def _num_fresh_needed(self, num_tokens: int, cached_block_ids: Sequence[int]) -> int:
        return max(0, self.num_blocks_for(num_tokens) - len(cached_block_ids))

    def _available_after_touch(self, cached_block_ids: Sequence[int]) -> int:
        # A cached hit that is currently unreferenced leaves the evictable pool when taken.
        refs = self._ref_counts
        return self.num_free_blocks - sum(1 for b in cached_block_ids if refs[b] == 0)

    def _take_block(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            del self._hash_to_block[self._block_hashes[block_id]]
            self._block_hashes[block_id] = None
        self._ref_counts[block_id] = 1
        return block_id

    def _check_id(self, block_id: int) -> None:
        if isinstance(block_id, bool) or not isinstance(block_id, int):
            raise TypeError(f"block_id must be an int, got {type(block_id).__name__} {block_id!r}")
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block_id must be in [0, {self.num_blocks}), got {block_id}")
