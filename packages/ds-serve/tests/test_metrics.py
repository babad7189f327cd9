"""The Prometheus exposition text."""

from __future__ import annotations

import re

from ds_serve.metrics import Metrics

LINE = re.compile(r'^[a-z_:0-9]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+inf]+$')
GAUGES = {
    "running": 2,
    "waiting": 1,
    "kv_usage": 0.25,
    "free_blocks": 30,
    "prefix_queries": 100,
    "prefix_hits": 40,
    "preemptions": 0,
}


def test_every_line_is_valid_exposition_format():
    m = Metrics("tiny")
    m.on_prompt(5)
    m.on_token(ttft=0.03, itl=None)
    m.on_token(ttft=None, itl=0.2)
    m.on_finish("stop", 0.5)
    text = m.render(GAUGES)
    for line in text.splitlines():
        assert line.startswith("# ") or LINE.match(line), line


def test_vllm_names_and_values():
    m = Metrics("tiny")
    m.on_prompt(7)
    for i in range(3):
        m.on_token(ttft=0.05 if i == 0 else None, itl=None if i == 0 else 0.02)
    text = m.render(GAUGES)
    assert 'vllm:num_requests_running{model_name="tiny"} 2' in text
    assert 'vllm:kv_cache_usage_perc{model_name="tiny"} 0.25' in text
    assert 'vllm:prompt_tokens_total{model_name="tiny"} 7' in text
    assert 'vllm:generation_tokens_total{model_name="tiny"} 3' in text
    assert 'vllm:time_to_first_token_seconds_count{model_name="tiny"} 1' in text
    assert 'vllm:inter_token_latency_seconds_count{model_name="tiny"} 2' in text
    assert 'vllm:prefix_cache_hits_total{model_name="tiny"} 40' in text


def test_histogram_buckets_are_cumulative():
    m = Metrics("x")
    for v in (0.001, 0.05, 0.5, 100.0):
        m.on_token(ttft=v, itl=None)
    counts = [
        int(line.rsplit(" ", 1)[1])
        for line in m.render(GAUGES).splitlines()
        if line.startswith("vllm:time_to_first_token_seconds_bucket")
    ]
    assert counts == sorted(counts) and counts[-1] == 4
