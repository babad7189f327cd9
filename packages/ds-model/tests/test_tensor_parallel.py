"""Tensor-parallel inference (``shard_model``): each rank's share of every layer sums
to the whole layer, and a paged serving step on two gloo ranks gives the whole model's
logits, for llama (GQA) and DeepSeek-V3 (MLA + MoE) models."""

from __future__ import annotations

import json
import multiprocessing
import os
from unittest import mock

import ds_model
import pytest
import torch
from ds_model import allowed_tensor_parallel_sizes, check_tensor_parallel_size, shard_model
from hypothesis import assume, given, settings
from hypothesis import strategies as st


def llama_config(**overrides) -> ds_model.ModelConfig:
    fields = {
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
    }
    return ds_model.ModelConfig(**{**fields, **overrides})


def v3_config(**overrides) -> ds_model.ModelConfig:
    return ds_model.ModelConfig.from_preset("tiny", vocab_size=256, **overrides)


@settings(max_examples=12, deadline=None)
@given(
    mla=st.booleans(),
    heads=st.sampled_from([2, 4, 8]),
    kv_divisor=st.sampled_from([1, 2]),
    experts=st.sampled_from([3, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_the_ranks_partial_outputs_sum_to_the_whole_layer(mla, heads, kv_divisor, experts, seed):
    if mla:
        config = v3_config(
            num_attention_heads=heads,
            n_routed_experts=experts,
            n_group=1,
            topk_group=1,
            q_lora_rank=None if seed % 2 else 32,
        )
    else:
        config = llama_config(num_attention_heads=heads, num_key_value_heads=heads // kv_divisor)
    allowed = allowed_tensor_parallel_sizes(config)
    assume(len(allowed) > 1)  # one key/value head: nothing to split
    world = allowed[1]
    whole = ds_model.from_config(config, dtype=torch.float32, seed=seed)
    # The all-reduce hook is the identity here, so each shard returns its partial sum.
    with mock.patch("ds_model.tensor_parallel.dist.all_reduce"):
        shards = [
            shard_model(ds_model.from_config(config, dtype=torch.float32, seed=seed), r, world)
            for r in range(world)
        ]
        x = torch.randn(2, 5, config.hidden_size, generator=torch.Generator().manual_seed(seed))
        positions = torch.arange(5).expand(2, 5)
        with torch.inference_mode():
            for i, layer in enumerate(whole.model.layers):
                ctx = whole.model.forward_context(positions)
                attn = sum(
                    s.model.layers[i].self_attn(x, s.model.forward_context(positions))
                    for s in shards
                )
                torch.testing.assert_close(attn, layer.self_attn(x, ctx), atol=2e-6, rtol=1e-5)
                mlp = sum(s.model.layers[i].mlp(x) for s in shards)
                torch.testing.assert_close(mlp, layer.mlp(x), atol=2e-6, rtol=1e-5)
    # Each rank keeps its share of the heads, so a runner over it caches only those.
    assert shards[0].config.num_attention_heads == heads // world


def test_sizes_that_do_not_divide_the_model_are_refused_with_the_allowed_ones():
    assert allowed_tensor_parallel_sizes(v3_config()) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .*allowed sizes.*1, 2, 4"):
        check_tensor_parallel_size(v3_config(), 3)
    with pytest.raises(ValueError, match=r"num_key_value_heads=2"):
        check_tensor_parallel_size(llama_config(), 4)
    with pytest.raises(ValueError, match=r"tensor_parallel_size must be an int >= 1, got 0"):
        check_tensor_parallel_size(llama_config(), 0)


def _rank(rank: int, store: str, out: str, kind: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    config = v3_config() if kind == "v3" else llama_config()
    whole = ds_model.from_config(config, dtype=torch.float32, seed=0)
    shard = shard_model(ds_model.from_config(config, dtype=torch.float32, seed=0), rank, 2)
    # One mixed step (a prefill and a chunk), then a decode step over the paged pool.
    steps = [
        ([list(range(5, 19)), [7, 8, 9]], [0, 0], [[0, 1], [2]]),
        ([[3], [4], [11, 12]], [14, 3, 0], [[0, 1], [2], [3]]),
    ]
    diffs = []
    runners = [ds_model.ModelRunner(m, num_blocks=8, block_size=8) for m in (whole, shard)]
    for step in steps:
        want, got = (r.step(*step) for r in runners)
        diffs.append((want - got).abs().max().item())
    with open(out, "w") as f:
        json.dump(diffs, f)
    dist.destroy_process_group()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("kind", ["llama", "v3"])
def test_a_serving_step_on_two_gloo_ranks_gives_the_whole_models_logits(tmp_path, kind):
    context = multiprocessing.get_context("fork")
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    store = str(tmp_path / "store")
    procs = [context.Process(target=_rank, args=(r, store, str(outs[r]), kind)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    for out in outs:
        assert max(json.loads(out.read_text())) < 1e-5
