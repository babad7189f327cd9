"""Unit tests of the continuous-batching Scheduler's rules."""

from __future__ import annotations

import pytest
from ds_batching import (
    BlockManager,
    BlockManagerProtocol,
    DuplicateRequestError,
    FinishReason,
    QueueFull,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    SchedulerProtocol,
    UnknownRequestError,
    slot_of,
)


def make(**overrides) -> Scheduler:
    base = dict(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_blocks=32)
    base.update(overrides)
    return Scheduler(SchedulerConfig(**base))


def step(sched: Scheduler, token: int = 5):
    out = sched.schedule()
    finished = sched.update({rid: token for rid in out.sample_request_ids})
    return out, finished


def by_id(out):
    return {s.request_id: s for s in out.scheduled}


def test_satisfies_the_protocols():
    assert isinstance(make(), SchedulerProtocol)
    assert isinstance(BlockManager(4), BlockManagerProtocol)


def test_chunked_prefill_feeds_the_prompt_in_budget_sized_chunks():
    sched = make(max_num_batched_tokens=4)
    sched.add(Request("a", list(range(10)), max_tokens=2))
    chunks = []
    for _ in range(3):
        out, _ = step(sched)
        (item,) = out.scheduled
        chunks.append((item.start_position, item.token_ids, item.sample))
    assert chunks == [
        (0, [0, 1, 2, 3], False),
        (4, [4, 5, 6, 7], False),
        (8, [8, 9], True),
    ]
    out, finished = step(sched, token=7)
    assert out.scheduled[0].token_ids == [5] and out.scheduled[0].start_position == 10
    assert [(f.request_id, f.output_token_ids, f.finish_reason) for f in finished] == [
        ("a", [5, 7], FinishReason.LENGTH)
    ]


def test_a_step_mixes_decodes_first_then_prefill_chunks_within_the_budget():
    sched = make(max_num_batched_tokens=6)
    sched.add(Request("old", [1, 2], max_tokens=10))
    step(sched)  # prefill of "old", which samples its first token
    sched.add(Request("new", list(range(20)), max_tokens=10))
    out, _ = step(sched)
    assert [(s.request_id, len(s.token_ids), s.sample) for s in out.scheduled] == [
        ("old", 1, True),
        ("new", 5, False),
    ]
    assert out.num_scheduled_tokens == 6


def test_long_prefill_threshold_caps_one_request_per_step():
    sched = make(max_num_batched_tokens=64, long_prefill_threshold=3)
    sched.add(Request("a", list(range(8)), max_tokens=1))
    sched.add(Request("b", list(range(8)), max_tokens=1))
    out, _ = step(sched)
    assert [len(s.token_ids) for s in out.scheduled] == [3, 3]


def test_without_chunked_prefill_a_prompt_runs_whole_or_waits():
    sched = make(max_num_batched_tokens=8, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens=8"):
        sched.add(Request("huge", list(range(9)), max_tokens=1))
    sched.add(Request("a", list(range(5)), max_tokens=3))
    sched.add(Request("b", list(range(50, 56)), max_tokens=3))
    out, _ = step(sched)
    assert [(s.request_id, len(s.token_ids)) for s in out.scheduled] == [("a", 5)]
    out, _ = step(sched)  # 1 decode + 6 prompt tokens = 7 <= 8
    assert [(s.request_id, len(s.token_ids)) for s in out.scheduled] == [("a", 1), ("b", 6)]


def test_max_num_seqs_limits_running_requests():
    sched = make(max_num_seqs=2)
    for i in range(3):
        sched.add(Request(f"r{i}", [1, 2], max_tokens=2))
    out, _ = step(sched)
    assert out.request_ids == ["r0", "r1"] and sched.stats().num_waiting == 1
    out, finished = step(sched)
    assert {f.request_id for f in finished} == {"r0", "r1"}
    out, _ = step(sched)
    assert out.request_ids == ["r2"]


def test_out_of_blocks_preempts_the_newest_and_recomputes_it_later():
    # 4 blocks of 2 slots: "a" and "b" fill the pool; a's next block evicts "b".
    sched = make(block_size=2, num_blocks=4)
    sched.add(Request("a", [1, 2, 3], max_tokens=4))
    sched.add(Request("b", [4, 5, 6], max_tokens=4))
    step(sched, token=9)  # both prefilled: 2 blocks each, position 3 free in each
    out, _ = step(sched, token=9)  # a and b write position 3: still fits
    assert out.request_ids == ["a", "b"] and out.preempted_request_ids == []
    out, _ = step(sched, token=9)  # a needs a 3rd block for position 4: b goes
    assert out.preempted_request_ids == ["b"] and out.request_ids == ["a"]
    b = sched.requests["b"]
    assert b.status is RequestStatus.PREEMPTED and b.block_table == [] and b.num_preemptions == 1
    assert sched.stats().num_preempted_waiting == 1
    # a finishes, then b resumes by recomputing its prompt and its 2 sampled tokens.
    finished = []
    while not finished:
        _, finished = step(sched, token=9)
    assert finished[0].request_id == "a"
    out, _ = step(sched, token=9)
    (item,) = out.scheduled
    assert item.request_id == "b"
    # Its head block [4, 5] survived in the prefix cache (the tail was evicted first),
    # so it recomputes from position 2: the rest of its prompt and both sampled tokens.
    assert item.start_position == 2 and item.token_ids == [6, 9, 9]
    assert item.sample and sched.stats().num_preemptions_total == 1


def test_priority_policy_admits_low_values_first_and_preempts_high_values():
    sched = make(policy="priority", max_num_seqs=1)
    sched.add(Request("late-urgent", [1], max_tokens=1, priority=5))
    sched.add(Request("urgent", [1], max_tokens=1, priority=0))
    out, _ = step(sched)
    assert out.request_ids == ["urgent"]

    sched = make(policy="priority", block_size=2, num_blocks=4)
    sched.add(Request("low", [1, 2, 3], max_tokens=4, priority=9))
    sched.add(Request("high", [4, 5, 6], max_tokens=4, priority=0))
    for _ in range(3):
        out, _ = step(sched)
    assert out.preempted_request_ids == ["low"]


def test_stop_conditions():
    sched = make()
    sched.add(Request("eos", [1], max_tokens=5, eos_token_id=2))
    sched.add(Request("stop", [1], max_tokens=5, stop_token_ids=[3, 4]))
    sched.add(Request("eos-at-limit", [1], max_tokens=1, eos_token_id=2))
    sched.add(Request("len", [1], max_tokens=1))
    out = sched.schedule()
    finished = sched.update({"eos": 2, "stop": 4, "eos-at-limit": 2, "len": 2})
    reasons = {f.request_id: (f.finish_reason, f.output_token_ids) for f in finished}
    assert reasons == {
        "eos": (FinishReason.STOP, [2]),
        "stop": (FinishReason.STOP, [4]),
        "eos-at-limit": (FinishReason.STOP, [2]),
        "len": (FinishReason.LENGTH, [2]),
    }
    assert FinishReason.STOP == "stop" and str(FinishReason.LENGTH) == "length"
    assert out.finished_request_ids == []
    assert set(sched.schedule().finished_request_ids) == set(reasons)
    assert sched.block_manager.num_used_blocks == 0


def test_abort_anywhere_frees_everything_and_is_reported_once():
    sched = make()
    sched.add(Request("waiting", [1, 2], max_tokens=3))
    assert sched.abort("waiting") is True
    assert sched.abort("waiting") is False and sched.abort("never") is False
    sched.add(Request("running", [1, 2], max_tokens=3))
    sched.add(Request("in-flight", [1, 2], max_tokens=3))
    out, finished = step(sched)
    assert out.finished_request_ids == ["waiting"]
    assert [(f.request_id, f.finish_reason) for f in finished] == [("waiting", "abort")]
    assert sched.abort("running")
    out = sched.schedule()
    assert out.request_ids == ["in-flight"] and out.finished_request_ids == ["running"]
    assert sched.abort("in-flight")  # between schedule() and update()
    finished = sched.update({"in-flight": 8})  # its token is ignored
    assert [(f.request_id, f.finish_reason) for f in finished] == [
        ("running", FinishReason.ABORT),
        ("in-flight", FinishReason.ABORT),
    ]
    assert finished[1].output_token_ids == [5]
    assert sched.update({}) == []
    assert not sched.has_unfinished()
    assert sched.block_manager.num_used_blocks == 0


def test_queue_full_is_typed_and_clears_as_requests_start():
    sched = make(max_waiting=2, max_num_seqs=1)
    sched.add(Request("a", [1], max_tokens=5))
    sched.add(Request("b", [1], max_tokens=5))
    with pytest.raises(QueueFull) as info:
        sched.add(Request("c", [1], max_tokens=5))
    assert info.value.max_waiting == 2 and "max_waiting=2" in str(info.value)
    step(sched)  # "a" starts running: one waiting slot opens
    sched.add(Request("c", [1], max_tokens=5))


def test_repeated_prompt_is_served_from_the_prefix_cache():
    sched = make(block_size=4)
    prompt = list(range(100, 111))  # 11 tokens: 2 full blocks + 3
    sched.add(Request("first", prompt, max_tokens=1))
    out, _ = step(sched)
    first_table = out.scheduled[0].block_table
    sched.add(Request("second", prompt, max_tokens=1))
    out, finished = step(sched)
    (item,) = out.scheduled
    assert item.start_position == 8 and item.token_ids == prompt[8:]
    assert item.block_table[:2] == first_table[:2]
    assert finished[0].num_cached_tokens == 8
    stats = sched.stats()
    assert stats.prefix_cache_hit_tokens == 8 and stats.prefix_cache_queried_tokens == 22
    assert stats.prefix_cache_hit_rate == pytest.approx(8 / 22)
    # A fully cached prompt still recomputes its last token (its logits are needed).
    sched.add(Request("aligned", prompt[:8], max_tokens=1))
    out, _ = step(sched)
    assert out.scheduled[0].start_position == 4 and out.scheduled[0].token_ids == prompt[4:8]
    # Another adapter never shares KV with the base model.
    sched.add(Request("lora", prompt, max_tokens=1, lora_name="x"))
    out, _ = step(sched)
    assert out.scheduled[0].start_position == 0 and out.scheduled[0].lora_name == "x"


def test_skip_prefix_cache_computes_the_whole_prompt():
    sched = make(block_size=4)
    prompt = list(range(100, 111))
    sched.add(Request("first", prompt, max_tokens=1))
    step(sched)
    sched.add(Request("scored", prompt, max_tokens=1, skip_prefix_cache=True))
    out, finished = step(sched)
    assert out.scheduled[0].start_position == 0 and out.scheduled[0].token_ids == prompt
    assert finished[0].num_cached_tokens == 0
    # The cached prefix is left intact for later requests.
    sched.add(Request("later", prompt, max_tokens=1))
    out, _ = step(sched)
    assert out.scheduled[0].start_position == 8


def test_prefix_caching_off_never_hits():
    sched = make(enable_prefix_caching=False)
    for rid in ("a", "b"):
        sched.add(Request(rid, list(range(12)), max_tokens=1))
        out, _ = step(sched)
        assert out.scheduled[0].start_position == 0
    assert sched.stats().prefix_cache_hit_rate == 0.0


def test_block_table_gives_each_position_its_own_slot():
    sched = make(block_size=4)
    sched.add(Request("a", list(range(9)), max_tokens=4, sampling_params={"temperature": 0}))
    out, _ = step(sched)
    item = out.scheduled[0]
    assert item.sampling_params == {"temperature": 0}
    assert len(item.block_table) == 3 and out.block_size == 4
    slots = [slot_of(item.block_table, p, 4) for p in item.positions]
    assert len(set(slots)) == 9
    assert all(slot // 4 == item.block_table[p // 4] for p, slot in zip(item.positions, slots))
    assert out.token_ids == [item.token_ids] and out.positions == [0]
    assert out.block_tables == [item.block_table]
    assert isinstance(item.block_table, tuple)  # a snapshot: later growth does not change it


def test_update_checks_what_it_gets():
    sched = make()
    sched.add(Request("a", [1, 2], max_tokens=3))
    sched.schedule()
    with pytest.raises(RuntimeError, match="update"):
        sched.schedule()
    with pytest.raises(UnknownRequestError, match="'a'"):
        sched.update({})
    with pytest.raises(UnknownRequestError, match="zzz"):
        sched.update({"a": 1, "zzz": 1})
    with pytest.raises(ValueError, match=r"token id in \[0, 2\*\*63\)"):
        sched.update({"a": -1})
    with pytest.raises(ValueError, match="got 9223372036854775808"):
        sched.update({"a": 2**63})
    with pytest.raises(TypeError, match="sampled"):
        sched.update([("a", 1)])
    assert sched.update({"a": 1}) == []


def test_add_checks_what_it_gets():
    sched = make(block_size=4, num_blocks=2)  # 8 slots
    sched.add(Request("fits", list(range(4)), max_tokens=5))  # 4 + 5 - 1 = 8 slots
    with pytest.raises(DuplicateRequestError, match="'fits'"):
        sched.add(Request("fits", [1], max_tokens=1))
    with pytest.raises(ValueError, match="needs up to 9 KV slots"):
        sched.add(Request("big", list(range(4)), max_tokens=6))
    with pytest.raises(TypeError, match="Request"):
        sched.add({"request_id": "x"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"block_size": "16"}, "block_size"),
        ({"max_waiting": 0}, "max_waiting"),
        ({"long_prefill_threshold": -1}, "long_prefill_threshold"),
        ({"policy": "lifo"}, "policy"),
    ],
)
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("", [1], 1), {}, TypeError, "request_id"),
        (("a", [], 1), {}, ValueError, "empty"),
        (("a", "hello", 1), {}, TypeError, "prompt_token_ids"),
        (("a", [1, -2], 1), {}, ValueError, r"prompt_token_ids\[1\]"),
        (("a", [2**63], 1), {}, ValueError, r"prompt_token_ids\[0\]"),
        (("a", [1, 2.5], 1), {}, TypeError, r"prompt_token_ids\[1\]"),
        (("a", [1], 0), {}, ValueError, "max_tokens"),
        (("a", [1], 1), {"lora_name": 3}, TypeError, "lora_name"),
        (("a", [1], 1), {"priority": "high"}, TypeError, "priority"),
    ],
)
def test_bad_request_is_named(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        Request(*args, **kwargs)


def test_stats_track_running_waiting_and_usage():
    sched = make(max_num_seqs=1, num_blocks=4, block_size=4)
    sched.add(Request("a", list(range(6)), max_tokens=2))
    sched.add(Request("b", [1], max_tokens=2))
    step(sched)
    stats = sched.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_steps) == (1, 1, 1)
    assert stats.kv_usage == 0.5
    assert stats.num_free_blocks + stats.num_cached_blocks == 2


def test_each_steps_items_keep_their_values_after_later_steps():
    # An output describes its own step: later schedule() calls change nothing in it.
    sched = make(block_size=4, max_num_batched_tokens=2)
    sched.add(Request("a", [1, 2, 3], max_tokens=5, sampling_params="p", lora_name="x"))
    out1, _ = step(sched, token=7)  # chunk [1, 2]: no sample
    out2, _ = step(sched, token=8)  # chunk [3]: samples 8
    out3, _ = step(sched, token=9)  # decode of 8 at position 3: still block 0
    out4, _ = step(sched, token=9)  # decode of 9 at position 4: a second block
    got = [
        (o.scheduled[0].token_ids, o.scheduled[0].start_position, o.scheduled[0].sample)
        for o in (out1, out2, out3, out4)
    ]
    assert got == [([1, 2], 0, False), ([3], 2, True), ([8], 3, True), ([9], 4, True)]
    first_table = out1.scheduled[0].block_table
    assert out2.scheduled[0].block_table == out3.scheduled[0].block_table == first_table
    item = out4.scheduled[0]
    assert len(item.block_table) == 2 and item.block_table[0] == first_table[0]
    assert item.block_table == tuple(sched.requests["a"].block_table)
    assert len(first_table) == 1  # the earlier table was never mutated
    assert (item.sampling_params, item.lora_name) == ("p", "x")


def test_update_with_a_wrong_id_in_place_of_a_right_one_changes_nothing():
    sched = make()
    sched.add(Request("a", [1, 2], max_tokens=3))
    sched.add(Request("b", [3, 4], max_tokens=3))
    sched.schedule()
    with pytest.raises(UnknownRequestError, match="'b'"):
        sched.update({"a": 1, "zzz": 1})  # right count, one wrong id
    assert sched.requests["a"].all_token_ids == [1, 2]
    assert sched.update({"a": 1, "b": 2}) == []
    assert sched.requests["b"].all_token_ids == [3, 4, 2]


class IntLike:
    """An integer that is not an int (like numpy.int64): tokens must become plain ints."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def test_update_stores_int_like_tokens_as_plain_ints_in_steady_decode():
    sched = make()
    sched.add(Request("a", [1, 2], max_tokens=4, eos_token_id=6))
    sched.add(Request("b", [3, 4], max_tokens=4))
    step(sched, token=5)
    sched.schedule()  # both decode: the all-sample path
    assert sched.update({"a": IntLike(6), "b": IntLike(7)})[0].output_token_ids == [5, 6]
    tokens = sched.requests["b"].all_token_ids
    assert tokens == [3, 4, 5, 7] and all(type(t) is int for t in tokens)


def test_victim_already_scheduled_as_a_decode_is_taken_out_of_the_step():
    # Priority policy: "x" (low priority) runs first and decodes without a new block,
    # then "y" needs a block from an empty pool and x, already in the batch, is preempted.
    sched = make(block_size=4, num_blocks=3, policy="priority")
    sched.add(Request("x", [1, 2, 3, 4], max_tokens=8, priority=5))
    step(sched)  # x prefilled: block 0 full
    sched.add(Request("y", [5, 6, 7], max_tokens=8, priority=0))
    step(sched)  # x decodes position 4 (block 1), y prefilled (block 2): pool full
    step(sched)  # x position 5, y position 3: no new block
    out = sched.schedule()  # x position 6 fits; y position 4 needs a block
    assert out.preempted_request_ids == ["x"] and out.request_ids == ["y"]
    assert out.sample_request_ids == ["y"] and out.num_scheduled_tokens == 1
    with pytest.raises(UnknownRequestError, match="'x'"):
        sched.update({"x": 1, "y": 1})
    assert sched.update({"y": 1}) == []
    assert sched.requests["x"].status is RequestStatus.PREEMPTED


def test_published_blocks_chain_on_the_hit_and_adapters_miss():
    # A request admitted with a prefix hit publishes its next blocks chained on the
    # hit's prefix id, so a third request with the longer prefix hits all of them.
    config = SchedulerConfig(num_blocks=16, block_size=2, max_num_batched_tokens=64)
    sched = Scheduler(config)
    bm = sched.block_manager

    def step():
        out = sched.schedule()
        sched.update(dict.fromkeys(out.sample_request_ids, 5))
        return out

    sched.add(Request("a", [1, 2, 3], max_tokens=1))
    step()  # a publishes [1, 2] and finishes
    b = Request("b", [1, 2, 3, 4, 6], max_tokens=2)
    sched.add(b)
    out = step()
    assert out.scheduled[0].start_position == 2  # hit on [1, 2]
    hit = out.scheduled[0].block_table[0]
    assert bm.block_key(b.block_table[1]) == (bm.prefix_id(hit), 3, 4)
    assert sched._entries["b"].chain_parent == bm.prefix_id(b.block_table[1])
    step()  # b publishes [6, 5] and finishes
    assert b.is_finished
    c = Request("c", [1, 2, 3, 4, 6, 5, 9], max_tokens=1)
    sched.add(c)
    out = sched.schedule()
    assert out.scheduled[0].start_position == 6  # [1, 2] [3, 4] [6, 5] all hit
    sched.update(dict.fromkeys(out.sample_request_ids, 5))
    # Under an adapter the same tokens miss.
    d = Request("d", [1, 2, 3, 4, 6, 5, 9], max_tokens=1, lora_name="x")
    sched.add(d)
    out = sched.schedule()
    assert out.scheduled[0].start_position == 0 and sched._entries["d"].chain_parent == "x"
