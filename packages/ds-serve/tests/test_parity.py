"""Batching never changes results: greedy outputs through the server under concurrency,
chunked prefill, prefix sharing and preemption equal ``ds_model.generate`` (fp32)."""

from __future__ import annotations

import asyncio

import httpx
from ds_serve import create_app
from serve_live import LiveServer
from serve_metrics import wait_idle

from conftest import greedy_reference

# Long shared prefixes (prefix-cache hits) and prompts longer than the token budget
# (chunked prefill).
BASE = "def fibonacci(n):\n    if n < 2:\n        return n\n"
PROMPTS = [BASE + f"# case {i}\n" + "x = " * (i % 4) for i in range(12)] + [
    "class Stack:",
    "import os\n",
    "The quick brown",
    "while True:",
]
MAX_TOKENS = 16


def test_concurrent_greedy_equals_generate_with_chunking_and_preemption(
    checkpoint, reference_model
):
    # 12 blocks of 8 slots cannot hold 16 requests of ~30-60 tokens: preemption must happen.
    app = create_app(
        checkpoint,
        num_blocks=24,
        block_size=8,
        max_num_seqs=16,
        max_num_batched_tokens=32,
        dtype="float32",
    )

    async def run(url):
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        url + "/v1/completions",
                        json={"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0},
                    )
                    for p in PROMPTS
                )
            )

    with LiveServer(app) as live:
        responses = asyncio.run(run(live.url))
        metrics = wait_idle(live.url)
    for prompt, response in zip(PROMPTS, responses):
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == greedy_reference(
            reference_model, prompt, MAX_TOKENS
        ), prompt
    assert metrics["vllm:num_preemptions_total"] >= 1
    assert metrics["vllm:prefix_cache_hits_total"] > 0
    assert metrics["vllm:kv_cache_usage_perc"] == 0
