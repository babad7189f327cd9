"""Smoke test run in a fresh venv that holds only the ds-batching wheel.

Proves the wheel stands alone (no dependencies, no torch) and that its real
Scheduler drives an engine loop end to end: chunked prefill, decode, a prefix-cache
hit, stop conditions, QueueFull, abort, and no KV block left in use.
"""

import importlib.metadata
import importlib.util

import ds_batching
from ds_batching import (
    DynamicBatchScheduler,
    FinishReason,
    QueueFull,
    Request,
    Scheduler,
    SchedulerConfig,
    slot_of,
)

requires = importlib.metadata.requires("ds-batching") or []
assert not requires, f"ds-batching must have no dependencies, declares {requires}"
assert importlib.util.find_spec("torch") is None, "torch is installed next to ds-batching"
assert "site-packages" in ds_batching.__file__, ds_batching.__file__

# The static batcher.
batches = []
static = DynamicBatchScheduler(max_batch_size=2, max_tokens=8, on_batch=batches.append)
for ids in ([1, 2, 3], [4, 5], [6, 7, 8, 9]):
    static.add_request(ids)
static.flush()
assert [b.requests for b in batches] == [[[1, 2, 3], [4, 5]], [[6, 7, 8, 9]]]

# The continuous scheduler, driven like ds-serve's engine loop with a fake runner that
# writes KV slots through the block tables and checks every read.
config = SchedulerConfig(
    max_num_seqs=4, max_num_batched_tokens=16, block_size=4, num_blocks=32, max_waiting=3
)
sched = Scheduler(config)
kv = {}
system = list(range(100, 112))  # 12 shared tokens = 3 full blocks
sched.add(Request("a", [*system, 1, 2], max_tokens=3))
sched.add(Request("b", [*system, 3], max_tokens=5, eos_token_id=0))
sched.add(Request("c", [7, 8, 9], max_tokens=4, stop_token_ids=[42]))
try:
    sched.add(Request("d", [1], max_tokens=1))
except QueueFull:
    pass
else:
    raise AssertionError("a fourth waiting request must raise QueueFull")

finished = {}
script = {"b": [5, 6, 0], "c": [9, 42]}  # b stops on EOS, c on a stop token, a runs to length
steps = 0
while sched.has_unfinished():
    out = sched.schedule()
    for item in out.scheduled:
        for pos, token in zip(item.positions, item.token_ids):
            kv[slot_of(item.block_table, pos, out.block_size)] = (item.request_id, pos, token)
        for pos in range(item.start_position):  # the cached context must be in place
            owner, stored_pos, _ = kv[slot_of(item.block_table, pos, out.block_size)]
            assert stored_pos == pos
    sampled = {}
    for rid in out.sample_request_ids:
        sampled[rid] = script[rid].pop(0) if script.get(rid) else 11
    for done in sched.update(sampled):
        finished[done.request_id] = done
    steps += 1
    assert steps < 50
    if steps == 1:
        sched.add(Request("late", [*system, 4], max_tokens=1))
        assert sched.abort("late")
        sched.add(Request("again", [*system, 4], max_tokens=1))

assert finished["a"].finish_reason == FinishReason.LENGTH and finished["a"].output_token_ids == [
    11,
    11,
    11,
]
assert finished["b"].finish_reason == "stop" and finished["b"].output_token_ids == [5, 6, 0]
assert finished["c"].finish_reason == "stop" and finished["c"].output_token_ids == [9, 42]
assert finished["late"].finish_reason == "abort"
assert finished["again"].num_cached_tokens == 12, finished["again"]
stats = sched.stats()
assert stats.prefix_cache_hit_tokens >= 12 and stats.num_running == 0
assert sched.block_manager.num_used_blocks == 0
print(
    f"ds-batching {ds_batching.__version__} wheel stands alone; {steps} scheduler steps, "
    f"prefix-cache hit rate {stats.prefix_cache_hit_rate:.0%}"
)
