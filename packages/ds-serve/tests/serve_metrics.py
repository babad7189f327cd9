"""Reading the server's Prometheus text in tests."""

from __future__ import annotations

import re
import time

import httpx


def scrape(url: str) -> dict[str, float]:
    """``name{labels}`` -> value, with the model_name label dropped."""
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or not line:
            continue
        key, value = line.rsplit(" ", 1)
        key = re.sub(r'model_name="[^"]*",?', "", key).replace("{}", "")
        values[key] = float(value)
    return values


def wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    """Metrics once nothing runs or waits and no KV block is referenced."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        idle = (
            m["vllm:num_requests_running"] == 0
            and m["vllm:num_requests_waiting"] == 0
            and m["vllm:kv_cache_usage_perc"] == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)
