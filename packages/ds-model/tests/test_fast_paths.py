"""The fast paths give what the general paths give: MLA's direct single-token absorbed
attention against the ds-attention call, and the zero-padded-v prefill against the
reference backend."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import ds_model
import pytest
import torch
from ds_model import ModelConfig, StaticKVCache
from hypothesis import given, settings
from hypothesis import strategies as st


def _ds_attention_twin(model):
    """The same weights with ``attention_backend="sdpa"``: a chosen backend sends every
    attention call through ds-attention, single-token decode included."""
    config = dataclasses.replace(model.config, attention_backend="sdpa")
    twin = ds_model.from_config(config, seed=0)
    twin.load_state_dict(model.state_dict())
    return twin


def _decode_logits(
    model, prompt, steps, *, fast: bool, impl: str = "auto", dtype=torch.float32
) -> torch.Tensor:
    if not fast:
        model = _ds_attention_twin(model)
    for layer in model.model.layers:
        layer.self_attn.impl = impl
    cache = StaticKVCache(model.config, prompt.shape[0], 24, dtype, "cpu")
    with torch.inference_mode():
        logits = [model(prompt, cache=cache).logits[:, -1]]
        for t in range(steps.shape[1]):
            logits.append(model(steps[:, t : t + 1], cache=cache).logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("q_lora_rank", [None, 32])
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_mla_decode_equals_ds_attention_path_and_naive(q_lora_rank, batch):
    config = ModelConfig.from_preset("tiny", q_lora_rank=q_lora_rank)
    model = ds_model.from_config(config, seed=1)
    gen = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, config.vocab_size, (batch, 7), generator=gen)
    steps = torch.randint(0, config.vocab_size, (batch, 6), generator=gen)
    fast = _decode_logits(model, prompt, steps, fast=True)
    general = _decode_logits(model, prompt, steps, fast=False)
    naive = _decode_logits(model, prompt, steps, fast=False, impl="naive")
    assert not torch.equal(fast[1:], fast[:-1])  # the steps really differ
    torch.testing.assert_close(fast, general, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fast_first", [True, False])
def test_fast_mla_decode_with_padding_equals_ds_attention_path(fast_first):
    """Left-padded rows, and one decode step whose new token is padding in one row."""
    config = ModelConfig.from_preset("tiny")
    model = ds_model.from_config(config, seed=2)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (3, 7), generator=gen)
    steps = torch.randint(0, config.vocab_size, (3, 5), generator=gen)
    prompt_mask = torch.ones(3, 7, dtype=torch.long)
    prompt_mask[1, :3] = 0
    prompt_mask[2, :5] = 0
    step_mask = torch.ones(3, 5, dtype=torch.long)
    step_mask[2, 2] = 0  # a padding query: zero attention output, finite logits

    def run(fast: bool) -> torch.Tensor:
        runner = model if fast else _ds_attention_twin(model)
        cache = StaticKVCache(config, 3, 24, torch.float32, "cpu")
        mask = prompt_mask
        with torch.inference_mode():
            out = [runner(prompt, attention_mask=mask, cache=cache).logits[:, -1]]
            for t in range(steps.shape[1]):
                mask = torch.cat((mask, step_mask[:, t : t + 1]), dim=1)
                out.append(
                    runner(steps[:, t : t + 1], attention_mask=mask, cache=cache).logits[:, -1]
                )
        return torch.stack(out)

    first, second = run(fast_first), run(not fast_first)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)


def test_mla_decode_skips_ds_attention_unless_a_backend_is_chosen(monkeypatch):
    model = ds_model.from_config(ModelConfig.from_preset("tiny"), seed=0)
    calls = []
    import ds_model.mla as mla

    real = mla.attend
    monkeypatch.setattr(mla, "attend", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.generate([1, 2, 3], 4)
    prefill_calls = model.config.num_hidden_layers
    assert len(calls) == prefill_calls  # decode steps took the direct path
    calls.clear()
    _ds_attention_twin(model).generate([1, 2, 3], 4)  # a chosen backend: every step
    assert len(calls) == prefill_calls * 4


def test_prefill_with_zero_padded_values_equals_reference_backend():
    # The default (SDPA) prefill pads v to d_qk so torch's fused CPU kernel runs; the
    # reference backend gets the unpadded tensors.
    config = ModelConfig.from_preset("tiny")
    assert config.v_head_dim < config.qk_nope_head_dim + config.qk_rope_head_dim
    model = ds_model.from_config(config, seed=2)
    reference = ds_model.from_config(
        ModelConfig.from_preset("tiny", attention_backend="reference"), seed=2
    )
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fast, slow = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 6])
def test_expert_fast_path_never_skips_hooks(tokens):
    # Plain experts run as bare products; a hook (AWQ calibration, a user's probe) must
    # still see every call, and the output must not change beyond float32 rounding (the
    # bare products of a few rows run ds-quant's fp32 kernel, the hooked module torch's
    # matmul: the same sums, added in another order).
    model = ds_model.from_config(ModelConfig.from_preset("tiny"), seed=0)
    ids = torch.arange(1, tokens + 1)[None]
    with torch.no_grad():
        plain = model(ids).logits
    seen = []
    experts = model.model.layers[1].mlp.experts
    handles = [e.up_proj.register_forward_hook(lambda m, i, o: seen.append(1)) for e in experts]
    with torch.no_grad():
        hooked = model(ids).logits
    for h in handles:
        h.remove()
    pairs = tokens * model.config.num_experts_per_tok
    assert 1 <= len(seen) <= min(pairs, len(experts))  # one call per expert hit
    torch.testing.assert_close(hooked, plain, atol=1e-6 * plain.abs().max().item(), rtol=0)


def test_importing_ds_model_leaves_dynamo_and_triton_unloaded():
    # torch._dynamo pulls in triton: a second of start-up for every CLI call, and a
    # Triton imported before TRITON_INTERPRET is set cannot interpret kernels later.
    import subprocess
    import sys

    code = "import sys, ds_model; print(sorted({'torch._dynamo', 'triton'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@settings(max_examples=15, deadline=None)
@given(tokens=st.integers(3, 24), k=st.integers(1, 3), seed=st.integers(0, 100))
def test_grouped_expert_dispatch_equals_the_loop(tokens, k, seed):
    # The compiled form of the MoE (sorted tokens, two grouped matmuls) against the
    # eager loop, forward and backward, experts without tokens included.
    from ds_model.moe import RoutedExperts, _grouped_fits

    x8 = torch.zeros(1, 8)
    assert not _grouped_fits(x8, RoutedExperts(2, 8, 5)[0].down_proj.weight)  # 20-byte rows
    gen = torch.Generator().manual_seed(seed)
    experts = RoutedExperts(6, 8, 12)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(tokens, 8, generator=gen, requires_grad=True)
    idx = torch.stack([torch.randperm(6, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    loop = experts._per_expert(x, weights, idx)
    grouped = experts._grouped(x, weights, idx, experts._plain_weights())
    torch.testing.assert_close(grouped, loop, atol=1e-6, rtol=1e-5)
    upstream = torch.randn(loop.shape, generator=gen)
    inputs = [x, *experts.parameters()]
    for a, b in zip(*(_grads(out, inputs, upstream) for out in (loop, grouped))):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def _grads(out, inputs, upstream):
    """Gradients with those of unused inputs (experts without tokens) as zeros."""
    grads = torch.autograd.grad(out, inputs, upstream, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


def test_compiled_moe_model_matches_eager():
    model = ds_model.from_config(ModelConfig.from_preset("tiny"), seed=0)
    ids = torch.arange(1, 13).reshape(2, 6)
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model)(ids).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    tie=st.booleans(),
    batch=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_input_major_weights_change_strides_not_the_model(tie, batch, seed):
    """The CPU decode layout: same Parameters, values, state dict and outputs; tied
    embeddings and stacked experts are left as they are; row_major_weights undoes it."""
    from ds_model.layout import input_major_weights, row_major_weights

    model = ds_model.from_config(ModelConfig.from_preset("tiny", tie_word_embeddings=tie), seed=1)
    experts = next(m for m in model.modules() if isinstance(m, ds_model.moe.RoutedExperts))
    assert experts.stack_weights()
    ids = torch.randint(
        0, model.config.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        want = model(ids).logits
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    changed = input_major_weights(model)
    assert changed > 0 and input_major_weights(model) == 0  # idempotent
    assert dict(model.named_parameters()) == params  # the same objects
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.lm_head.weight.is_contiguous() == tie
    assert model.model.layers[0].self_attn.o_proj.weight.stride() == (1, model.config.hidden_size)
    assert experts._stacked(experts._plain_weights()) is not None  # still the stacked views
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert row_major_weights(model) == changed
    assert all(p.is_contiguous() for p in model.parameters())


def test_input_major_weights_leave_other_dtypes_devices_and_layers_alone():
    from ds_model.layout import input_major_weights

    lin = torch.nn.Linear(8, 16, bias=False)
    assert input_major_weights(torch.nn.Sequential(lin.to(torch.bfloat16))) == 0
    assert input_major_weights(torch.nn.Sequential(torch.nn.Linear(8, 1))) == 0  # (1, 8)
    assert input_major_weights(torch.nn.Sequential(torch.nn.Embedding(8, 16))) == 0
    lin = torch.nn.Linear(8, 16)
    assert input_major_weights(torch.nn.Sequential(lin)) == 1
    assert lin.weight.stride() == (1, 16)


def test_a_model_re_laid_for_decoding_still_quantizes_saves_and_trains(tmp_path):
    """What a compiled CPU generate leaves: input-major weights. Quantizing, saving and
    a training step give what they give on the row-major model."""
    from ds_model.layout import input_major_weights
    from ds_quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = ModelConfig.from_preset("tiny")
    ids = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    for quant in (Int8WeightOnlyConfig(), Int4WeightOnlyConfig(group_size=32)):
        plain, relaid = (ds_model.from_config(config, seed=2) for _ in range(2))
        assert input_major_weights(relaid) > 0
        quantize_(plain, quant)
        quantize_(relaid, quant)
        with torch.no_grad():
            assert torch.equal(plain(ids).logits, relaid(ids).logits), type(quant).__name__
    relaid = ds_model.from_config(config, seed=2)
    input_major_weights(relaid)
    relaid.save_pretrained(tmp_path)
    loaded = ds_model.from_pretrained(tmp_path)
    for key, value in relaid.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    plain = ds_model.from_config(config, seed=2)
    for model in (plain, relaid):
        model.train()
        model(ids, labels=ids).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), relaid.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert b.grad.stride() == b.stride(), name  # gradients follow the layout


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_stacked_for_decoding_still_decode_and_save(tmp_path, bits):
    """What a compiled CPU generate leaves on an INT8 / INT4 model: the experts'
    quantized buffers as views of stacked ones. Eager steps, saving and loading give
    what they give on the model as quantized."""
    from ds_model.moe import RoutedExperts
    from ds_quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = ModelConfig.from_preset("tiny")
    ids = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    quant = Int8WeightOnlyConfig() if bits == 8 else Int4WeightOnlyConfig(group_size=32)
    model = quantize_(ds_model.from_config(config, seed=2), quant)
    with torch.no_grad():
        expected = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    assert experts and not any(m.stack_weights() for m in experts)
    assert all(m._stacked_quantized() is not None for m in experts)
    first, second = experts[0][0].gate_proj.weight, experts[0][1].down_proj.weight
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    assert (
        first.untyped_storage().data_ptr()
        == experts[0][1].up_proj.weight.untyped_storage().data_ptr()
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    model.save_pretrained(tmp_path)
    loaded = ds_model.from_pretrained(tmp_path)
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def _in_child(call: str) -> None:
    """Run ``call`` (a function of this module) in a child process: compiling starts
    threads and worker processes, after which this process's fork-based tests (the
    slow run's distributed ones) cannot fork safely."""
    done = subprocess.run(
        [sys.executable, "-c", f"import test_fast_paths as t; t.{call}"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=os.path.dirname(__file__),
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _each_case(check, cases) -> None:
    """Run ``check`` on every case in this (child) process, naming the case that fails:
    one child for all of them, since each child spends ~15 s importing and warming up
    inductor before it compiles anything."""
    for case in cases:
        torch._dynamo.reset()
        try:
            check(case)
        except Exception as error:
            raise AssertionError(f"{check.__name__}({case!r}) failed") from error


@pytest.mark.slow
def test_compiled_one_token_experts_see_a_replaced_layer():
    _in_child(
        "_each_case(t.compiled_one_token_experts_see_a_replaced_layer,"
        " ['layer', 'expert', 'buffer', 'to'])"
    )


@pytest.mark.slow
def test_compiled_one_token_experts_equal_the_eager_loop():
    _in_child(
        "_each_case(t.compiled_one_token_experts_equal_the_eager_loop,"
        " ['float32', 'bfloat16', 'int8', 'int4'])"
    )


def compiled_one_token_experts_see_a_replaced_layer(change):
    # Compiled one-token steps read the stacked weights without checking each expert;
    # replacing an expert's layer or buffer, or moving the experts, must still reach
    # the next compiled step.
    from ds_model.moe import RoutedExperts
    from ds_quant import Int8WeightOnlyConfig, quantize_

    gen = torch.Generator().manual_seed(0)
    experts = RoutedExperts(4, 32, 48)
    if change == "buffer":
        quantize_(experts, Int8WeightOnlyConfig())
    experts.stack_weights()
    assert experts._one_token_stacked is not None
    compiled = torch.compile(experts, dynamic=False)
    x = torch.randn(1, 32, generator=gen)
    weights, idx = torch.rand(1, 2, generator=gen), torch.tensor([[0, 2]])
    with torch.inference_mode():
        compiled(x, weights, idx)
    if change == "layer":
        experts[0].gate_proj = torch.nn.Linear(32, 48, bias=False)
    elif change == "expert":
        experts[2] = type(experts[2])(32, 48)
    elif change == "buffer":
        experts[2].down_proj.weight = experts[2].down_proj.weight.clone().neg_()
    else:
        experts.to(torch.float64).to(torch.float32)
    assert experts._one_token_stacked is None
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x, weights, idx), experts._per_expert(x, weights, idx))


def test_modules_without_a_hash_still_register_layers():
    # The stacking watch sees every module assignment in the process; a module class
    # that is unhashable (``__eq__`` without ``__hash__``) must still work.
    import ds_model.moe  # noqa: F401  (installs the watch)

    class Unhashable(torch.nn.Module):
        def __eq__(self, other):
            return self is other

    module = Unhashable()
    module.layer = torch.nn.Linear(2, 2)
    module.register_buffer("scale", torch.ones(2))
    module.weight = torch.nn.Parameter(torch.zeros(2))
    assert module.layer.in_features == 2 and module.scale.sum() == 2


def test_decode_layouts_made_under_inference_mode_leave_the_model_trainable():
    """A compiled generate inside ``torch.inference_mode()`` stacks the experts and
    re-lays the Linear weights there; neither may leave inference tensors behind."""
    from ds_model.layout import input_major_weights

    model = ds_model.from_config(ModelConfig.from_preset("tiny"), seed=0)
    with torch.inference_mode():
        for m in model.modules():
            if isinstance(m, ds_model.moe.RoutedExperts):
                assert m.stack_weights()
        assert input_major_weights(model) > 0
    assert not any(p.is_inference() for p in model.parameters())
    ids = torch.tensor([[1, 2, 3, 4]])
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.model.layers[0].parameters())


@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 4), seed=st.integers(0, 100), quantized=st.booleans())
def test_one_token_expert_decode_equals_the_sorted_loop(k, seed, quantized):
    # Batch-1 decode sums the token's k experts directly; the sorted loop (what a
    # batch of tokens takes) is the ground truth, quantized experts included.
    from ds_model.moe import RoutedExperts

    gen = torch.Generator().manual_seed(seed)
    experts = RoutedExperts(6, 32, 48)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    if quantized:
        quant = pytest.importorskip("ds_quant")
        quant.quantize_(experts, quant.Int8WeightOnlyConfig())
    x = torch.randn(1, 32, generator=gen)
    idx = torch.randperm(6, generator=gen)[:k][None]
    weights = torch.rand(1, k, generator=gen)
    with torch.inference_mode():
        one = experts(x, weights, idx)
        # The same token as row 0 of a two-token batch takes the sorted loop.
        pair = experts(torch.cat((x, x)), weights.repeat(2, 1), idx.repeat(2, 1))
    torch.testing.assert_close(one, pair[:1], atol=1e-5, rtol=1e-4)  # summation order


def compiled_one_token_experts_equal_the_eager_loop(dtype):
    # A compiled CPU step sums one token's k experts as products over the stacked
    # weights (ds-quant's packed weights, scales and zero points for INT8 / INT4 experts) indexed by the
    # routing; the eager loop is the ground truth, for every routing (a new routing
    # must not recompile: the index is data, not a guard).
    from ds_model.moe import RoutedExperts
    from torch._inductor.compile_fx import compile_fx

    ops: set[str] = set()

    def inductor_recording_ops(graph, example_inputs):
        ops.update(str(node.target) for node in graph.graph.nodes)
        return compile_fx(graph, example_inputs)

    gen = torch.Generator().manual_seed(0)
    experts = RoutedExperts(6, 32, 48)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    quantized = dtype in ("int8", "int4")
    if quantized:
        import ds_quant as quant

        config = (
            quant.Int8WeightOnlyConfig()
            if dtype == "int8"
            else quant.Int4WeightOnlyConfig(group_size=16)
        )
        quant.quantize_(experts, config)
        assert not experts.stack_weights()  # no grouped form; stacked for this one
        dtype = torch.float32
    else:
        dtype = getattr(torch, dtype)
        experts.to(dtype)
        assert experts.stack_weights()
    torch._dynamo.reset()
    compiled = torch.compile(experts, backend=inductor_recording_ops, fullgraph=True, dynamic=False)
    cases = []
    for k, seed in [(2, 1), (2, 2), (2, 3)]:
        gen.manual_seed(seed)
        x = torch.randn(1, 32, generator=gen).to(dtype)
        cases.append(
            (x, torch.rand(1, k, generator=gen), torch.randperm(6, generator=gen)[:k][None])
        )
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        got = [compiled(*case) for case in cases]
    # The ground truth: the eager experts on dequantized weights, or, where ds-quant's
    # CPU decode kernel runs the compiled form (its int16 activation rounding), on it.
    if quantized and not quant.kernels.cpu_gemv_available():
        for layer in experts.modules():
            if isinstance(layer, quant.QuantizedLinear):
                layer.backend = "reference"
    # bfloat16: the products accumulate in float32 where oneDNN's may round sooner, so
    # the two may differ by a unit in the last place of a bfloat16 value (2^-7 relative).
    exact = dtype == torch.float32
    tolerance = {"atol": 1e-5, "rtol": 1e-4} if exact else {"atol": 2e-2, "rtol": 2e-2}
    with torch.inference_mode():
        for case, out in zip(cases, got):
            torch.testing.assert_close(out, experts._per_expert(*case), **tolerance)
    # The gathered products, not the eager loop as an opaque op.
    assert ops and not any("routed_experts" in op for op in ops), ops


def test_bf16_absorbed_decode_matches_float32():
    # The bfloat16 decode runs its products over the cache in float32; its logits track
    # the float32 model's within bfloat16's rounding of the weights and activations.
    config = ModelConfig.from_preset("tiny")
    model = ds_model.from_config(config, seed=3)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (2, 7), generator=gen)
    steps = torch.randint(0, config.vocab_size, (2, 6), generator=gen)
    want = _decode_logits(model, prompt, steps, fast=True)
    model = model.to(torch.bfloat16)
    got = _decode_logits(model, prompt, steps, fast=True, dtype=torch.bfloat16).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def _llama_tiny():
    return ModelConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
        }
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("config", ["v3", "llama"])
def test_eager_decode_reads_plain_layers_with_the_cpu_kernel(config, dtype, monkeypatch):
    """Eagerly, a bfloat16 or float32 model's decode rows run every plain linear layer
    (attention projections, MLPs and experts, the LM head) through ds-quant's kernel of
    that dtype; its logits are torch's matmul's up to the dtype's rounding, and more
    than the kernel's rows (a prefill) keep the matmul."""
    from ds_quant.kernels import cpu_gemv

    if not cpu_gemv.available():
        pytest.skip("no C++ compiler or no AVX2 / AVX512BW on this CPU")
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    config = ModelConfig.from_preset("tiny") if config == "v3" else _llama_tiny()
    model = ds_model.from_config(config, seed=0, dtype=dtype)
    prompt, steps = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]), torch.tensor([[3, 4]])
    rows_seen, weights_seen = set(), set()
    kernel = getattr(cpu_gemv, f"{name}_gemv")

    def recording(x, weight):
        rows_seen.add(x.shape[:-1].numel())
        weights_seen.add(weight.data_ptr())
        return kernel(x, weight)

    monkeypatch.setattr(cpu_gemv, f"{name}_gemv", recording)
    with_kernel = _decode_logits(model, prompt, steps, fast=True, dtype=dtype)
    # The 10-row prefill's layers kept the matmul (a routed expert's few prefill rows
    # may not); decode rows did not.
    assert 1 in rows_seen and max(rows_seen) <= getattr(cpu_gemv, f"{name}_rows")()
    # Every plain layer a decode step runs (routed experts: the chosen ones; MLA's
    # kv_b_proj is absorbed into the attention products, not called).
    every_step = {
        m.weight.data_ptr()
        for name, m in model.named_modules()
        if type(m) is torch.nn.Linear and ".experts." not in name and "kv_b_proj" not in name
    }
    assert every_step <= weights_seen and model.lm_head.weight.data_ptr() in every_step
    experts = [
        m for name, m in model.named_modules() if ".experts." in name and hasattr(m, "weight")
    ]
    assert not experts or any(m.weight.data_ptr() in weights_seen for m in experts)
    monkeypatch.setattr(cpu_gemv, f"{name}_takes", lambda x, weight: False)
    with_matmul = _decode_logits(model, prompt, steps, fast=True, dtype=dtype)
    scale = with_matmul.float().abs().max()
    atol = (0.03 if dtype == torch.bfloat16 else 1e-5) * scale
    torch.testing.assert_close(with_kernel.float(), with_matmul.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_kernel_path_keeps_hooks_and_gradients(dtype):
    """A hooked layer still runs its module (the hook sees the call); with gradients on,
    the layers keep the matmul, which has a backward."""
    model = ds_model.from_config(_llama_tiny(), seed=0, dtype=dtype)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        model(torch.tensor([[5]]))
    handle.remove()
    assert seen == [(1, 1, 256)]
    model(torch.tensor([[5]])).logits.float().sum().backward()
    assert model.lm_head.weight.grad is not None
    assert model.model.layers[0].mlp.gate_proj.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_eager_steps_run_every_norm_on_the_cpu_kernel(dtype, monkeypatch):
    """Eagerly, every RMSNorm of a prefill and its decode steps runs ds-quant's one-pass
    kernel; the logits are torch's norms' up to rounding, and with gradients on the norms
    keep torch's ops (which have a backward)."""
    from ds_model.norm import RMSNorm
    from ds_quant.kernels import cpu_gemv

    if not cpu_gemv.available():
        pytest.skip("no C++ compiler or no AVX2 / AVX512BW on this CPU")
    model = ds_model.from_config(ModelConfig.from_preset("tiny"), seed=0, dtype=dtype)
    prompt, steps = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]), torch.tensor([[3, 4]])
    seen = set()
    kernel = cpu_gemv.rms_norm

    def recording(x, weight, eps):
        seen.add(weight.data_ptr())
        return kernel(x, weight, eps)

    monkeypatch.setattr(cpu_gemv, "rms_norm", recording)
    with_kernel = _decode_logits(model, prompt, steps, fast=True, dtype=dtype)
    norms = {m.weight.data_ptr() for m in model.modules() if isinstance(m, RMSNorm)}
    assert norms and seen == norms
    seen.clear()
    monkeypatch.setattr(RMSNorm, "cpu_kernel", False)
    with_torch = _decode_logits(model, prompt, steps, fast=True, dtype=dtype)
    assert not seen
    scale = with_torch.float().abs().max()
    atol = (0.03 if dtype == torch.bfloat16 else 1e-5) * scale
    torch.testing.assert_close(with_kernel.float(), with_torch.float(), atol=atol, rtol=0)
    monkeypatch.undo()
    seen.clear()
    monkeypatch.setattr(cpu_gemv, "rms_norm", recording)
    model(torch.tensor([[5]])).logits.float().sum().backward()
    assert not seen and model.model.norm.weight.grad is not None
