"""The benchmark scripts still run, on tiny inputs (their numbers live in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ds_batching import SchedulerConfig

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_ds_batching_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"_ds_batching_{name}"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_trace_simulation_serves_every_request_in_fewer_steps_than_static():
    bench = load("bench_trace")
    trace = bench.make_trace(60, rate=50.0, seed=0)
    static = bench.run_static(trace, max_batch_size=8, max_tokens=4096)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096, num_blocks=1024)
    continuous = bench.run_continuous(trace, config, "continuous")
    total_output = sum(r.output_len for r in trace)
    assert static.output_tokens == continuous.output_tokens == total_output
    # A static batch decodes until its longest member is done, so it needs at least as
    # many steps as its longest output; continuous batching refills freed slots.
    assert continuous.steps < static.steps
    assert continuous.sim_s < static.sim_s


def test_overhead_benchmark_times_steady_decodes():
    bench = load("bench_overhead")
    samples, cpu_us = bench.time_scheduler(8, iters=20, prompt_len=16, seed=0)
    assert len(samples) == 20 and all(s > 0 for s in samples) and cpu_us > 0


def test_staggered_prompts_spread_block_publishing_over_the_steps():
    bench = load("bench_overhead")
    sched = bench.make_running(32, prompt_len=16, steps=20, seed=0, stagger=True)
    sampled = {f"req-{i}": 11 for i in range(32)}
    published = []
    for _ in range(16):
        before = sched.block_manager.num_used_blocks
        sched.schedule()
        sched.update(sampled)
        published.append(sched.block_manager.num_used_blocks - before)
    # Two requests per offset in the block: every step opens exactly two new blocks.
    assert published == [2] * 16


def test_overhead_benchmark_splits_steps_by_kind():
    bench = load("bench_overhead")
    kinds = bench.time_phases(8, iters=40, prompt_len=16, seed=0)
    # With block_size 16, one step in 16 publishes full blocks and the next opens new ones.
    assert len(kinds["publish"]) in (2, 3) and len(kinds["open"]) in (2, 3)
    assert sum(len(rows) for rows in kinds.values()) == 40
