"""Property test of the engine over random request streams: whatever mix of prompts,
lengths, stop strings, sampling and aborts arrives, every request ends exactly once,
never exceeds max_tokens, and the KV pool is whole again at the end."""

from __future__ import annotations

import asyncio

from ds_serve import SamplingParams, build_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

request = st.fixed_dictionaries(
    {
        "prompt_len": st.integers(1, 40),
        "max_tokens": st.integers(1, 24),
        "temperature": st.sampled_from([0.0, 0.7, 1.5]),
        "stop": st.sampled_from([(), ("e",), (" ", "ab")]),
        "abort_after": st.none() | st.integers(0, 6),
    }
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    requests=st.lists(request, min_size=1, max_size=12),
    num_blocks=st.integers(6, 40),
    seed=st.integers(0, 1000),
)
def test_random_request_streams_end_cleanly_and_free_the_pool(
    checkpoint, requests, num_blocks, seed
):
    engine = build_engine(
        checkpoint,
        num_blocks=num_blocks,
        block_size=8,
        max_num_seqs=6,
        max_num_batched_tokens=24,
        max_waiting=64,
        dtype="float32",
    )

    async def run():
        engine.start()
        ids = {}
        for i, r in enumerate(requests):
            prompt = [(seed + i * 31 + k * 7) % 500 + 3 for k in range(r["prompt_len"])]
            params = SamplingParams(
                temperature=r["temperature"],
                max_tokens=r["max_tokens"],
                stop=r["stop"],
                seed=seed + i,
                stop_token_ids=engine.eos_token_ids,
            )
            try:
                ids[engine.submit(prompt, params)] = r
            except ValueError:  # could never fit this pool: refused up front, not hung
                assert r["prompt_len"] + r["max_tokens"] - 1 > num_blocks * 8

        async def consume(rid, r):
            deltas = []
            async for delta in engine.stream(rid):
                deltas.append(delta)
                if r["abort_after"] is not None and len(deltas) > r["abort_after"]:
                    engine.abort(rid)
            return deltas

        return ids, await asyncio.wait_for(
            asyncio.gather(*(consume(rid, r) for rid, r in ids.items())), timeout=120
        )

    try:
        ids, streams = asyncio.run(run())
        for r, deltas in zip(ids.values(), streams):
            reasons = [d.finish_reason for d in deltas if d.finish_reason is not None]
            assert len(reasons) == 1 and deltas[-1].finish_reason == reasons[0]
            assert reasons[0] in ("stop", "length", "abort")
            generated = sum(len(d.token_ids) for d in deltas)
            assert generated == deltas[-1].completion_tokens <= r["max_tokens"]
            if reasons[0] == "length":
                assert generated == r["max_tokens"]
            if r["abort_after"] is None:
                assert reasons[0] != "abort"
            text = "".join(d.text for d in deltas)
            assert not any(s in text for s in r["stop"])
        stats = engine.stats()
        assert stats["tracked"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
        assert stats["kv_usage"] == 0 and stats["free_blocks"] == num_blocks
    finally:
        engine.shutdown()
