"""Random interleavings of add / schedule / update / abort / drain against the Scheduler.

After every step the machine checks the scheduler's invariants: the token budget and
``max_num_seqs`` hold; reference counts equal the number of block tables holding a
block, never negative, and only cached prefix blocks are shared; free + cached +
in use == num_blocks; no request gets tokens past max_tokens; and the KV a fake
runner reads back through the block tables is each request's own token stream. Once
arrivals stop every request finishes (liveness) and no block stays referenced.
"""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
from batching_testutils import VOCAB, FakePagedModel
from ds_batching import (
    FinishReason,
    QueueFull,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
)
from hypothesis import event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

configs = st.builds(
    SchedulerConfig,
    max_num_seqs=st.integers(1, 6),
    max_num_batched_tokens=st.integers(1, 40),
    block_size=st.sampled_from([1, 2, 2, 4]),
    num_blocks=st.integers(6, 14) | st.integers(15, 40),  # tight pools preempt often
    max_waiting=st.none() | st.integers(1, 8),
    enable_chunked_prefill=st.booleans(),
    long_prefill_threshold=st.sampled_from([0, 0, 3, 8]),
    policy=st.sampled_from(["fcfs", "priority"]),
    enable_prefix_caching=st.booleans(),
)
tokens = st.integers(0, VOCAB - 1)
request_specs = st.tuples(
    st.integers(0, 2),  # shared prefix
    st.lists(tokens, max_size=10),  # own suffix
    st.integers(1, 8),  # max_tokens
    st.none() | tokens,  # eos
    st.lists(tokens, max_size=2),  # stop token ids
    st.sampled_from([None, "a"]),  # LoRA adapter
    st.integers(0, 2),  # priority
)


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        config=configs,
        prefixes=st.lists(st.lists(tokens, min_size=2, max_size=12), min_size=1, max_size=3),
        initial=st.lists(request_specs, min_size=2, max_size=6),
    )
    def setup(self, config: SchedulerConfig, prefixes: list[list[int]], initial) -> None:
        self.cfg = config
        self.scheduler = Scheduler(config)
        self.model = FakePagedModel(config.block_size)
        self.prefixes = prefixes
        self.expected: dict[str, list[int]] = {}  # prompt + sampled tokens, per live request
        self.spec: dict[str, Request] = {}
        self.live: set[str] = set()
        self.ever: list[str] = []
        self.pending = None
        self.finished_since_schedule: set[str] = set()
        self.aborted_since_update: set[str] = set()
        self.counter = 0
        self.mid_step = False
        for spec in initial:  # start every example under some load
            self._add(*spec)

    # ---- rules -----------------------------------------------------------------------

    @rule(batch=st.lists(request_specs, min_size=1, max_size=3))
    def add(self, batch):
        for spec in batch:
            self._add(*spec)

    def _add(self, prefix, suffix, max_tokens, eos, stops, lora, priority):
        prompt = self.prefixes[prefix % len(self.prefixes)] + suffix
        rid = f"r{self.counter}"
        self.counter += 1
        req = Request(
            rid,
            prompt,
            max_tokens,
            eos_token_id=eos,
            stop_token_ids=stops,
            lora_name=lora,
            priority=priority,
        )
        cfg = self.cfg
        too_big = len(prompt) + max_tokens - 1 > cfg.num_blocks * cfg.block_size
        too_long = not cfg.enable_chunked_prefill and len(prompt) > cfg.max_num_batched_tokens
        full = cfg.max_waiting is not None and len(self.scheduler.waiting) >= cfg.max_waiting
        try:
            self.scheduler.add(req)
        except QueueFull:
            assert full and not too_big and not too_long
            return
        except ValueError:
            assert too_big or too_long
            return
        assert not (too_big or too_long or full)
        self.expected[rid] = list(prompt)
        self.spec[rid] = req
        self.live.add(rid)
        self.ever.append(rid)

    @precondition(lambda self: self.pending is None)
    @rule()
    def schedule(self):
        self._schedule()

    @precondition(lambda self: self.pending is not None)
    @rule(data=st.data())
    def update(self, data):
        sampled = {rid: data.draw(tokens) for rid in self.pending.sample_request_ids}
        self._update(sampled)

    @precondition(lambda self: bool(self.ever))
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(self.ever))
        was_live = rid in self.live
        assert self.scheduler.abort(rid) is was_live
        if was_live:
            self.live.discard(rid)
            self.finished_since_schedule.add(rid)
            self.aborted_since_update.add(rid)
            assert self.spec[rid].status is RequestStatus.FINISHED

    @precondition(lambda self: len(self.live) >= 4)  # rarer, so requests pile up first
    @rule()
    def drain(self):
        """Arrivals stop: every request must finish within a bounded number of steps."""
        if self.pending is not None:
            self._update(self.model_tokens(self.pending))
        # Each step the head of the running list gains >= 1 token and is never the
        # FCFS victim; preemption can at most redo a request's tokens.
        bound = 10 + sum(3 * (len(self.expected[r]) + self.spec[r].max_tokens) for r in self.live)
        steps = 0
        while self.scheduler.has_unfinished():
            steps += 1
            assert steps <= bound, f"no progress after {bound} steps: {self.scheduler.running}"
            out = self._schedule()
            self._update(self.model_tokens(out))
        assert not self.live
        bm = self.scheduler.block_manager
        assert bm.num_used_blocks == 0
        assert bm.num_uncached_free_blocks + bm.num_cached_blocks == bm.num_blocks
        stats = self.scheduler.stats()
        assert (stats.num_running, stats.num_waiting, stats.kv_usage) == (0, 0, 0.0)
        event(f"preempted: {stats.num_preemptions_total > 0}")
        event(f"prefix-cache hit: {stats.prefix_cache_hit_tokens > 0}")
        event(f"finished requests: {min(len(self.ever), 10) // 5 * 5}+")

    def teardown(self):
        # Skip after a step that failed half-way: draining then would hide the first error.
        if getattr(self, "scheduler", None) is not None and not self.mid_step:
            self.drain()

    # ---- helpers -----------------------------------------------------------------------

    def model_tokens(self, out):
        return self.model.step(out)

    def _schedule(self):
        sched = self.scheduler
        bm = sched.block_manager
        cfg = self.cfg
        running_before = {r.request_id for r in sched.running}
        self.mid_step = True
        out = sched.schedule()
        assert out.num_scheduled_tokens == sum(len(s.token_ids) for s in out.scheduled)
        assert out.num_scheduled_tokens <= cfg.max_num_batched_tokens
        assert len(sched.running) <= cfg.max_num_seqs
        assert set(out.finished_request_ids) == self.finished_since_schedule
        self.finished_since_schedule = set()
        ids = [s.request_id for s in out.scheduled]
        assert len(ids) == len(set(ids))
        for rid in out.preempted_request_ids:
            assert rid in running_before
            assert rid not in ids
            assert self.spec[rid].status is RequestStatus.PREEMPTED
            assert self.spec[rid].block_table == []
        for item in out.scheduled:
            assert item.request_id in self.live
            stream = self.expected[item.request_id]
            end = item.start_position + len(item.token_ids)
            assert 1 <= len(item.token_ids)
            assert item.token_ids == stream[item.start_position : end]
            assert item.sample == (end == len(stream))
            assert item.lora_name == self.spec[item.request_id].lora_name
            for pos in item.positions:  # writes never touch a shared or cached block
                block = item.block_table[pos // cfg.block_size]
                assert bm.ref_count(block) == 1 and bm.block_key(block) is None
        self.model.write(out)
        for item in out.scheduled:  # the KV read back is this request's own stream
            end = item.start_position + len(item.token_ids)
            context = self.model.read(item.request_id, item.block_table, end, item.lora_name)
            assert context == self.expected[item.request_id][:end]
        self.pending = out if out.scheduled else None
        self.mid_step = False
        return out

    def _update(self, sampled):
        out, self.pending = self.pending, None
        self.mid_step = True
        for rid, token in sampled.items():
            if rid in self.live:
                self.expected[rid].append(token)
        finished = self.scheduler.update(sampled)
        reported = Counter(f.request_id for f in finished)
        assert all(n == 1 for n in reported.values())
        aborted = {f.request_id for f in finished if f.finish_reason is FinishReason.ABORT}
        assert aborted == self.aborted_since_update
        self.aborted_since_update = set()
        for f in finished:
            if f.finish_reason is FinishReason.ABORT:
                continue
            rid = f.request_id
            req = self.spec[rid]
            stream = self.expected[rid]
            assert rid in sampled
            assert f.output_token_ids == stream[req.num_prompt_tokens :]
            last = stream[-1]
            if last == req.eos_token_id or last in req.stop_token_ids:
                assert f.finish_reason is FinishReason.STOP
            else:
                assert f.finish_reason is FinishReason.LENGTH
                assert len(f.output_token_ids) == req.max_tokens
            self.live.discard(rid)
            self.finished_since_schedule.add(rid)
        for rid in sampled:
            if rid in self.live:  # still going: no stop condition was met
                req = self.spec[rid]
                assert stream_ok(req, self.expected[rid])
        assert out is None or set(sampled) <= set(out.sample_request_ids)
        self.mid_step = False

    # ---- invariants --------------------------------------------------------------------

    @invariant()
    def blocks_are_accounted_for(self):
        if getattr(self, "scheduler", None) is None:
            return
        sched = self.scheduler
        bm = sched.block_manager
        holders: Counter[int] = Counter()
        for req in sched.running:
            assert len(req.block_table) == len(set(req.block_table)), req
            holders.update(req.block_table)
            assert len(req.block_table) * bm.block_size >= req.num_computed_tokens
        for req in sched.waiting:
            assert req.block_table == []
        in_use = 0
        for block in range(bm.num_blocks):
            ref = bm.ref_count(block)
            assert ref >= 0
            assert ref == holders[block], (block, ref, holders[block])
            key = bm.block_key(block)
            if ref > 1:  # shared: only a cached prefix block
                assert key is not None and bm.cached_block(key) == block
            # A block holds an entry (key + prefix id) or neither.
            assert (key is None) == (bm.prefix_id(block) is None)
            in_use += ref > 0
        assert in_use == bm.num_used_blocks
        assert bm.num_uncached_free_blocks + bm.num_cached_blocks + in_use == bm.num_blocks
        # The key map and the per-block keys agree; prefix ids are unique and assigned;
        # every key is (root or assigned prefix id, block_size token ids).
        for key, block in bm._key_to_block.items():
            assert bm.block_key(block) == key
            parent = key[0]
            assert parent is None or isinstance(parent, str) or 1 <= parent < bm._next_prefix_id
            assert len(key) == bm.block_size + 1
        ids = [bm.prefix_id(b) for b in range(bm.num_blocks) if bm.prefix_id(b) is not None]
        assert len(ids) == len(set(ids)) == len(bm._key_to_block)
        if not self.cfg.enable_prefix_caching:
            assert not bm._key_to_block
        for req in sched.running:  # a published block's key holds the request's own tokens
            bs = bm.block_size
            for k in range(sched._entries[req.request_id].num_registered_blocks):
                key = bm.block_key(req.block_table[k])
                if key is not None:
                    assert list(key[1:]) == req.all_token_ids[k * bs : (k + 1) * bs]

    @invariant()
    def requests_are_consistent(self):
        if getattr(self, "scheduler", None) is None:
            return
        sched = self.scheduler
        assert len(sched.running) <= self.cfg.max_num_seqs
        assert set(sched.requests) == self.live
        assert {r.request_id for r in sched.running} | {
            r.request_id for r in sched.waiting
        } == self.live
        for rid in self.live:
            req = self.spec[rid]
            assert req.num_output_tokens <= req.max_tokens
            assert req.all_token_ids == self.expected[rid]


def stream_ok(req: Request, stream: list[int]) -> bool:
    out = stream[req.num_prompt_tokens :]
    if len(out) >= req.max_tokens:
        return False
    return not out or (out[-1] != req.eos_token_id and out[-1] not in req.stop_token_ids)


SchedulerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=30, deadline=None
)
TestSchedulerMachine = SchedulerMachine.TestCase
