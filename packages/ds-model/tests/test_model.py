"""Model behaviour: MLA's cache and absorbed decode, the paged runner, and invariants
(padding, prompt-at-once vs token-by-token) over generated small configs."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import ds_model
import pytest
import torch
from ds_model import ModelConfig, ModelRunner, StaticKVCache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()
tiny = S.tiny_v3
LLAMA = S.LLAMA_GQA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_cache_holds_only_latent_and_rope_key(dtype):
    config = ModelConfig.from_preset("tiny")
    cache = StaticKVCache(config, batch_size=3, max_len=10, dtype=dtype, device="cpu")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers
    assert cache.bytes_per_token() == expected * itemsize
    assert config.kv_cache_bytes_per_token(itemsize) == expected * itemsize
    bytes_per_block = ds_model.PagedKVCache.bytes_per_block(config, 16, dtype)
    assert bytes_per_block == expected * itemsize * 16


def test_mha_cache_holds_keys_and_values():
    config = ModelConfig.from_dict(LLAMA)
    cache = StaticKVCache(config, 1, 4, torch.float32, "cpu")
    assert cache.bytes_per_token() == 2 * 2 * 8 * 2 * 4  # k+v, kv heads, head dim, layers, fp32


@pytest.mark.parametrize("q_lora_rank", [None, 32])
def test_absorbed_decode_equals_naive(q_lora_rank):
    model = tiny(q_lora_rank=q_lora_rank)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 512, (2, 9), generator=gen)
    steps = torch.randint(0, 512, (2, 4), generator=gen)
    results = {}
    for impl in ("naive", "absorb"):
        for layer in model.model.layers:
            layer.self_attn.impl = impl
        cache = StaticKVCache(model.config, 2, 16, torch.float32, "cpu")
        with torch.no_grad():
            logits = [model(prompt, cache=cache).logits[:, -1]]
            for t in range(steps.shape[1]):
                logits.append(model(steps[:, t : t + 1], cache=cache).logits[:, -1])
        results[impl] = torch.stack(logits)
    torch.testing.assert_close(results["absorb"], results["naive"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", ["tiny", "llama"])
def test_runner_step_matches_plain_forward(config):
    model = tiny() if config == "tiny" else ds_model.from_config(LLAMA, seed=0)
    vocab = model.config.vocab_size
    runner = ModelRunner(model, num_blocks=24, block_size=4)
    rng = random.Random(0)
    seqs = [[rng.randrange(vocab) for _ in range(n)] for n in (9, 5, 13)]
    free = list(range(24))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(5)] for _ in seqs]
    # Step 1: prefill seq 0 whole and the first chunk of seq 2.
    first = runner.step([seqs[0], seqs[2][:6]], [0, 0], [tables[0], tables[2]])
    # Step 2: mixed: decode seq 0, prefill seq 1, the rest of seq 2.
    seqs[0].append(3)
    second = runner.step([[3], seqs[1], seqs[2][6:]], [9, 0, 6], [tables[0], tables[1], tables[2]])
    with torch.no_grad():

        def last(tokens):
            return model(torch.tensor([tokens])).logits[0, -1]

        expected = [
            last(seqs[0][:9]),
            last(seqs[2][:6]),
            last(seqs[0]),
            last(seqs[1]),
            last(seqs[2]),
        ]
    got = [first[0], first[1], second[0], second[1], second[2]]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_runner_returns_every_position_of_flagged_sequences():
    model = tiny()
    runner = ModelRunner(model, num_blocks=12, block_size=4)
    rng = random.Random(1)
    seqs = [[rng.randrange(model.config.vocab_size) for _ in range(n)] for n in (10, 3)]
    tables = [[0, 1, 2], [3]]
    # Sequence 0 in two chunks (flagged both times), sequence 1 whole and not flagged.
    last, per = runner.step([seqs[0][:6], seqs[1]], [0, 0], tables, all_positions=[True, False])
    assert per[1] is None and per[0].shape == (6, model.config.vocab_size)
    torch.testing.assert_close(per[0][-1], last[0])
    _, rest = runner.step([seqs[0][6:]], [6], tables[:1], all_positions=[True])
    with torch.no_grad():
        expected = model(torch.tensor([seqs[0]])).logits[0]
    torch.testing.assert_close(torch.cat([per[0], rest[0]]), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="all_positions"):
        runner.step([seqs[1]], [0], tables[1:], all_positions=[True, True])


def test_runner_is_a_model_runner_protocol_and_sizes_its_pool():
    model = tiny()
    per_block = ds_model.PagedKVCache.bytes_per_block(model.config, 16, torch.float32)
    runner = ModelRunner(model, memory_bytes=per_block * 7 + 5, block_size=16)
    assert isinstance(runner, ds_model.ModelRunnerProtocol)
    assert runner.num_blocks == 7
    assert ds_model.num_blocks_for_memory(model.config, per_block * 7, 16, torch.float32) == 7


def test_runner_rejects_bad_input():
    runner = ModelRunner(tiny(), num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="block table has 1 blocks"):
        runner.step([[1] * 5], [0], [[0]])
    with pytest.raises(ValueError, match="outside the pool"):
        runner.step([[1]], [0], [[9]])
    with pytest.raises(ValueError, match="one entry per sequence"):
        runner.step([[1]], [0, 1], [[0]])
    with pytest.raises(ValueError, match="context"):
        runner.step([[1]], [600], [[0] * 200])


def test_labels_give_shifted_cross_entropy_ignoring_minus_100():
    model = tiny()
    ids = torch.randint(0, 512, (2, 6))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 512)
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


small_configs = st.fixed_dictionaries(
    {
        "q_lora_rank": st.sampled_from([None, 16]),
        "kv_lora_rank": st.sampled_from([8, 16]),
        "qk_rope_head_dim": st.sampled_from([4, 8]),
        "n_routed_experts": st.sampled_from([4, 8]),
        "num_experts_per_tok": st.integers(1, 3),
        "first_k_dense_replace": st.integers(0, 2),
        "tie_word_embeddings": st.booleans(),
        "rope_interleave": st.booleans(),
    }
)


def _config(params) -> ModelConfig:
    return ModelConfig.from_preset(
        "tiny", n_group=2, topk_group=2, num_hidden_layers=2, vocab_size=64, **params
    )


@settings(max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=small_configs,
    prompt_len=st.integers(1, 7),
    pad=st.integers(1, 5),
    seed=st.integers(0, 99),
)
def test_output_does_not_depend_on_padding(params, prompt_len, pad, seed):
    model = ds_model.from_config(_config(params), seed=seed)
    rng = random.Random(seed)
    prompt = [rng.randrange(64) for _ in range(prompt_len)]
    longer = [rng.randrange(64) for _ in range(prompt_len + pad)]
    alone = model.generate(prompt, 5)
    batched = model.generate([longer, prompt], 5)
    assert batched[1] == alone
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0]
        ids = torch.tensor([[0] * pad + prompt])
        mask = torch.tensor([[0] * pad + [1] * prompt_len])
        padded = model(ids, attention_mask=mask).logits[0, pad:]
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(params=small_configs, prompt_len=st.integers(2, 10), seed=st.integers(0, 99))
def test_prompt_at_once_equals_token_by_token(params, prompt_len, seed):
    model = ds_model.from_config(_config(params), seed=seed)
    ids = torch.randint(0, 64, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        at_once = model(ids).logits[0]
        cache = StaticKVCache(model.config, 1, prompt_len, torch.float32, "cpu")
        stepwise = torch.cat(
            [model(ids[:, i : i + 1], cache=cache).logits[0] for i in range(prompt_len)]
        )
    torch.testing.assert_close(stepwise, at_once, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.sampled_from([-1.0, 0.0, 2.0, float("-inf"), float("nan")]), min_size=2),
    rows=st.integers(1, 3),
)
def test_greedy_picks_argmax_with_ties_and_nan(values, rows):
    from ds_model.sampling import SamplingParams, sample

    logits = torch.tensor(values * rows).view(rows, -1)
    logits[-1] = logits[-1].flip(0)
    got = sample(logits, [SamplingParams(temperature=0.0)] * rows).token_ids
    assert torch.equal(got, logits.argmax(-1))


def test_sliding_window_limits_what_a_token_sees():
    config = ModelConfig.from_dict({**LLAMA, "sliding_window": 3})
    model = ds_model.from_config(config, seed=0)
    ids = torch.randint(0, 128, (1, 8))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 128
    with torch.no_grad():
        a, b = model(ids).logits[0], model(changed).logits[0]
    # Token 0 is outside the 3-token window of positions >= 3, in every layer up to
    # 2 layers of receptive field: positions >= 5 cannot be affected at all.
    torch.testing.assert_close(a[5:], b[5:])
    assert not torch.allclose(a[1], b[1])


def test_model_satisfies_the_causal_lm_protocol():
    model = tiny()
    assert isinstance(model, ds_model.CausalLM)
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, 512) and out.loss is None
    with pytest.raises(TypeError, match="unexpected arguments: use_cache"):
        model(torch.tensor([[1, 2, 3]]), use_cache=True)


@settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), arch=st.sampled_from(["tiny", "llama"]))
def test_runner_stream_of_mixed_steps_matches_plain_forward(data, arch):
    """Random sequences fed in random chunks, interleaved across steps, over shuffled
    blocks: every step's logits equal a plain forward over the sequence so far."""
    model = tiny() if arch == "tiny" else ds_model.from_config(LLAMA, seed=0)
    block_size = data.draw(st.sampled_from([1, 2, 4]), label="block_size")
    lengths = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=4), label="lengths")
    blocks_needed = [-(-n // block_size) for n in lengths]
    pool = list(range(sum(blocks_needed) + 2))
    order = data.draw(st.permutations(pool), label="pool order")
    runner = ModelRunner(model, num_blocks=len(pool), block_size=block_size)
    seqs, tables, start = [], [], 0
    for n, nb in zip(lengths, blocks_needed):
        seqs.append(
            data.draw(st.lists(st.integers(0, model.config.vocab_size - 1), min_size=n, max_size=n))
        )
        tables.append(list(order[start : start + nb]))
        start += nb
    done = [0] * len(seqs)
    while any(d < len(s) for d, s in zip(done, seqs)):
        live = [i for i, s in enumerate(seqs) if done[i] < len(s)]
        chosen = data.draw(st.lists(st.sampled_from(live), min_size=1, unique=True), label="step")
        chunks = {i: data.draw(st.integers(1, len(seqs[i]) - done[i])) for i in chosen}
        logits = runner.step(
            [seqs[i][done[i] : done[i] + chunks[i]] for i in chosen],
            [done[i] for i in chosen],
            [tables[i] for i in chosen],
        )
        for row, i in enumerate(chosen):
            done[i] += chunks[i]
            with torch.no_grad():
                expected = model(torch.tensor([seqs[i][: done[i]]])).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_generation_and_runner_match_cpu():
    cpu = tiny()
    gpu = tiny().to("cuda")
    prompt = [5, 6, 7, 8]
    assert gpu.generate(prompt, 16) == cpu.generate(prompt, 16)
    runner = ModelRunner(gpu, num_blocks=4, block_size=4)
    logits = runner.step([prompt], [0], [[2]])
    with torch.no_grad():
        expected = cpu(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(logits[0].cpu(), expected, atol=1e-4, rtol=1e-4)


class PagedRunnerMachine(RuleBasedStateMachine):
    """Sequences arrive, prefill in chunks, decode, finish and give their blocks back;
    reused blocks still hold a finished sequence's keys. Every step's logits must equal
    a plain forward over each sequence so far."""

    model = None

    def __init__(self):
        super().__init__()
        if PagedRunnerMachine.model is None:
            PagedRunnerMachine.model = tiny()
        self.block_size = 2
        self.runner = ModelRunner(self.model, num_blocks=12, block_size=self.block_size)
        self.free = list(range(12))
        self.seqs: dict[int, dict] = {}
        self.next_id = 0

    @precondition(lambda self: len(self.seqs) < 3)
    @rule(data=st.data(), n=st.integers(1, 6))
    def arrive(self, data, n):
        need = -(-(n + 3) // self.block_size)  # the prompt plus up to 3 decoded tokens
        if need > len(self.free):
            return
        picks = data.draw(st.permutations(self.free))[:need]
        self.free = [b for b in self.free if b not in picks]
        tokens = data.draw(st.lists(st.integers(0, 511), min_size=n, max_size=n))
        self.seqs[self.next_id] = {"tokens": tokens, "done": 0, "blocks": picks, "decodes": 0}
        self.next_id += 1

    @precondition(lambda self: bool(self.seqs))
    @rule(data=st.data())
    def step(self, data):
        ids = sorted(self.seqs)
        chosen = data.draw(st.lists(st.sampled_from(ids), min_size=1, unique=True))
        feed, starts, tables, fed = [], [], [], []
        for i in chosen:
            s = self.seqs[i]
            if s["done"] == len(s["tokens"]):  # decode: append a token, at most 3 times
                if s["decodes"] == 3:
                    continue
                s["tokens"].append(data.draw(st.integers(0, 511)))
                s["decodes"] += 1
            chunk = data.draw(st.integers(1, len(s["tokens"]) - s["done"]))
            feed.append(s["tokens"][s["done"] : s["done"] + chunk])
            starts.append(s["done"])
            tables.append(s["blocks"])
            fed.append(i)
            s["done"] += chunk
        if not feed:
            return
        logits = self.runner.step(feed, starts, tables)
        for row, i in enumerate(fed):
            s = self.seqs[i]
            with torch.no_grad():
                expected = self.model(torch.tensor([s["tokens"][: s["done"]]])).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=1e-5)

    @precondition(lambda self: bool(self.seqs))
    @rule(data=st.data())
    def finish(self, data):
        i = data.draw(st.sampled_from(sorted(self.seqs)))
        self.free += self.seqs.pop(i)["blocks"]

    @invariant()
    def blocks_are_conserved(self):
        used = [b for s in self.seqs.values() for b in s["blocks"]]
        assert sorted(used + self.free) == list(range(12))


PagedRunnerMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=12, suppress_health_check=[HealthCheck.too_slow]
)
test_paged_runner_state_machine = PagedRunnerMachine.TestCase


def test_attention_backend_is_chosen_by_config():
    ids = torch.randint(0, 512, (1, 9))
    default = tiny()
    reference = tiny(attention_backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, default(ids).logits, atol=1e-5, rtol=1e-5)
    assert reference.generate([1, 2, 3], 6) == default.generate([1, 2, 3], 6)
    runner = ModelRunner(reference, num_blocks=4, block_size=4)
    with torch.no_grad():
        expected = default(torch.tensor([[4, 5, 6]])).logits[0, -1]
    torch.testing.assert_close(
        runner.step([[4, 5, 6]], [0], [[1]])[0], expected, atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ds_model.ConfigError, match="attention_backend='flash'"):
        ModelConfig.from_preset("tiny", attention_backend="flash")


def _deepseek_gate(router, x: torch.Tensor):
    """DeepSeek's gate as its reference inference code writes it: every group scored and
    masked, whether or not the top groups are all of them."""
    scores = torch.nn.functional.linear(x.float(), router.weight.float())
    scores = scores.softmax(-1) if router.scoring == "softmax" else scores.sigmoid()
    original = scores
    if router.method == "noaux_tc":
        scores = scores + router.e_score_correction_bias
    if router.method != "greedy":
        grouped = scores.view(x.shape[0], router.n_group, -1)
        if router.method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        top = group_scores.topk(router.topk_group, dim=-1)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)
        fill = float("-inf") if router.method == "noaux_tc" else 0.0
        scores = grouped.masked_fill(~keep.unsqueeze(-1), fill).flatten(1)
    idx = scores.topk(router.top_k, dim=-1)[1]
    weights = original.gather(1, idx)
    if router.norm_topk_prob and router.top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.scaling, idx


@settings(max_examples=30, deadline=None)
@given(
    method=st.sampled_from(["greedy", "group_limited_greedy", "noaux_tc"]),
    groups=st.sampled_from([(1, 1), (4, 4), (4, 2), (8, 3)]),
    top_k=st.integers(1, 4),
    norm=st.booleans(),
    scaling=st.sampled_from([1.0, 2.5]),
    tokens=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_router_picks_deepseeks_experts_and_weights(
    method, groups, top_k, norm, scaling, tokens, seed
):
    """Greedy, group-limited and bias-corrected (noaux_tc) routing against DeepSeek's gate,
    with some or all groups kept: the same experts and weights per token."""
    n_group, topk_group = groups
    config = ModelConfig.from_preset(
        "tiny",
        n_routed_experts=16,
        num_experts_per_tok=top_k,
        topk_method=method,
        scoring_func="sigmoid" if method == "noaux_tc" else "softmax",
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scaling,
    )
    router = ds_model.moe.Router(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.normal_(generator=g)
        if method == "noaux_tc":
            router.e_score_correction_bias.normal_(generator=g)
    x = torch.randn(tokens, config.hidden_size, generator=g)
    weights, idx = router(x)
    want_weights, want_idx = _deepseek_gate(router, x)
    got_order, want_order = idx.sort(dim=-1), want_idx.sort(dim=-1)
    assert torch.equal(got_order.values, want_order.values)
    torch.testing.assert_close(
        weights.gather(1, got_order.indices), want_weights.gather(1, want_order.indices)
    )
