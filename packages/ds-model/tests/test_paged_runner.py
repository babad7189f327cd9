"""The serving runner's paged step: decode rows attend over the block pool in place
(MLA's absorbed form over the cached latent, GQA over paged K/V), prefill and
chunked-prefill rows over their gathered context, in any mix. Every sequence's logits
must equal the model's plain forward over its whole context."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import ds_model
import pytest
import torch
from ds_model import ModelConfig, ModelRunner
from hypothesis import given, settings
from hypothesis import strategies as st

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()
MODELS = {"mla": S.tiny_v3(), "gqa": S.gqa_llama()}


def serve_and_compare(model, block_size: int, cached: list[int], new: list[int], seed: int):
    """Caches ``cached[s]`` tokens of each sequence (one prefill step, where any), then
    runs one step feeding ``new[s]`` tokens each (1: a decode row; more: a prefill or
    a chunked prefill) with blocks drawn in shuffled order; compares the step's logits
    against the plain forward of each whole sequence."""
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    need = [-(-(c + n) // block_size) for c, n in zip(cached, new)]
    free = list(range(sum(need) + 2))
    rng.shuffle(free)
    runner = ModelRunner(model, num_blocks=len(free), block_size=block_size)
    tables = [[free.pop() for _ in range(k)] for k in need]
    seqs = [[rng.randrange(vocab) for _ in range(c + n)] for c, n in zip(cached, new)]
    warm = [s for s, c in enumerate(cached) if c]
    if warm:
        runner.step(
            [seqs[s][: cached[s]] for s in warm], [0] * len(warm), [tables[s] for s in warm]
        )
    got = runner.step([seq[c:] for seq, c in zip(seqs, cached)], cached, tables)
    with torch.no_grad():
        want = torch.stack([model(torch.tensor([seq])).logits[0, -1] for seq in seqs])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(sorted(MODELS)),
    block_size=st.sampled_from([1, 3, 4, 16]),
    batch=st.lists(
        st.tuples(st.integers(0, 24), st.sampled_from([1, 1, 2, 5])), min_size=1, max_size=5
    ),
    seed=st.integers(0, 2**16),
)
def test_paged_step_equals_plain_forward(kind, block_size, batch, seed):
    cached, new = [c for c, _ in batch], [n for _, n in batch]
    serve_and_compare(MODELS[kind], block_size, cached, new, seed)


def test_decode_rows_read_the_pool_in_place():
    """A decode-only step never gathers a context: the writer holds no read slots and
    hands each layer the pool itself with the decode rows' block tables."""
    model = MODELS["mla"]
    runner = ModelRunner(model, num_blocks=8, block_size=4)
    runner.step([[1, 2, 3, 4, 5], [6, 7]], [0, 0], [[5, 2], [7]])
    seen = []
    original = ds_model.cache.PagedWriter.context
    ds_model.cache.PagedWriter.context = lambda self, i: seen.append(i) or original(self, i)
    try:
        writers = []
        forward = model.model.forward
        model.model.forward = lambda *a, **k: writers.append(k["cache"]) or forward(*a, **k)
        runner.step([[8], [9]], [5, 2], [[5, 2], [7]])
    finally:
        ds_model.cache.PagedWriter.context = original
        del model.model.forward
    assert seen == []
    (writer,) = writers
    assert writer.num_decode == 2 and writer.read_slots.numel() == 0
    assert writer.block_tables.tolist() == [[5, 2], [7, 0]]
    assert writer.context_lens.tolist() == [6, 3]


def test_lora_kv_b_proj_decodes_over_gathered_contexts():
    """A wrapped kv_b_proj cannot be absorbed: its decode rows read gathered contexts,
    and the served logits still equal the plain forward."""
    model = ds_model.from_config(ModelConfig.from_preset("tiny"), seed=0)
    attn = model.model.layers[0].self_attn
    attn.kv_b_proj = torch.nn.Sequential(attn.kv_b_proj)  # any non-plain module
    runner = ModelRunner(model, num_blocks=8, block_size=4)
    assert not runner._decodes_in_place()
    serve_and_compare(model, 4, [5, 0, 3], [1, 4, 1], seed=1)


TRITON_SCRIPT = f"LLAMA = {S.LLAMA_GQA!r}\n" + textwrap.dedent(
    """
    import random, torch, ds_model
    from ds_model import ModelConfig, ModelRunner
    for make in (lambda **k: ModelConfig.from_preset("tiny", **k),
                 lambda **k: ModelConfig.from_dict({**LLAMA, **k})):
        plain = ds_model.from_config(make(), seed=0)
        served = ds_model.from_config(make(attention_backend="triton"), seed=0)
        rng = random.Random(0)
        runner = ModelRunner(served, num_blocks=12, block_size=16)
        tables = [[3, 7], [0, 9], [5, 2]]
        seqs = [[rng.randrange(128) for _ in range(n)] for n in (20, 17, 3)]
        runner.step([seqs[0][:19], seqs[1][:16]], [0, 0], tables[:2])
        got = runner.step([seqs[0][19:], seqs[1][16:], seqs[2]], [19, 16, 0], tables)
        with torch.no_grad():
            want = torch.stack([plain(torch.tensor([s])).logits[0, -1] for s in seqs])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    print("ok")
    """
)


def test_paged_step_through_the_triton_kernels_in_the_interpreter():
    """attention_backend='triton': decode rows through ds-attention's Triton paged
    decode kernel (MLA's shared latent and GQA), prefill rows through its Triton flash
    kernel, both in the interpreter (a fresh process: it must be set before Triton loads)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"
