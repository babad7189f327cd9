"""``generate(compile=True)`` with bf16, INT8 and INT4 weights on CPU: the compiled step
is one graph and decodes what the eager step decodes, and the routed-experts custom op it
runs for quantized experts is checked with ``torch.library.opcheck``."""

from __future__ import annotations

import subprocess
import sys

import ds_model
import pytest
import torch
from ds_model import ModelConfig

quant = pytest.importorskip("ds_quant")

COMPILED_CHECK = """
import sys, tempfile, dataclasses
import torch, ds_model
import torch._dynamo.utils as dynamo_utils
from ds_model import ModelConfig
shape, dtype, quantization = sys.argv[1], sys.argv[2], sys.argv[3] or None
torch.set_num_threads(1)
if shape == "v3":
    config = ModelConfig.from_preset("tiny")
else:
    config = ModelConfig.from_dict({
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    })
with tempfile.TemporaryDirectory() as path:
    ds_model.from_config(config, seed=0).save_pretrained(path)
    eager_model = ds_model.from_pretrained(path, dtype=dtype, quantization=quantization)
    compiled_model = ds_model.from_pretrained(path, dtype=dtype, quantization=quantization)
for model in (eager_model, compiled_model):
    model.config = dataclasses.replace(model.config, eos_token_id=None)
for prompts in ([[5, 6, 7, 8]], [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]):
    eager = eager_model.generate(prompts, 6)
    compiled = compiled_model.generate(prompts, 6, compile=True)
    assert compiled == eager, (prompts, compiled, eager)
assert not dynamo_utils.counters["graph_break"], dict(dynamo_utils.counters["graph_break"])
# One graph per batch size: the whole step, routed experts included.
assert dynamo_utils.counters["stats"]["unique_graphs"] == 2, dict(dynamo_utils.counters["stats"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["v3", "llama"])
@pytest.mark.parametrize(
    ("dtype", "quantization"),
    [("bfloat16", ""), ("float32", "int8"), ("float32", "int4")],
    ids=["bf16", "int8", "int4"],
)
def test_compiled_decode_equals_eager(shape, dtype, quantization):
    """Greedy tokens at batch 1 and 4 (ragged prompts). In a child process: compiling
    starts threads and worker processes, after which fork-based tests cannot fork
    safely."""
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_CHECK, shape, dtype, quantization],
        capture_output=True,
        text=True,
        timeout=900,
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
