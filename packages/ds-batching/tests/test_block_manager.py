"""BlockManager: reference counts, prefix-cache hits, LRU eviction, bad input."""

from __future__ import annotations

import pytest
from ds_batching import BlockManager, NoFreeBlocksError, hash_block_tokens
from ds_batching.hashing import hash_full_blocks
from hypothesis import given, settings
from hypothesis import strategies as st


def chain(tokens, block_size=4, lora=None):
    return hash_full_blocks(tokens, block_size, [], lora)


def test_allocate_append_free_round_trip():
    bm = BlockManager(num_blocks=4, block_size=4)
    table = bm.allocate(5)
    assert len(table) == 2 and bm.num_used_blocks == 2 and bm.usage == 0.5
    assert bm.append_slot(table, 8) == []  # 8 slots fit in 2 blocks
    new = bm.append_slot(table, 9)
    assert len(new) == 1 and table[-1] == new[0] and bm.num_used_blocks == 3
    assert not bm.can_append_slot(table, 17) and bm.can_append_slot(table, 16)
    with pytest.raises(NoFreeBlocksError):
        bm.append_slot(table, 17)
    assert len(table) == 3  # unchanged by the failed call
    bm.free(table)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 4 and bm.usage == 0.0


def test_can_allocate_matches_allocate():
    bm = BlockManager(num_blocks=3, block_size=2)
    assert bm.can_allocate(6) and not bm.can_allocate(7)
    with pytest.raises(NoFreeBlocksError, match="need 4"):
        bm.allocate(7)
    assert bm.num_free_blocks == 3


def test_repeated_prompt_hits_the_prefix_cache_and_shares_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10))  # two full blocks + 2 tokens
    hashes = chain(prompt)
    assert len(hashes) == 2
    first = bm.allocate(len(prompt))
    for block, block_hash in zip(first, hashes):
        assert bm.cache_block(block, block_hash)
    hits = bm.find_cached_prefix(hashes)
    assert hits == first[:2]
    second = bm.allocate(len(prompt), hits)
    assert second[:2] == first[:2] and second[2] != first[2]
    assert [bm.ref_count(b) for b in second] == [2, 2, 1]
    bm.free(first)
    bm.free(second)
    # Freed cached blocks stay reusable until evicted.
    assert bm.num_cached_blocks == 2 and bm.num_uncached_free_blocks == 6
    assert bm.find_cached_prefix(hashes) == first[:2]
    third = bm.allocate(len(prompt), bm.find_cached_prefix(hashes))
    assert third[:2] == first[:2] and bm.num_cached_blocks == 0


def test_hash_is_chained_and_keyed_by_adapter():
    a = chain([1, 2, 3, 4, 5, 6, 7, 8])
    b = chain([9, 9, 9, 9, 5, 6, 7, 8])
    assert a[1] != b[1]  # same block tokens, different prefix
    assert chain([1, 2, 3, 4], lora="x") != chain([1, 2, 3, 4])
    assert hash_block_tokens(None, [1, 2]) == hash_block_tokens(None, (1, 2))


def test_a_miss_in_the_middle_stops_the_hit():
    bm = BlockManager(num_blocks=8, block_size=2)
    hashes = chain([1, 2, 3, 4, 5, 6], block_size=2)
    table = bm.allocate(6)
    bm.cache_block(table[0], hashes[0])
    bm.cache_block(table[2], hashes[2])
    assert bm.find_cached_prefix(hashes) == [table[0]]


def test_free_blocks_are_taken_before_cached_ones_and_eviction_is_lru():
    bm = BlockManager(num_blocks=4, block_size=1)
    old, new = bm.allocate(1), bm.allocate(1)
    bm.cache_block(old[0], b"old")
    bm.cache_block(new[0], b"new")
    bm.free(old)
    bm.free(new)
    taken = bm.allocate(2)  # the two never-used blocks, no eviction
    assert set(taken).isdisjoint(old + new) and bm.num_cached_blocks == 2
    evicted = bm.allocate(1)  # now the least recently freed cached block goes
    assert evicted == old and bm.cached_block(b"old") is None
    assert bm.cached_block(b"new") == new[0]
    assert bm.block_hash(old[0]) is None


def test_a_hit_on_a_cached_free_block_takes_it_out_of_the_pool():
    bm = BlockManager(num_blocks=2, block_size=1)
    table = bm.allocate(1)
    bm.cache_block(table[0], b"h")
    bm.free(table)
    assert bm.num_free_blocks == 2
    hits = bm.find_cached_prefix([b"h"])
    assert bm.can_allocate(2, hits) and not bm.can_allocate(3, hits)
    bm.allocate(2, hits)
    assert bm.num_free_blocks == 0 and bm.ref_count(table[0]) == 1


def test_tail_blocks_of_a_sequence_are_evicted_first():
    bm = BlockManager(num_blocks=3, block_size=1)
    table = bm.allocate(3)
    for i, block in enumerate(table):
        bm.cache_block(block, bytes([i]))
    bm.free(table)
    assert bm.allocate(1) == [table[2]]


def test_duplicate_content_is_not_cached_twice_and_caching_can_be_off():
    bm = BlockManager(num_blocks=4, block_size=1)
    a, b = bm.allocate(1), bm.allocate(1)
    assert bm.cache_block(a[0], b"h") and not bm.cache_block(b[0], b"h")
    assert not bm.cache_block(a[0], b"other")  # one hash per block
    off = BlockManager(num_blocks=4, block_size=1, enable_prefix_caching=False)
    c = off.allocate(1)
    assert not off.cache_block(c[0], b"h") and off.find_cached_prefix([b"h"]) == []


def test_reset_prefix_cache_keeps_blocks_in_use():
    bm = BlockManager(num_blocks=4, block_size=1)
    kept, dropped = bm.allocate(1), bm.allocate(1)
    bm.cache_block(kept[0], b"k")
    bm.cache_block(dropped[0], b"d")
    bm.free(dropped)
    assert bm.reset_prefix_cache() == 1
    assert bm.cached_block(b"d") is None and bm.cached_block(b"k") == kept[0]
    assert bm.num_cached_blocks == 0 and bm.num_uncached_free_blocks == 3


def test_bad_input_is_named():
    bm = BlockManager(num_blocks=2, block_size=2)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0)
    with pytest.raises(TypeError, match="block_size"):
        BlockManager(num_blocks=2, block_size=2.0)
    with pytest.raises(ValueError, match="block_id must be in"):
        bm.free([5])
    table = bm.allocate(1)
    bm.free(table)
    with pytest.raises(ValueError, match="double free"):
        bm.free(table)
    with pytest.raises(ValueError, match="not in use"):
        bm.cache_block(table[0], b"x")
    with pytest.raises(ValueError, match="caches nothing"):
        bm.allocate(2, [table[0]])
    with pytest.raises(ValueError, match="num_tokens"):
        bm.allocate(-1)


def test_try_append_block_takes_one_block_or_changes_nothing():
    bm = BlockManager(2, block_size=4)
    table = bm.allocate(4)
    assert bm.try_append_block(table) and len(table) == 2 and bm.ref_count(table[1]) == 1
    assert bm.num_free_blocks == 0
    assert not bm.try_append_block(table) and len(table) == 2
    bm.free(table)
    assert bm.num_free_blocks == 2


@settings(max_examples=60)
@given(
    tokens=st.lists(st.integers(0, 2**63 - 1), max_size=40),
    block_size=st.integers(1, 8),
    lora=st.none() | st.text(max_size=4),
    done=st.integers(0, 5),
    limit=st.none() | st.integers(0, 45),
)
def test_hash_full_blocks_extends_the_chain_of_hash_block_tokens(
    tokens, block_size, lora, done, limit
):
    # The inlined loop must give exactly the chain of the one-block reference.
    end = len(tokens) if limit is None else min(limit, len(tokens))
    expected, parent = [], None
    for start in range(0, end - block_size + 1, block_size):
        parent = hash_block_tokens(parent, tokens[start : start + block_size], lora)
        expected.append(parent)
    prefix = expected[: min(done, len(expected))]
    chain = list(prefix)
    assert hash_full_blocks(tokens, block_size, chain, lora, limit_tokens=limit) is chain
    assert chain == expected
