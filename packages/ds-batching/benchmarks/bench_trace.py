"""Simulated serving trace: static batching versus continuous batching.

1,000 requests with log-normal prompt and output lengths arrive as a Poisson process;
60% of them open with one of 8 shared 256-token system prompts. No model runs: each
model step costs simulated time by a simple cost model shaped like a dense ~7B model
on one GPU with ~2 TB/s and ~300 TFLOP/s (all three terms are assumptions, printed):

    step_ms = 7.0 (weights read once per step)
            + 0.05 x tokens computed in the step
            + 0.00025 x KV tokens attended in the step

* static: ``DynamicBatchScheduler(max_batch_size, max_tokens)``. Whenever
  the engine is idle it adds every request that has arrived and runs the batches this
  flushes (or flushes the partial batch rather than wait). A batch runs one prefill
  step, then decode steps until its longest output is done; finished rows keep being
  computed (padding), as in static ``generate``.
* continuous: ``Scheduler`` with ``max_num_seqs = max_batch_size`` and
  ``max_num_batched_tokens = max_tokens``, chunked prefill, a KV pool of
  ``--num-blocks`` x 16 tokens, with prefix caching off and on.

Counted: model steps, simulated time to serve the whole trace, mean request latency
(arrival to last token), preemptions, prefix-cache hit rate. The ratio
static / continuous is computed in the same run.

    uv run --frozen python packages/ds-batching/benchmarks/bench_trace.py
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass

from ds_batching import DynamicBatchScheduler, Request, Scheduler, SchedulerConfig

STEP_MS = 7.0
PER_TOKEN_MS = 0.05
PER_KV_TOKEN_MS = 0.00025
VOCAB = 32000


def step_ms(computed_tokens: int, attended_tokens: int) -> float:
    return STEP_MS + PER_TOKEN_MS * computed_tokens + PER_KV_TOKEN_MS * attended_tokens


@dataclass
class TraceRequest:
    request_id: str
    arrival_s: float
    prompt: list[int]
    output_len: int

    def __len__(self) -> int:  # what DynamicBatchScheduler counts: the prompt's tokens
        return len(self.prompt)


@dataclass
class Result:
    name: str
    steps: int
    sim_s: float
    mean_latency_s: float
    output_tokens: int
    preemptions: int = 0
    hit_rate: float | None = None
    wall_s: float = 0.0


def make_trace(n: int, rate: float, seed: int) -> list[TraceRequest]:
    rng = random.Random(seed)
    system_prompts = [[rng.randrange(VOCAB) for _ in range(256)] for _ in range(8)]
    trace, clock = [], 0.0
    for i in range(n):
        clock += rng.expovariate(rate)
        prompt_len = min(2048, max(4, round(rng.lognormvariate(math.log(200), 0.8))))
        output_len = min(1024, max(1, round(rng.lognormvariate(math.log(128), 0.9))))
        user = [rng.randrange(VOCAB) for _ in range(prompt_len)]
        prompt = (rng.choice(system_prompts) + user) if rng.random() < 0.6 else user
        trace.append(TraceRequest(f"r{i}", clock, prompt[:2048], output_len))
    return trace


def run_static(trace: list[TraceRequest], max_batch_size: int, max_tokens: int) -> Result:
    batches: list[list[TraceRequest]] = []
    batcher = DynamicBatchScheduler(
        max_batch_size, max_tokens, on_batch=lambda b: batches.append(b.requests)
    )
    clock, steps, latencies, nxt = 0.0, 0, [], 0
    while nxt < len(trace) or batches or len(batcher):
        if not batches:
            if nxt < len(trace) and trace[nxt].arrival_s > clock and not len(batcher):
                clock = trace[nxt].arrival_s  # idle until the next arrival
            while nxt < len(trace) and trace[nxt].arrival_s <= clock:
                batcher.add_request(trace[nxt])
                nxt += 1
            if not batches:
                batcher.flush()  # do not sit idle waiting for a full batch
        batch: list[TraceRequest] = batches.pop(0)
        prompt_lens = [len(r) for r in batch]
        longest = max(r.output_len for r in batch)
        clock += step_ms(sum(prompt_lens), sum(prompt_lens)) / 1000  # prefill samples token 1
        steps += 1
        for k in range(1, longest):  # every row is decoded until the longest is done
            clock += step_ms(len(batch), sum(p + k for p in prompt_lens)) / 1000
            steps += 1
        latencies.extend(clock - r.arrival_s for r in batch)
    return Result(
        "static DynamicBatchScheduler",
        steps,
        clock,
        statistics.fmean(latencies),
        sum(r.output_len for r in trace),
    )


def run_continuous(trace: list[TraceRequest], config: SchedulerConfig, name: str) -> Result:
    sched = Scheduler(config)
    clock, steps, nxt = 0.0, 0, 0
    finish: dict[str, float] = {}
    arrival = {r.request_id: r.arrival_s for r in trace}
    rng = random.Random(1)
    started = time.perf_counter()
    while nxt < len(trace) or sched.has_unfinished():
        while nxt < len(trace) and trace[nxt].arrival_s <= clock:
            r = trace[nxt]
            sched.add(Request(r.request_id, r.prompt, max_tokens=r.output_len))
            nxt += 1
        out = sched.schedule()
        if out.is_empty:
            sched.update({})
            clock = trace[nxt].arrival_s  # idle until the next arrival
            continue
        attended = sum(s.start_position + len(s.token_ids) for s in out.scheduled)
        clock += step_ms(out.num_scheduled_tokens, attended) / 1000
        steps += 1
        sampled = {rid: rng.randrange(VOCAB) for rid in out.sample_request_ids}
        for done in sched.update(sampled):
            finish[done.request_id] = clock
    wall = time.perf_counter() - started
    stats = sched.stats()
    return Result(
        name,
        steps,
        clock,
        statistics.fmean(finish[r] - arrival[r] for r in finish),
        sum(r.output_len for r in trace),
        stats.num_preemptions_total,
        stats.prefix_cache_hit_rate if config.enable_prefix_caching else None,
        wall,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[8.0, 64.0], help="mean arrivals per second"
    )
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--num-blocks", type=int, default=4096)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{sys.version.split()[0]}; simulated time, so the machine only affects 'wall s'"
    )
    print(
        f"trace: {args.requests} requests, Poisson arrivals, prompt "
        "lognormal(median 200, sigma 0.8) in [4, 2048] (+256 shared system tokens for 60%), "
        "output lognormal(median 128, sigma 0.9) in [1, 1024]"
    )
    print(
        f"cost model: step_ms = {STEP_MS} + {PER_TOKEN_MS} x computed tokens + "
        f"{PER_KV_TOKEN_MS} x attended KV tokens"
    )
    print(
        f"limits: max_batch_size = max_num_seqs = {args.max_batch_size}, max_tokens = "
        f"max_num_batched_tokens = {args.max_tokens}, KV pool {args.num_blocks} x 16 tokens "
        f"(continuous only); medians over seeds {args.seeds}"
    )
    for rate in args.rates:
        print(f"\narrival rate {rate:g} requests/s:\n")
        print_table(args, rate)


def print_table(args: argparse.Namespace, rate: float) -> None:
    runs: dict[str, list[Result]] = {}
    for seed in args.seeds:
        trace = make_trace(args.requests, rate, seed)
        results = [run_static(trace, args.max_batch_size, args.max_tokens)]
        for caching in (False, True):
            config = SchedulerConfig(
                max_num_seqs=args.max_batch_size,
                max_num_batched_tokens=args.max_tokens,
                block_size=16,
                num_blocks=args.num_blocks,
                enable_chunked_prefill=True,
                enable_prefix_caching=caching,
            )
            label = "continuous Scheduler, prefix caching " + ("on" if caching else "off")
            results.append(run_continuous(trace, config, label))
        for r in results:
            runs.setdefault(r.name, []).append(r)

    med = statistics.median
    static = runs["static DynamicBatchScheduler"]
    base_steps = med(r.steps for r in static)
    base_time = med(r.sim_s for r in static)
    print(
        "| scheduler | model steps | steps ratio (static / this) | simulated s "
        "| time ratio (static / this) | mean latency s | output tok/s (simulated) "
        "| preemptions | prefix hit rate | scheduler wall s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rs in runs.items():
        steps, sim = med(r.steps for r in rs), med(r.sim_s for r in rs)
        hit = rs[0].hit_rate
        hit_text = "-" if hit is None else f"{med(r.hit_rate for r in rs):.1%}"
        wall = "-" if name.startswith("static") else f"{med(r.wall_s for r in rs):.2f}"
        print(
            f"| {name} | {steps:.0f} | {base_steps / steps:.2f}x | {sim:.1f} | "
            f"{base_time / sim:.2f}x | {med(r.mean_latency_s for r in rs):.1f} | "
            f"{med(r.output_tokens / r.sim_s for r in rs):.0f} | "
            f"{med(r.preemptions for r in rs):.0f} | {hit_text} | {wall} |"
        )


if __name__ == "__main__":
    main()
