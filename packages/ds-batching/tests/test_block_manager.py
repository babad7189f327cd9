"""BlockManager: reference counts, exact prefix-cache keys, LRU eviction, bad input."""

from __future__ import annotations

import pytest
from ds_batching import BlockManager, NoFreeBlocksError
from hypothesis import given, settings
from hypothesis import strategies as st


def publish(bm, table, tokens, lora=None):
    """Publish every full block of ``tokens`` held in ``table``, as the scheduler does;
    returns the prefix ids."""
    bs = bm.block_size
    parent, ids = lora, []
    for k in range(len(tokens) // bs):
        parent = bm.cache_block(table[k], parent, tokens[k * bs : (k + 1) * bs])
        ids.append(parent)
    return ids


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
    first = bm.allocate(len(prompt))
    ids = publish(bm, first, prompt)
    assert ids == [1, 2]  # new prefix ids, counting from 1
    assert [bm.prefix_id(b) for b in first] == [1, 2, None]
    assert bm.block_key(first[0]) == (None, 0, 1, 2, 3)
    assert bm.block_key(first[1]) == (1, 4, 5, 6, 7)  # chained on the first block's id
    assert bm.block_key(first[2]) is None
    hits = bm.find_cached_prefix(prompt)
    assert hits == first[:2]
    assert bm.find_cached_prefix(prompt, max_blocks=1) == first[:1]
    assert bm.find_cached_prefix(prompt, max_blocks=0) == []
    second = bm.allocate(len(prompt), hits)
    assert second[:2] == first[:2] and second[2] != first[2]
    assert [bm.ref_count(b) for b in second] == [2, 2, 1]
    # Re-publishing a block that holds this key is a no-op returning its id.
    assert bm.cache_block(second[0], None, prompt[:4]) == 1
    bm.free(first)
    bm.free(second)
    # Freed cached blocks stay reusable until evicted.
    assert bm.num_cached_blocks == 2 and bm.num_uncached_free_blocks == 6
    assert bm.find_cached_prefix(prompt) == first[:2]
    third = bm.allocate(len(prompt), bm.find_cached_prefix(prompt))
    assert third[:2] == first[:2] and bm.num_cached_blocks == 0


def test_keys_are_chained_and_keyed_by_adapter():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    b = [9, 9, 9, 9, 5, 6, 7, 8]  # same second block, different prefix
    ta, tb = bm.allocate(8), bm.allocate(8)
    publish(bm, ta, a)
    assert bm.find_cached_prefix(b) == []  # the second block alone is no hit
    publish(bm, tb, b)
    assert bm.find_cached_prefix(b) == tb
    assert bm.block_key(ta[1]) != bm.block_key(tb[1])
    # Adapters separate: the same tokens under another adapter (or none) miss.
    tx = bm.allocate(8)
    assert bm.find_cached_prefix(a, extra_key="x") == []
    publish(bm, tx, a, lora="x")
    assert bm.find_cached_prefix(a, extra_key="x") == tx
    assert bm.find_cached_prefix(a, extra_key="y") == []
    assert bm.find_cached_prefix(a) == ta
    # A tuple, a list or a range of the same ids are the same key.
    assert bm.find_cached_prefix(tuple(a)) == bm.find_cached_prefix(range(1, 9)) == ta


def test_a_miss_in_the_middle_stops_the_hit():
    bm = BlockManager(num_blocks=8, block_size=2)
    tokens = [1, 2, 3, 4, 5, 6]
    table = bm.allocate(6)
    p0 = bm.cache_block(table[0], None, tokens[0:2])
    # Block 1 is never published; block 2 is published chained on block 0's id (as if
    # block 1 were skipped): a walk from the root never reaches it.
    bm.cache_block(table[2], p0, tokens[4:6])
    assert bm.find_cached_prefix(tokens) == [table[0]]


def test_a_stale_child_is_never_a_hit():
    # A parent evicted and its block id reused for other content: the child entry that
    # chained on the old parent stays cached but must never be found, neither for the
    # old prefix nor for the new content's prefix.
    bm = BlockManager(num_blocks=3, block_size=2)
    old = [1, 2, 3, 4]
    table = bm.allocate(4)
    publish(bm, table, old)
    parent_block, child_block = table
    bm.free([parent_block])  # the parent is least recently freed: evicted first
    bm.free([child_block])
    spare = bm.allocate(2)  # the never-used block
    reused = bm.allocate(2)  # evicts the parent and reuses its id
    assert reused == [parent_block] and bm.block_key(child_block) is not None
    assert bm.find_cached_prefix(old) == []
    new = [9, 9, 3, 4]  # same second block as the old sequence
    publish(bm, reused, new[:2])
    assert bm.find_cached_prefix(new) == [parent_block]  # never the stale child
    # Re-publishing the old first block (another id) does not revive the old child.
    bm.free(spare)
    again = bm.allocate(2)
    publish(bm, again, old[:2])
    assert bm.find_cached_prefix(old) == again
    # The stale child is still an ordinary cached block, reclaimed by LRU.
    assert bm.num_cached_blocks == 1 and bm.allocate(2) == [child_block]


def test_free_blocks_are_taken_before_cached_ones_and_eviction_is_lru():
    bm = BlockManager(num_blocks=4, block_size=1)
    old, new = bm.allocate(1), bm.allocate(1)
    bm.cache_block(old[0], None, [10])
    bm.cache_block(new[0], None, [20])
    bm.free(old)
    bm.free(new)
    taken = bm.allocate(2)  # the two never-used blocks, no eviction
    assert set(taken).isdisjoint(old + new) and bm.num_cached_blocks == 2
    evicted = bm.allocate(1)  # now the least recently freed cached block goes
    assert evicted == old and bm.cached_block((None, 10)) is None
    assert bm.cached_block((None, 20)) == new[0]
    assert bm.block_key(old[0]) is None and bm.prefix_id(old[0]) is None


def test_a_hit_on_a_cached_free_block_takes_it_out_of_the_pool():
    bm = BlockManager(num_blocks=2, block_size=1)
    table = bm.allocate(1)
    bm.cache_block(table[0], None, [5])
    bm.free(table)
    assert bm.num_free_blocks == 2
    hits = bm.find_cached_prefix([5])
    assert bm.can_allocate(2, hits) and not bm.can_allocate(3, hits)
    bm.allocate(2, hits)
    assert bm.num_free_blocks == 0 and bm.ref_count(table[0]) == 1


def test_tail_blocks_of_a_sequence_are_evicted_first():
    bm = BlockManager(num_blocks=3, block_size=1)
    table = bm.allocate(3)
    publish(bm, table, [0, 1, 2])
    bm.free(table)
    assert bm.allocate(1) == [table[2]]


def test_duplicate_content_is_not_cached_twice_and_caching_can_be_off():
    bm = BlockManager(num_blocks=4, block_size=1)
    a, b = bm.allocate(2), bm.allocate(2)
    pa = bm.cache_block(a[0], None, [7])
    # The duplicate stays private and chains on the holder's entry.
    assert bm.cache_block(b[0], None, [7]) == pa and bm.block_key(b[0]) is None
    assert bm.cache_block(b[1], pa, [8]) == pa + 1  # the second block is new: b holds it
    assert bm.find_cached_prefix([7, 8]) == [a[0], b[1]]
    with pytest.raises(ValueError, match="already caches another block"):
        bm.cache_block(a[0], None, [6])  # one entry per block
    off = BlockManager(num_blocks=4, block_size=1, enable_prefix_caching=False)
    c = off.allocate(2)
    parent = None
    for block, token in zip(c, [7, 8]):  # the README's publishing loop, caching off
        parent = off.cache_block(block, parent, [token])
        assert parent == 0  # publishes nothing
    assert off.block_key(c[0]) is None and off.find_cached_prefix([7]) == []


def test_reset_prefix_cache_keeps_blocks_in_use():
    bm = BlockManager(num_blocks=4, block_size=1)
    kept, dropped = bm.allocate(1), bm.allocate(1)
    bm.cache_block(kept[0], None, [1])
    pd = bm.cache_block(dropped[0], None, [2])
    bm.free(dropped)
    assert bm.reset_prefix_cache() == 1
    assert bm.cached_block((None, 2)) is None and bm.cached_block((None, 1)) == kept[0]
    assert bm.num_cached_blocks == 0 and bm.num_uncached_free_blocks == 3
    assert bm.prefix_id(dropped[0]) is None
    # The id of the dropped entry is retired: a re-publication gets a new one.
    again = bm.allocate(1)
    assert bm.cache_block(again[0], None, [2]) > pd


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
        bm.cache_block(table[0], None, [1, 2])
    with pytest.raises(ValueError, match="caches nothing"):
        bm.allocate(2, [table[0]])
    with pytest.raises(ValueError, match="num_tokens"):
        bm.allocate(-1)
    live = bm.allocate(1)
    with pytest.raises(
        ValueError, match=r"token_ids must hold one full block \(block_size=2 ids\), got 1"
    ):
        bm.cache_block(live[0], None, [1])
    with pytest.raises(ValueError, match="not a prefix id"):
        bm.cache_block(live[0], 1, [1, 2])  # no id assigned yet
    with pytest.raises(TypeError, match="parent must be"):
        bm.cache_block(live[0], 1.0, [1, 2])
    with pytest.raises(ValueError, match="block_id must be in"):
        bm.cache_block(9, None, [1, 2])
    with pytest.raises(ValueError, match="max_blocks"):
        bm.find_cached_prefix([1, 2], max_blocks=-1)
    with pytest.raises(TypeError, match="extra_key"):
        bm.find_cached_prefix([1, 2], extra_key=3)
    assert bm.block_key(live[0]) is None  # the failed calls published nothing


def test_try_append_block_takes_one_block_or_changes_nothing():
    bm = BlockManager(2, block_size=4)
    table = bm.allocate(4)
    assert bm.try_append_block(table) and len(table) == 2 and bm.ref_count(table[1]) == 1
    assert bm.num_free_blocks == 0
    assert not bm.try_append_block(table) and len(table) == 2
    bm.free(table)
    assert bm.num_free_blocks == 2


@settings(max_examples=150)
@given(
    first=st.lists(st.integers(0, 2), max_size=24),
    second=st.lists(st.integers(0, 2), max_size=24),
    block_size=st.integers(1, 4),
    adapters=st.sampled_from([(None, None), ("a", "a"), (None, "a"), ("a", "b")]),
    share=st.integers(0, 24),
)
def test_hits_stop_exactly_at_the_first_differing_block(first, second, block_size, adapters, share):
    # Exactness: after publishing ``first``, ``second`` hits exactly the leading full
    # blocks equal to first's (same adapter), never one at or beyond the first differing
    # block. A small alphabet and a shared head make equal blocks at different places
    # (and equal later blocks after a difference) common.
    second = first[:share] + second
    lora_a, lora_b = adapters
    bm = BlockManager(num_blocks=64, block_size=block_size)
    table = bm.allocate(len(first))
    publish(bm, table, first, lora_a)
    common = 0
    if lora_a == lora_b:
        while (
            common + 1 <= min(len(first), len(second)) // block_size
            and first[common * block_size : (common + 1) * block_size]
            == second[common * block_size : (common + 1) * block_size]
        ):
            common += 1
    assert bm.find_cached_prefix(second, lora_b) == table[:common]
    # Publishing ``second`` too shares exactly those blocks and keeps every entry exact.
    other = bm.allocate(len(second), table[:common])
    ids = publish(bm, other, second, lora_b)
    assert bm.find_cached_prefix(second, lora_b) == other[: len(second) // block_size]
    assert bm.find_cached_prefix(first, lora_a) == table[: len(first) // block_size]
    assert len(set(ids[common:])) == len(ids) - common  # new blocks, new ids
    for key, block in bm._key_to_block.items():
        assert bm.block_key(block) == key
