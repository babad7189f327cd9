"""Prometheus text exposition with vLLM's metric names, so vLLM dashboards work unchanged.

Gauges are read from the engine when scraped; counters and histograms are updated by
the engine thread. A small hand-written registry (no prometheus_client dependency):
the text format is simple and the set of metrics is fixed.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

__all__ = ["Histogram", "Metrics"]

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self, name: str, labels: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            lines.append(f'{name}_bucket{{{labels},le="{le}"}} {cumulative}')
        lines.append(f"{name}_sum{{{labels}}} {self.total}")
        lines.append(f"{name}_count{{{labels}}} {self.count}")
        return lines


class Metrics:
    """Counters and histograms the engine updates; ``render`` adds the live gauges."""

    def __init__(self, model_name: str) -> None:
        self._lock = threading.Lock()
        self.model_name = model_name
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_finished: dict[str, int] = {}
        self.requests_rejected = 0
        self.unknown_fields = 0
        self.preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(TTFT_BUCKETS)

    def on_prompt(self, num_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += num_tokens

    def on_token(self, ttft: float | None, itl: float | None) -> None:
        with self._lock:
            self.generation_tokens += 1
            if ttft is not None:
                self.ttft.observe(ttft)
            if itl is not None:
                self.itl.observe(itl)

    def on_finish(self, reason: str, e2e: float) -> None:
        with self._lock:
            self.requests_finished[reason] = self.requests_finished.get(reason, 0) + 1
            self.e2e.observe(e2e)

    def on_reject(self) -> None:
        with self._lock:
            self.requests_rejected += 1

    def on_unknown_fields(self, count: int) -> None:
        with self._lock:
            self.unknown_fields += count

    def render(self, gauges: dict[str, float]) -> str:
        """The exposition text. ``gauges``: running, waiting, kv_usage, prefix cache counts."""
        labels = f'model_name="{self.model_name}"'
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, lines: list[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)

        def scalar(name: str, kind: str, help_text: str, value: float) -> None:
            metric(name, kind, help_text, [f"{name}{{{labels}}} {value}"])

        with self._lock:
            scalar(
                "vllm:num_requests_running",
                "gauge",
                "Requests in the running batch.",
                gauges["running"],
            )
            scalar(
                "vllm:num_requests_waiting",
                "gauge",
                "Requests waiting to be scheduled.",
                gauges["waiting"],
            )
            scalar(
                "vllm:kv_cache_usage_perc",
                "gauge",
                "Fraction of KV-cache blocks in use (0 to 1).",
                gauges["kv_usage"],
            )
            scalar(
                "vllm:num_kv_blocks_free",
                "gauge",
                "KV-cache blocks free or cached.",
                gauges["free_blocks"],
            )
            scalar(
                "vllm:prefix_cache_queries_total",
                "counter",
                "Prompt tokens looked up in the prefix cache.",
                gauges["prefix_queries"],
            )
            scalar(
                "vllm:prefix_cache_hits_total",
                "counter",
                "Prompt tokens found in the prefix cache.",
                gauges["prefix_hits"],
            )
            scalar(
                "vllm:num_preemptions_total",
                "counter",
                "Requests preempted.",
                gauges["preemptions"],
            )
            scalar(
                "vllm:prompt_tokens_total",
                "counter",
                "Prompt tokens processed.",
                self.prompt_tokens,
            )
            scalar(
                "vllm:generation_tokens_total",
                "counter",
                "Tokens generated.",
                self.generation_tokens,
            )
            scalar(
                "vllm:request_rejected_total",
                "counter",
                "Requests refused because the waiting queue was full (HTTP 429).",
                self.requests_rejected,
            )
            scalar(
                "ds_serve:ignored_request_fields_total",
                "counter",
                "Unknown top-level request fields accepted and ignored.",
                self.unknown_fields,
            )
            metric(
                "vllm:request_success_total",
                "counter",
                "Finished requests by reason.",
                [
                    f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {n}'
                    for reason, n in sorted(self.requests_finished.items())
                ],
            )
            metric(
                "vllm:time_to_first_token_seconds",
                "histogram",
                "Time from arrival to the first generated token.",
                self.ttft.render("vllm:time_to_first_token_seconds", labels),
            )
            metric(
                "vllm:inter_token_latency_seconds",
                "histogram",
                "Time between consecutive generated tokens of a request.",
                self.itl.render("vllm:inter_token_latency_seconds", labels),
            )
            metric(
                "vllm:e2e_request_latency_seconds",
                "histogram",
                "Time from arrival to the last token.",
                self.e2e.render("vllm:e2e_request_latency_seconds", labels),
            )
        return "\n".join(out) + "\n"
