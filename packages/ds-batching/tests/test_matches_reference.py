"""Continuous batching must not change what a request generates.

A fake paged runner derives each sampled token from the context it reads back
through the block tables, so the token streams match the sequential reference only
if positions, block tables, chunking, prefix-cache hits and preemption are all right.
"""

from __future__ import annotations

import hypothesis.strategies as st
from batching_testutils import VOCAB, FakePagedModel, generate_reference
from ds_batching import QueueFull, Request, Scheduler, SchedulerConfig
from hypothesis import event, given, settings

request_specs = st.lists(
    st.tuples(
        st.integers(0, 2),  # shared prefix index
        st.lists(st.integers(0, VOCAB - 1), max_size=9),  # own suffix
        st.integers(1, 10),  # max_tokens
        st.none() | st.integers(0, VOCAB - 1),  # eos
        st.sampled_from([None, "a", "b"]),  # lora adapter
        st.integers(0, 4),  # arrival step
        st.integers(0, 3),  # priority
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=150)
@given(
    prefixes=st.lists(
        st.lists(st.integers(0, VOCAB - 1), min_size=4, max_size=14), min_size=1, max_size=3
    ),
    specs=request_specs,
    max_num_seqs=st.integers(1, 5),
    budget=st.integers(1, 32),
    block_size=st.sampled_from([1, 2, 4, 8]),
    spare_blocks=st.integers(0, 6),
    chunked=st.booleans(),
    threshold=st.sampled_from([0, 2, 5]),
    policy=st.sampled_from(["fcfs", "priority"]),
    caching=st.booleans(),
)
def test_outputs_match_sequential_generation(
    prefixes,
    specs,
    max_num_seqs,
    budget,
    block_size,
    spare_blocks,
    chunked,
    threshold,
    policy,
    caching,
):
    requests = []
    for i, (p, suffix, max_tokens, eos, lora, arrival, priority) in enumerate(specs):
        prompt = prefixes[p % len(prefixes)] + suffix
        requests.append(
            (
                arrival,
                Request(
                    f"r{i}", prompt, max_tokens, eos_token_id=eos, lora_name=lora, priority=priority
                ),
            )
        )
    longest = max(r.num_tokens + r.max_tokens for _, r in requests)
    # The pool fits the longest request plus a few blocks, so preemption is common.
    num_blocks = -(-longest // block_size) + spare_blocks
    if not chunked:
        budget = max(budget, max(r.num_tokens for _, r in requests))
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        block_size=block_size,
        num_blocks=num_blocks,
        max_waiting=4,
        enable_chunked_prefill=chunked,
        long_prefill_threshold=threshold,
        policy=policy,
        enable_prefix_caching=caching,
    )
    scheduler = Scheduler(config)
    model = FakePagedModel(block_size)
    queue = sorted(requests, key=lambda item: item[0])
    results = {}
    step = 0
    while queue or scheduler.has_unfinished():
        while queue and queue[0][0] <= step:
            try:
                scheduler.add(queue[0][1])
            except QueueFull:
                break  # retry next step, as a client would after HTTP 429
            queue.pop(0)
        out = scheduler.schedule()
        for finished in scheduler.update(model.step(out)):
            results[finished.request_id] = finished
        step += 1
        assert step < 5000, "scheduler made no progress"

    assert len(results) == len(requests)
    for _, req in requests:
        expected, reason = generate_reference(
            req.prompt_token_ids, req.max_tokens, req.eos_token_id, [], req.lora_name
        )
        got = results[req.request_id]
        assert got.output_token_ids == expected, req.request_id
        assert got.finish_reason == reason
    assert scheduler.block_manager.num_used_blocks == 0
    stats = scheduler.stats()
    event(f"preempted: {stats.num_preemptions_total > 0}")
    event(f"prefix-cache hit: {stats.prefix_cache_hit_tokens > 0}")
