"""A paged KV block pool with reference counts and an LRU prefix cache.

Block ``b`` holds the KV of ``block_size`` consecutive token positions of whichever
sequences list it in their block table. Position ``pos`` of a sequence lives in slot
``block_table[pos // block_size] * block_size + pos % block_size``.

Every block is in exactly one of three states:

* **in use**: ``ref_count > 0``; listed in that many block tables. Only a block that
  holds a cache entry (a published full block) may be listed in more than one.
* **cached**: ``ref_count == 0`` but still holding a cache entry, so a later request
  with the same prefix can take it back; evictable, least recently freed first.
* **free**: ``ref_count == 0`` and no entry.

so ``num_free + num_cached + num_in_use == num_blocks`` always. Allocation takes a free
block first and evicts a cached one only when no free block is left.

Prefix-cache keys are exact, not hashes. A cache entry's key is the tuple
``(parent, *token_ids_of_the_block)``, where ``parent`` is, for the first block of a
sequence, the LoRA adapter name (``None`` without one: the same tokens under another
adapter have different KV), and for a later block the *prefix id* of the previous
block's entry. Prefix ids are ints from a per-manager counter starting at 1, assigned
when an entry is created and never reused, so an int parent can never equal a root
(``None`` / ``str``), and the id of an evicted entry never names a later one. By induction, two equal keys
mean two equal whole prefixes (same adapter, same tokens), and the dict compares whole
tuples on a hash match, so a lookup has no false hits: no collision can hand one
request another's KV.

Eviction removes an entry and retires its prefix id. Entries chained on it (its
"children") stay cached but become unreachable: a lookup walks from the root and stops
at the first miss, and a re-published parent gets a new id, so its old children are
not revived (a content hash would revive them). They are reclaimed by LRU like any
other cached block; since a sequence's blocks are freed tail first, children are
usually evicted before their parent anyway.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

from ds_batching.errors import NoFreeBlocksError

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
        # The prefix cache: key -> block, and per block its key (None) and prefix id (0).
        self._key_to_block: dict[tuple, int] = {}
        self._block_keys: list[tuple | None] = [None] * num_blocks
        self._prefix_ids = [0] * num_blocks
        self._next_prefix_id = 1  # never reused, so a stale id matches nothing
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

    def block_key(self, block_id: int) -> tuple | None:
        """The cache key ``(parent, *token_ids)`` a block holds, or None."""
        self._check_id(block_id)
        return self._block_keys[block_id]

    def prefix_id(self, block_id: int) -> int | None:
        """The prefix id of the cache entry a block holds (the next block's parent), or None."""
        self._check_id(block_id)
        return self._prefix_ids[block_id] or None

    def cached_block(self, key: tuple) -> int | None:
        """The block that holds the cache entry ``key``, or None."""
        return self._key_to_block.get(key)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` token slots."""
        return -(-num_tokens // self.block_size)

    # ---- prefix cache --------------------------------------------------------------

    def find_cached_prefix(
        self,
        token_ids: Sequence[int],
        extra_key: str | None = None,
        max_blocks: int | None = None,
    ) -> list[int]:
        """Block ids of the longest leading run of full blocks of ``token_ids`` in the cache.

        ``extra_key`` is the LoRA adapter name (None: no adapter), the root of the chain.
        At most ``max_blocks`` blocks are looked up (None: every full block). Pure
        lookup: nothing is referenced until these ids are passed to ``allocate``.
        """
        if extra_key is not None and not isinstance(extra_key, str):
            raise TypeError(f"extra_key must be a str or None, got {type(extra_key).__name__}")
        bs = self.block_size
        num = len(token_ids) // bs
        if max_blocks is not None:
            if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 0:
                raise ValueError(f"max_blocks must be an int >= 0 or None, got {max_blocks!r}")
            num = min(num, max_blocks)
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        lookup = self._key_to_block.get
        prefix_ids = self._prefix_ids
        parent: object = extra_key
        for start in range(0, num * bs, bs):
            block_id = lookup((parent, *token_ids[start : start + bs]))
            if block_id is None:
                break
            hits.append(block_id)
            parent = prefix_ids[block_id]
        return hits

    def cache_block(self, block_id: int, parent: int | str | None, token_ids: Sequence[int]) -> int:
        """Publish a referenced, fully computed block: its ``block_size`` ``token_ids``
        chained on ``parent`` (the adapter name or None for a sequence's first block,
        else the prefix id the previous block's ``cache_block`` returned).

        Returns the prefix id the next block chains on: the block's own entry's id if
        it already holds this key, the existing entry's id if another block already
        holds it (this block then stays private, as a duplicate), else a new id. With
        prefix caching off nothing is published and it returns 0 (no entry; 0 is never
        a prefix id). Raises ``ValueError`` for a block not in use, a block that
        already holds another key, a wrong token count or a parent that is no prefix id.
        """
        self._check_id(block_id)
        if self._ref_counts[block_id] <= 0:
            raise ValueError(
                f"block_id {block_id} is not in use; only referenced blocks can be cached"
            )
        token_ids = tuple(token_ids)
        if len(token_ids) != self.block_size:
            raise ValueError(
                f"token_ids must hold one full block (block_size={self.block_size} ids), "
                f"got {len(token_ids)}"
            )
        if parent is not None and not isinstance(parent, str):
            if isinstance(parent, bool) or not isinstance(parent, int):
                raise TypeError(
                    f"parent must be a prefix id (int), an adapter name (str) or None, "
                    f"got {type(parent).__name__} {parent!r}"
                )
            if not self.enable_prefix_caching:
                return 0  # chaining on the 0 this returned before: still nothing to publish
            if not 1 <= parent < self._next_prefix_id:
                raise ValueError(
                    f"parent={parent} is not a prefix id this manager assigned (allowed: "
                    f"None or an adapter name for a first block, else an id in "
                    f"[1, {self._next_prefix_id}) returned by cache_block)"
                )
        if not self.enable_prefix_caching:
            return 0
        key = (parent, *token_ids)
        held = self._block_keys[block_id]
        if held is not None:
            if held != key:
                raise ValueError(f"block_id {block_id} already caches another block {held!r}")
            return self._prefix_ids[block_id]
        return self._publish(block_id, key)

    def reset_prefix_cache(self) -> int:
        """Evict every cached block no sequence references; returns how many.

        Blocks in use keep their entry (sharers still rely on it) and are evicted
        later, once freed, like any other cached block. Entries chained on an evicted
        one become unreachable (see the module docstring).
        """
        evicted = len(self._evictable)
        keys = self._block_keys
        key_to_block = self._key_to_block
        prefix_ids = self._prefix_ids
        for block_id in self._evictable:
            del key_to_block[keys[block_id]]
            keys[block_id] = None
            prefix_ids[block_id] = 0
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
            if self._block_keys[block_id] is None:
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
        free = self._free
        if free:  # _take_block's common case, inlined: this runs once per block per decode
            block_id = free.popleft()
            self._ref_counts[block_id] = 1
            block_table.append(block_id)
            return True
        if not self._evictable:
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
                if self._prefix_ids[block_id]:
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
            del self._key_to_block[self._block_keys[block_id]]
            self._block_keys[block_id] = None
            self._prefix_ids[block_id] = 0
        self._ref_counts[block_id] = 1
        return block_id

    def _publish(self, block_id: int, key: tuple) -> int:
        """``cache_block`` without the checks, for the scheduler's hot path.

        ``block_id`` must be referenced, fully computed and hold no entry yet, ``key``
        must be its ``(parent, *token_ids)``, and prefix caching must be on. Returns the
        prefix id the next block chains on.
        """
        prefix_ids = self._prefix_ids
        holder = self._key_to_block.setdefault(key, block_id)
        if holder != block_id:  # a duplicate: it stays private
            return prefix_ids[holder]
        prefix_id = prefix_ids[block_id] = self._next_prefix_id
        self._next_prefix_id = prefix_id + 1
        self._block_keys[block_id] = key
        return prefix_id

    def _check_id(self, block_id: int) -> None:
        if isinstance(block_id, bool) or not isinstance(block_id, int):
            raise TypeError(f"block_id must be an int, got {type(block_id).__name__} {block_id!r}")
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block_id must be in [0, {self.num_blocks}), got {block_id}")
