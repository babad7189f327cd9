"""Compiled decode steps change no result: greedy outputs of concurrent requests through
an engine built with ``decode_steps="compile"`` (decode batches padded to batch-size
buckets, run through torch.compile) equal ``ds_model.generate`` (fp32)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ds_serve import build_engine

CHECK = """
import asyncio, sys
import torch
import ds_model
from ds_serve import SamplingParams, build_engine

torch.set_num_threads(1)
path = sys.argv[1]
engine = build_engine(path, decode_steps="compile", dtype="float32", num_blocks=64,
                      block_size=8, max_num_seqs=8, max_num_batched_tokens=64)
tok = engine.tokenizer
texts = ["def fibonacci(n):", "class Stack:", "import os", "The quick brown fox jumps",
         "while True:", "for i in range(10):\\n    print(i)"]
prompts = [tok.encode(t) for t in texts]

async def main():
    engine.start(asyncio.get_running_loop())
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=engine.eos_token_ids)
    ids = [engine.submit(p, params) for p in prompts]

    async def collect(rid):
        out = []
        async for delta in engine.stream(rid):
            out += delta.token_ids
        return out

    return await asyncio.gather(*(collect(r) for r in ids))

served = asyncio.run(main())
engine.shutdown()
reference = ds_model.from_pretrained(path, dtype="float32")
for text, prompt, got in zip(texts, prompts, served):
    want = list(ds_model.generate(reference, prompt, max_new_tokens=12))
    assert got == want, (text, got, want)
"""


@pytest.mark.slow
def test_concurrent_greedy_with_compiled_decode_steps_equals_generate(checkpoint):
    """In a child process: compiling starts worker threads and processes, after which
    this process's fork-based tests cannot fork safely."""
    done = subprocess.run(
        [sys.executable, "-c", CHECK, str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_unknown_decode_steps_are_refused(checkpoint):
    with pytest.raises(ValueError, match="decode_steps must be None"):
        build_engine(checkpoint, decode_steps="graphs")
