"""Bucketed decode steps of the serving runner: decode-only batches padded to a
batch-size bucket (padding rows in the scratch block), run through torch.compile or a
CUDA graph, must give the eager runner's logits and leave every real block of the pool
as the eager runner leaves it; other steps and oversized batches run eagerly."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import ds_model
import pytest
import torch
from ds_model import ModelConfig, ModelRunner
from ds_model.decode_buckets import DecodeBuckets, pick_bucket
from hypothesis import given, settings
from hypothesis import strategies as st

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()
LLAMA = S.LLAMA_GQA


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 128), min_size=1, max_size=6, unique=True), st.integers(1, 200))
def test_pick_bucket_is_the_smallest_that_holds_the_batch(buckets, rows):
    buckets = sorted(buckets)
    got = pick_bucket(rows, buckets)
    holding = [b for b in buckets if b >= rows]
    assert got == (min(holding) if holding else None)


def _serve(runner, model, steps, block_size, seed):
    """Prefills 5 sequences, then runs the decode ``steps`` (lists of sequence indices);
    returns every step's logits."""
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    lengths = [rng.randrange(1, 3 * block_size) for _ in range(5)]
    free = list(range(runner.num_blocks))
    rng.shuffle(free)
    per_seq = -(-(max(lengths) + len(steps)) // block_size)
    tables = [[free.pop() for _ in range(per_seq)] for _ in lengths]
    seqs = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    out = [runner.step(seqs, [0] * 5, tables)]
    for rows in steps:
        tokens = [[rng.randrange(vocab)] for _ in rows]
        out.append(runner.step(tokens, [len(seqs[s]) for s in rows], [tables[s] for s in rows]))
        for s, t in zip(rows, tokens):
            seqs[s] += t
    return out


@pytest.mark.parametrize("kind", ["mla", "gqa"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_padded_decode_steps_equal_the_eager_runner(kind, block_size):
    """The fixed-shape padded step (run eagerly under ``force_eager``: the same code
    torch.compile traces) against the eager runner; batches of 3 and 1 pad to buckets
    4 and 2, a batch of 5 is beyond the buckets and runs eagerly."""
    config = ModelConfig.from_preset("tiny") if kind == "mla" else LLAMA
    model = ds_model.from_config(config, seed=0)
    eager = ModelRunner(model, num_blocks=40, block_size=block_size)
    bucketed = ModelRunner(
        model, num_blocks=40, block_size=block_size, decode_steps="compile", decode_buckets=(2, 4)
    )
    steps = [[0, 2, 4], [1], [0, 1, 2, 3, 4], [3, 4, 0], [2]]
    want = _serve(eager, model, steps, block_size, seed=block_size)
    with torch.compiler.set_stance("force_eager"):
        got = _serve(bucketed, model, steps, block_size, seed=block_size)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)
    # Padding rows wrote only the scratch block: every real block matches.
    for mine, theirs in zip(bucketed.cache.layers, eager.cache.layers):
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a[:40], b, atol=2e-5, rtol=2e-5)


def test_the_scratch_block_is_not_the_schedulers():
    model = ds_model.from_config(ModelConfig.from_preset("tiny"), seed=0)
    runner = ModelRunner(model, num_blocks=6, block_size=4, decode_steps="compile")
    assert runner.num_blocks == 6 and runner.cache.num_blocks == 7
    with pytest.raises(ValueError, match=r"block ids \[6\] are outside the pool \[0, 6\)"):
        runner.step([[1, 2]], [0], [[6]])


def test_bad_decode_step_options_are_refused():
    model = ds_model.from_config(ModelConfig.from_preset("tiny"), seed=0)
    with pytest.raises(ValueError, match="mode='graphs' must be one of"):
        ModelRunner(model, num_blocks=4, decode_steps="graphs")
    with pytest.raises(ValueError, match="mode='cuda_graph' needs a CUDA model"):
        ModelRunner(model, num_blocks=4, decode_steps="cuda_graph")
    with pytest.raises(ValueError, match="decode buckets must be positive ints"):
        ModelRunner(model, num_blocks=4, decode_steps="compile", decode_buckets=(0, 2))
    windowed = ds_model.from_config(ModelConfig.from_preset("tiny", sliding_window=8), seed=0)
    with pytest.raises(ValueError, match="needs decode rows that read the pool in place"):
        ModelRunner(windowed, num_blocks=4, decode_steps="compile")


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_the_compiled_step_takes_each_pool_tensor_once(kind, monkeypatch):
    """A second tensor aliasing the pool among the compiled step's inputs (a view kept on
    the cache) makes torch.compile copy the whole pool at every step: ds-serve's
    default 8,192-block pool made a 1.8 ms step take 154 ms. The graph is traced by
    dynamo and run as traced (a recording backend), so no compiler runs."""
    traced_inputs = []

    def recording(gm, example_inputs):
        traced_inputs.append(list(example_inputs))
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=recording, **kw))
    config = ModelConfig.from_preset("tiny") if kind == "mla" else LLAMA
    model = ds_model.from_config(config, seed=0)
    runner = ModelRunner(
        model, num_blocks=12, block_size=4, decode_steps="compile", decode_buckets=(1,)
    )
    runner.decode_steps.warm_up()
    pools = [t.untyped_storage().data_ptr() for layer in runner.cache.layers for t in layer]
    assert traced_inputs
    for inputs in traced_inputs:
        on_pool = [
            t.untyped_storage().data_ptr()
            for t in inputs
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in pools
        ]
        assert sorted(on_pool) == sorted(pools)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_row_buckets_of_a_float32_model_run_fp32_gemv(dtype, monkeypatch):
    """A float32 CPU model's buckets of 2-4 rows trace a graph of their own whose float32
    layers call ds-quant's ``fp32_gemv`` op (on the input-major weights); the larger
    buckets' graph keeps the matmul. A bfloat16 model has no such graph. Traced by dynamo
    with a recording backend, so no compiler runs."""
    from ds_quant.kernels import cpu_gemv

    if not cpu_gemv.fp32_rows():
        pytest.skip("ds-quant's CPU kernel is not built")
    traced = []

    def recording(gm, example_inputs):
        traced.append({str(node.target) for node in gm.graph.nodes})
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=recording, **kw))
    model = ds_model.from_config(LLAMA, seed=0).to(dtype)
    runner = ModelRunner(
        model, num_blocks=12, block_size=4, decode_steps="compile", decode_buckets=(2, 4, 8)
    )
    steps = runner.decode_steps
    op = "ds_quant.fp32_gemv_cpu.default"
    with torch.inference_mode():
        for bucket in (8, 4, 2):  # largest first, as warm_up builds them
            steps._call(steps.inputs([], [], [], bucket, 2), bucket)
    if dtype == torch.float32:
        assert len(traced) == 2, [len(t) for t in traced]
        assert op not in traced[0] and op in traced[1]
    else:
        assert len(traced) == 1 and op not in traced[0]


COMPILED_CHECK = """
import random, torch
import torch._dynamo.utils as dynamo_utils
import ds_model
from ds_model import ModelConfig, ModelRunner
from test_decode_buckets import _serve
torch.set_num_threads(1)
model = ds_model.from_config(ModelConfig.from_preset("tiny"), seed=0)
eager = ModelRunner(model, num_blocks=40, block_size=4)
compiled = ModelRunner(model, num_blocks=40, block_size=4, decode_steps="compile",
                       decode_buckets=(2, 4))
compiled.decode_steps.warm_up()
graphs = dynamo_utils.counters["stats"]["unique_graphs"]
skipped = []
set_stance = torch.compiler.set_stance
def counting_set_stance(*args, **kwargs):
    skipped.append(kwargs.get("skip_guard_eval_unsafe", False))
    return set_stance(*args, **kwargs)
torch.compiler.set_stance = counting_set_stance
# Batches of 3, 1, 2 pad to buckets 4, 2, 2; 5 rows run eagerly.
steps = [[0, 2, 4], [1], [0, 1, 2, 3, 4], [3, 4, 0], [2, 1], [0, 1]] * 3
want = _serve(eager, model, steps, 4, seed=1)
got = _serve(compiled, model, steps, 4, seed=1)
torch.compiler.set_stance = set_stance
for g, w in zip(got, want):
    torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert g.argmax(-1).tolist() == w.argmax(-1).tolist()
# One graph for both buckets, built by the warm-up; growing contexts compile nothing.
assert graphs == 1, graphs
assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs, "recompiled after warm-up"
# A bucket's first call after an eager step (the prefill, the 5-row batches) checks the
# guards; its later calls skip them: [0, 1] in the first round, then [0, 2, 4], [1]
# and [0, 1] in each of the two others.
assert skipped == [True] * 7, skipped
# A model changed between requests: the next request's prefill makes the compiled steps
# check their guards, which recompile for the new attention scale.
before = _serve(eager, model, steps, 4, seed=2)
for layer in model.model.layers:
    layer.self_attn.softmax_scale *= 20
want = _serve(eager, model, steps, 4, seed=2)
assert any(not torch.allclose(b, w) for b, w in zip(before, want)), "the scale changed nothing"
got = _serve(compiled, model, steps, 4, seed=2)
for g, w in zip(got, want):
    torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
# A change between requests that rules out the absorbed form (MLA forced naive): the
# next prefill sees it, and no later decode takes a compiled step.
impls = [layer.self_attn.impl for layer in model.model.layers]
for layer in model.model.layers:
    layer.self_attn.impl = "naive"
bucketed = []
run = compiled.decode_steps.run
compiled.decode_steps.run = lambda *args: bucketed.append(args) or run(*args)
want = _serve(eager, model, steps, 4, seed=3)
got = _serve(compiled, model, steps, 4, seed=3)
assert not bucketed, f"{len(bucketed)} compiled steps ran after the model ruled them out"
for g, w in zip(got, want):
    torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
compiled.decode_steps.run = run
for layer, impl in zip(model.model.layers, impls):
    layer.self_attn.impl = impl
# Two models' compiled runners in one process, their steps interleaved: their graphs
# share the bucketed step's code, and skipping guards must never run the other's.
other = ds_model.from_config(ModelConfig.from_preset("tiny", hidden_size=48), seed=3)
other_eager = ModelRunner(other, num_blocks=40, block_size=4)
other_compiled = ModelRunner(other, num_blocks=40, block_size=4, decode_steps="compile",
                             decode_buckets=(2, 4))
other_compiled.decode_steps.warm_up()
pairs = [(eager, compiled), (other_eager, other_compiled)]
tables = [[4 * s + b for b in range(4)] for s in range(3)]  # 3 sequences, 16 slots each
for plain, bucketed in pairs:
    for runner in (plain, bucketed):
        runner.step([[5, 6, 7], [8, 9], [10, 11, 12, 13]], [0, 0, 0], tables)
lengths = [3, 2, 4]
rng = random.Random(4)
skipped.clear()
torch.compiler.set_stance = counting_set_stance
for _ in range(6):
    tokens = [[rng.randrange(model.config.vocab_size)] for _ in lengths]
    for plain, bucketed in pairs:
        want = plain.step(tokens, lengths, tables)
        got = bucketed.step(tokens, lengths, tables)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    lengths = [n + 1 for n in lengths]
torch.compiler.set_stance = set_stance
assert skipped == [True] * 10, skipped  # each runner's steps after its first skipped guards
"""


@pytest.mark.slow
def test_compiled_decode_steps_equal_the_eager_runner():
    """The real torch.compile, in a child process (compiling starts worker threads and
    processes, after which this process's fork-based tests cannot fork safely)."""
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_CHECK],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=__file__.rsplit("/", 1)[0],
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_cuda_graph_decode_steps_equal_the_eager_runner(kind):
    config = ModelConfig.from_preset("tiny") if kind == "mla" else LLAMA
    model = ds_model.from_config(config, seed=0, device="cuda")
    eager = ModelRunner(model, num_blocks=40, block_size=16)
    graphed = ModelRunner(
        model, num_blocks=40, block_size=16, decode_steps="cuda_graph", decode_buckets=(2, 4)
    )
    assert isinstance(graphed.decode_steps, DecodeBuckets)
    steps = [[0, 2, 4], [1], [0, 1, 2, 3, 4], [3, 4, 0], [2]] * 2
    want = _serve(eager, model, steps, 16, seed=0)
    got = _serve(graphed, model, steps, 16, seed=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
