"""The captured (CUDA-graph) decode step against the eager one.

On CPU the graphed step runs eagerly (``capture`` is off there): the same fixed-shape
step over the whole cache, with a visibility mask and stacked expert weights, which
is what the GPU captures (its routed experts then take their grouped form, tested here
against the loop). The ``gpu`` tests capture for real.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import ds_model
import ds_model.generation as generation
import pytest
import torch
from ds_model.cuda_graph import (
    CAPACITY_STEP,
    MIN_CAPACITY,
    GraphedDecoder,
    decode_capacity,
    graphable,
)
from ds_model.moe import RoutedExperts
from hypothesis import given, settings
from hypothesis import strategies as st

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()
v3 = S.tiny_v3


def llama():
    return S.gqa_llama(max_position_embeddings=512)


@pytest.fixture
def graphable_everywhere(monkeypatch):
    """Let generate take the graphed path on CPU, where a "replay" runs the step."""

    def record(decoder):
        class Replay:
            def replay(self):
                decoder.logits = decoder._run()

        decoder.graph = Replay()

    monkeypatch.setattr(generation, "graphable", lambda model: True)
    monkeypatch.setattr(GraphedDecoder, "_record", record)


@pytest.mark.parametrize("make", [v3, llama], ids=["v3", "llama"])
@pytest.mark.parametrize(
    "prompts", [[[5, 6, 7, 8]], [[5, 6, 7, 8], [9, 10], [11, 12, 13]]], ids=["one", "padded"]
)
def test_graphed_generate_equals_eager(graphable_everywhere, make, prompts):
    model = make()
    eager = model.generate(prompts, 10, cuda_graph=False)
    assert model.generate(prompts, 10) == eager
    assert model.generate(prompts, 10, temperature=0.8, seed=3) == model.generate(
        prompts, 10, temperature=0.8, seed=3, cuda_graph=False
    )


@settings(max_examples=15)
@given(
    lens=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_graphed_step_logits_equal_a_plain_forward(lens, steps, seed):
    """After a padded prefill, each graphed step's logits equal a plain forward over
    each row's tokens so far: the masked whole-cache attention hides padding and
    unwritten slots, and the sync-free experts compute what the eager ones do."""
    model = MODELS["v3"]
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lens]
    longest, batch = max(lens), len(rows)
    decoder = GraphedDecoder(model, batch, longest + steps, capture=False)
    ids = torch.zeros(batch, longest, dtype=torch.long)
    mask = torch.zeros(batch, longest, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, longest - len(r) :] = torch.tensor(r)
        mask[b, longest - len(r) :] = True
    decoder.cache.length = 0
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=decoder.cache)
        decoder.start(mask)
        positions = torch.tensor(lens)[:, None]
        for _ in range(steps):
            token = torch.randint(0, 128, (batch,), generator=gen)
            logits = decoder.step(token, positions)
            positions += 1
            for b in range(batch):
                rows[b].append(int(token[b]))
                want = model(torch.tensor([rows[b]])).logits[0, -1]
                torch.testing.assert_close(logits[b], want, atol=1e-5, rtol=1e-5)


MODELS = {"v3": v3()}


@pytest.mark.parametrize("tokens", [1, 3, 4, 9])  # pairs below and above the 8 experts
@pytest.mark.parametrize("stacked", [False, True])
def test_grouped_experts_equal_the_loop(tokens, stacked):
    """The compiled / captured form of the routed sum, over copies of the weights or
    over the stacked views, computes what the eager loop does."""
    model = v3()
    experts = next(m for m in model.modules() if isinstance(m, RoutedExperts))
    if stacked:
        assert experts.stack_weights()
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, model.config.hidden_size, generator=gen)
    idx = torch.stack([torch.randperm(len(experts), generator=gen)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=gen)
    with torch.no_grad():
        want = experts._per_expert(x, weights, idx)
        got = experts._grouped(x, weights, idx, experts._plain_weights())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_stacking_keeps_values_names_and_checkpoints(tmp_path):
    model = v3()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    assert all(e.stack_weights() for e in experts)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert sum(p.numel() for p in model.parameters()) == params
    model.save_pretrained(tmp_path)  # views of one tensor must still save
    loaded = ds_model.from_pretrained(tmp_path)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    # A copied-in state dict keeps the views; a dtype move breaks (and forgets) them.
    model.load_state_dict(before)
    assert experts[0]._stacked(experts[0]._plain_weights()) is not None
    model.to(torch.float64)
    assert experts[0]._stacked(experts[0]._plain_weights()) is None
    assert experts[0].stack_weights()  # stacks again
    layer = experts[0][1].up_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())  # a replaced weight
    assert experts[0]._stacked(experts[0]._plain_weights()) is None


def test_wrapped_experts_are_not_stacked_and_not_graphable():
    from ds_lora import LoraConfig, get_peft_model

    model = get_peft_model(v3(), LoraConfig(r=2, target_modules=["gate_proj"]))
    experts = next(m for m in model.modules() if isinstance(m, RoutedExperts))
    assert not experts.stack_weights()
    base = model.base_model.model if hasattr(model, "base_model") else model
    assert not graphable(base)  # their loop reads the routing on the host


def test_decoder_is_reused_until_the_model_changes(graphable_everywhere):
    model = v3()
    model.generate([1, 2, 3], 4)
    first = generation._DECODERS[model]
    model.generate([4, 5], 6)
    assert generation._DECODERS[model] is first  # same batch size, fits the capacity
    model.generate([[4, 5], [6]], 6)
    second = generation._DECODERS[model]
    assert second is not first  # another batch size: a new capture
    handle = model.model.layers[0].register_forward_hook(lambda *a: None)
    model.generate([[4, 5], [6]], 6)
    assert generation._DECODERS[model] is not second  # a hook the graph lacks
    handle.remove()


@pytest.mark.parametrize("make", [v3, llama], ids=["v3", "llama"])
def test_a_batch_1_cpu_step_keeps_row_major_weights_where_fp32_gemv_is_built(make):
    """The fixed-shape CPU step re-lays float32 Linear weights input-major (MKL reads
    them faster at a few rows), except at batch 1 where ds-quant's ``fp32_gemv`` is
    built: its one-row products read row-major weights faster still (MatVecLinears)."""
    from ds_quant.kernels import cpu_gemv

    def row_major(model):
        layers = [m for m in model.modules() if type(m) is torch.nn.Linear]
        return all(m.weight.stride(-1) == 1 for m in layers)

    one, two = make(), make()
    GraphedDecoder(one, batch=1, capacity=64, capture=False, compile=True)
    GraphedDecoder(two, batch=2, capacity=64, capture=False, compile=True)
    assert row_major(one) == bool(cpu_gemv.fp32_rows())
    assert not row_major(two)


@settings(max_examples=200, deadline=None)
@given(needed=st.integers(1, 5000), limit=st.integers(1, 5000))
def test_decode_capacity_holds_the_generation_and_bounds_the_spare_slots(needed, limit):
    """The fixed-shape step reads every slot of its cache: enough for the generation
    (up to the model's limit), at most twice what a short one fills, one of few sizes
    (powers of two to CAPACITY_STEP, then its multiples) so nearby lengths share a step."""
    capacity = decode_capacity(needed, limit)
    assert capacity == min(limit, capacity) and capacity >= min(needed, limit)
    if capacity < limit:
        assert capacity <= max(2 * needed, MIN_CAPACITY, needed + CAPACITY_STEP - 1)
        small = capacity <= CAPACITY_STEP
        assert (small and capacity & (capacity - 1) == 0) or capacity % CAPACITY_STEP == 0
        assert capacity >= MIN_CAPACITY


@pytest.mark.parametrize("make", [v3, llama], ids=["v3", "llama"])
def test_a_longer_generation_reuses_a_short_ones_step_to_its_capacity(graphable_everywhere, make):
    """A short generation's step holds the smallest capacity; a later one needing more,
    but no more than that, reuses it and decodes what eager decoding does."""
    model = make()
    model.generate([1, 2, 3], 2)
    first = generation._DECODERS[model]
    expected = min(MIN_CAPACITY, model.config.max_position_embeddings)
    assert first.capacity == first.cache.max_len == expected
    prompt = list(range(5, 5 + expected // 2))
    longer = model.generate(prompt, expected - len(prompt))
    assert generation._DECODERS[model] is first
    assert longer == model.generate(prompt, expected - len(prompt), cuda_graph=False)


@pytest.mark.parametrize("graphed", [False, True])
def test_interleaved_streams_each_get_their_own_tokens(graphed, request):
    """Two streams of one model consumed in turns: each yields what it yields alone
    (neither shares the other's decode step, nor leaves inference mode under it)."""
    if graphed:
        request.getfixturevalue("graphable_everywhere")
    model = v3()
    want_a = model.generate([5, 6, 7, 8], 8, cuda_graph=False)
    want_b = model.generate([9, 10, 11, 12], 8, cuda_graph=False)
    a, b = model.stream([5, 6, 7, 8], 8), model.stream([9, 10, 11, 12], 8)
    got_a, got_b = [], []
    for x, y in zip(a, b):  # both mid-way at once, one batch size
        got_a.append(x)
        got_b.append(y)
    assert got_a + list(a) == want_a
    assert got_b + list(b) == want_b
    if graphed:
        assert not generation._DECODERS[model].in_use


def test_cuda_graph_and_compile_arguments_are_checked():
    model = v3()
    with pytest.raises(TypeError, match="cuda_graph"):
        model.generate([1, 2], 2, cuda_graph="yes")
    with pytest.raises(TypeError, match="compile"):
        model.generate([1, 2], 2, compile=1)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        model.generate([1, 2], 2, cuda_graph=True)
    windowed = v3(sliding_window=4)
    with pytest.raises(ValueError, match="compile=True needs a model without sliding_window"):
        windowed.generate([1, 2], 2, compile=True)


COMPILED_CHECK = """
import torch
import ds_model, ds_model.generation as generation
from ds_model import ModelConfig
skipped = []
set_stance = torch.compiler.set_stance
def counting_set_stance(*args, **kwargs):
    skipped.append(kwargs.get("skip_guard_eval_unsafe", False))
    return set_stance(*args, **kwargs)
torch.compiler.set_stance = counting_set_stance
model = ds_model.from_config(ModelConfig.from_preset("tiny"), seed=0)
prompts = [[5, 6, 7, 8], [9, 10]]
eager = model.generate(prompts, 8)
assert model.generate(prompts, 8, compile=True) == eager, "compiled != eager"
# 8 tokens: 7 compiled steps, the first with guards, the other 6 without.
assert skipped == [True] * 6, skipped
torch.compiler.set_stance = set_stance
decoder = generation._DECODERS[model]
assert model.generate(prompts, 6, compile=True) == [row[:6] for row in eager]
assert generation._DECODERS[model] is decoder, "the compiled step was rebuilt"
# Later steps of a generation skip torch.compile's guards; the first step of each
# generation still checks them, so a change between generations recompiles.
for layer in model.model.layers:
    layer.self_attn.softmax_scale *= 20
changed = model.generate(prompts, 8)
assert changed != eager, "the scale change should change the greedy tokens"
assert model.generate(prompts, 8, compile=True) == changed, "a stale compiled step ran"
# Skipping guards keeps the caller's stance: under force_eager nothing compiles.
import torch._dynamo.utils as dynamo_utils
graphs = dynamo_utils.counters["stats"]["unique_graphs"]
with torch.compiler.set_stance("force_eager"):
    assert model.generate([[5, 6, 7]], 8, compile=True) == model.generate([[5, 6, 7]], 8)
assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs, "force_eager compiled"
"""


@pytest.mark.slow
def test_compiled_step_equals_eager():
    """compile=True on CPU: the fixed-shape step through torch.compile, compiled once
    for the batch size and reused by the next call. In a child process: compiling
    starts threads and worker processes, after which this process's fork-based tests
    (SIGKILL resume, distributed) cannot fork safely."""
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_CHECK], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("make", [v3, llama], ids=["v3", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_replay_equals_eager(make, dtype):
    model = make().to("cuda", dtype)
    for prompts in ([[5, 6, 7, 8]], [[5, 6, 7, 8], [9, 10], [11, 12, 13]]):
        eager = model.generate(prompts, 12, cuda_graph=False)
        assert model.generate(prompts, 12, cuda_graph=True) == eager
        assert model.generate(prompts, 12) == eager  # the default on CUDA, replayed again
    # Weights copied in place are what the next replay reads.
    other = make().to("cuda", dtype)
    other.init_weights(seed=5)
    model.load_state_dict(other.state_dict())
    assert model.generate([[5, 6, 7, 8]], 12) == other.generate(
        [[5, 6, 7, 8]], 12, cuda_graph=False
    )
