"""``generate(compile=True)`` with bf16, INT8 and INT4 weights on CPU: the compiled step
is one graph and decodes what the eager step decodes, the routed-experts custom op it
runs is checked with ``torch.library.opcheck``, and its bf16 attention over the masked
cache equals SDPA's."""

from __future__ import annotations

import copy
import subprocess
import sys

import ds_model
import pytest
import torch
import torch.nn.functional as F
from ds_model import ModelConfig
from ds_model.attend import attend
from hypothesis import given, settings
from hypothesis import strategies as st

quant = pytest.importorskip("ds_quant")

COMPILED_CHECK = """
import sys, tempfile, dataclasses
import torch, ds_model
import torch._dynamo.utils as dynamo_utils
from ds_model import ModelConfig
shape, cases = sys.argv[1], sys.argv[2:]
torch.set_num_threads(1)
if shape == "v3":
    config = ModelConfig.from_preset("tiny")
else:
    config = ModelConfig.from_dict({
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    })
checkpoint = tempfile.TemporaryDirectory()
ds_model.from_config(config, seed=0).save_pretrained(checkpoint.name)

# bf16: the compiled step's fused kernels round differently from eager bf16 ops (float32
# inside a fused kernel), so a near-tie may break the other way; each token must still be
# the eager model's greedy choice up to bf16 rounding of the logits.
def check_greedy_choices(prompt, tokens):
    ids = list(prompt)
    with torch.inference_mode():
        for token in tokens:
            logits = eager_model(torch.tensor([ids])).logits[0, -1].float()
            margin = 2**-6 * logits.abs().max()
            assert logits[token] >= logits.max() - margin, (ids, token, logits.argmax())
            ids.append(token)


# Every case in this one process: a child spends ~15 s importing and warming up inductor.
for case in cases:
    dtype, quantization = case.split(":")
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    eager_model, compiled_model = (
        ds_model.from_pretrained(checkpoint.name, dtype=dtype, quantization=quantization or None)
        for _ in range(2)
    )
    for model in (eager_model, compiled_model):
        model.config = dataclasses.replace(model.config, eos_token_id=None)
    for prompts in ([[5, 6, 7, 8]], [[5, 6, 7, 8], [9, 10]]):
        eager = eager_model.generate(prompts, 6)
        compiled = compiled_model.generate(prompts, 6, compile=True)
        if dtype == "bfloat16":
            assert [row[0] for row in compiled] == [row[0] for row in eager], case
            for prompt, row in zip(prompts, compiled):
                check_greedy_choices(prompt, row)
        else:
            assert compiled == eager, (case, prompts, compiled, eager)
    breaks, stats = dynamo_utils.counters["graph_break"], dynamo_utils.counters["stats"]
    assert not breaks, (case, dict(breaks))
    # One graph per batch size: the whole step, routed experts included.
    assert stats["unique_graphs"] == 2, (case, dict(stats))
"""


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["v3", "llama"])
def test_compiled_decode_equals_eager(shape):
    """Greedy tokens at batch 1 and 2 (ragged prompts) with bf16, INT8 and INT4 weights:
    equal for INT8 / INT4 (the same kernels run), greedy choices of the eager model up to
    rounding for bf16. In a child process: compiling starts threads and worker
    processes, after which fork-based tests cannot fork safely."""
    cases = ["bfloat16:", "float32:int8", "float32:int4"]
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_CHECK, shape, *cases],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_routed_experts_op_equals_the_loop_and_passes_opcheck(name, tokens):
    model = ds_model.from_config(ModelConfig.from_preset("tiny"), seed=0)
    quant.quantize_(model, quant.config_from_dict({"name": f"{name}_weight_only"}))
    moe = next(m for m in model.modules() if isinstance(m, ds_model.moe.MoE))
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weights, idx = moe.gate(x)
        want = moe.experts._per_expert(x, weights, idx)
        got = torch.ops.ds_model.routed_experts(x, weights, idx, moe.experts._op_key)
    assert torch.equal(got, want)
    torch.library.opcheck(
        torch.ops.ds_model.routed_experts.default, (x, weights, idx, moe.experts._op_key)
    )


def test_a_deep_copy_runs_its_own_experts_through_the_op():
    model = ds_model.from_config(ModelConfig.from_preset("tiny"), seed=0)
    twin = copy.deepcopy(model)
    moe, twin_moe = (
        next(m for m in net.modules() if isinstance(m, ds_model.moe.MoE)) for net in (model, twin)
    )
    with torch.no_grad():
        for p in twin_moe.experts.parameters():
            p.mul_(2)
    x = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weights, idx = moe.gate(x)
        got = torch.ops.ds_model.routed_experts(x, weights, idx, twin_moe.experts._op_key)
        assert torch.equal(got, twin_moe.experts._per_expert(x, weights, idx))
        assert not torch.equal(got, moe.experts._per_expert(x, weights, idx))


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 3]),
    keys=st.integers(1, 40),
    dim=st.sampled_from([8, 16]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_one_query_masked_attention_in_half_precision_equals_sdpa(
    batch, kv_heads, group, keys, dim, dtype, seed
):
    """The fixed-shape step's attention (one query over the masked cache) in bf16/fp16
    on CPU, computed in float32, against float32 SDPA on the same rounded inputs."""
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    q = torch.randn(batch, 1, heads, dim, generator=g).to(dtype)
    k = torch.randn(batch, keys, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(batch, keys, kv_heads, dim, generator=g).to(dtype)
    visible = torch.rand(batch, keys, generator=g) < 0.7
    visible[:, -1] = True  # the new token always sees itself
    mask = visible[:, None, None, :]
    got = attend(q, k, v, softmax_scale=dim**-0.5, mask=mask)
    want = F.scaled_dot_product_attention(
        q.float().transpose(1, 2),
        k.float().transpose(1, 2),
        v.float().transpose(1, 2),
        attn_mask=mask,
        scale=dim**-0.5,
        enable_gqa=group > 1,
    ).transpose(1, 2)
    assert got.dtype == dtype and got.shape == want.shape
    rounding = 2**-8 if dtype == torch.bfloat16 else 2**-11
    assert ((got.float() - want).abs() <= rounding * want.abs() + 1e-5).all()
