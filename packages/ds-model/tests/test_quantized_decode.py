"""Decoding with ds-quant weights on CPU: the packed kernels against the dequantized
reference, the MoE reading only its routed experts, and the built-in model's greedy
output under INT8 against float32."""

from pathlib import Path

import ds_model
import pytest
import torch

quant = pytest.importorskip("ds_quant")

BUILT_IN = Path(__file__).resolve().parents[3] / "models" / "ds-tiny-coder"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    ds_model.from_config("tiny", seed=0).save_pretrained(path)
    return path


def use_reference_kernels(model) -> int:
    layers = [m for m in model.modules() if isinstance(m, quant.QuantizedLinear)]
    for layer in layers:
        layer.backend = "reference"
    return len(layers)


def step_logits(model, ids, steps):
    """Greedy decode ``steps`` tokens (whole-sequence forwards); every step's logits."""
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(ids).logits[:, -1]
            out.append(logits)
            ids = torch.cat((ids, logits.argmax(-1, keepdim=True)), dim=1)
    return torch.stack(out, 1), ids


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_moe_decode_matches_its_dequantized_reference(tiny_path, name):
    fast = ds_model.from_pretrained(tiny_path, dtype="float32", quantization=name)
    reference = ds_model.from_pretrained(tiny_path, dtype="float32", quantization=name)
    assert use_reference_kernels(reference) > 0
    ids = torch.tensor([[5, 17, 99, 3], [7, 7, 200, 41]])
    got, got_ids = step_logits(fast, ids, 6)
    want, want_ids = step_logits(reference, ids, 6)
    assert torch.equal(got_ids, want_ids)
    # Only the kernels' bfloat16 activations differ from the reference's float32 ones.
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    assert fast.generate(ids, 8) == reference.generate(ids, 8)


def test_moe_decode_runs_only_the_routed_experts(tiny_path):
    model = ds_model.from_pretrained(tiny_path, dtype="float32", quantization="int8")
    calls: list[int] = []
    moe_layers = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    for moe in moe_layers:
        for e, expert in enumerate(moe.experts):
            expert.down_proj.register_forward_hook(lambda *_, e=e: calls.append(e))
    top_k = model.config.num_experts_per_tok
    with torch.inference_mode():
        model(torch.tensor([[5, 17, 99]]))
        calls.clear()
        model(torch.tensor([[42]]))  # one token: one decode step's reads
    assert 0 < len(calls) <= top_k * len(moe_layers)


# INT8 weight-only rounding moves single logits of the built-in model by up to ~0.3, the
# lead of the top token over the runner-up by less: a greedy choice that leads by under
# NEAR_TIE is one that any rounding (bf16's too) may flip, after which the two texts
# part for a reason that is not a fault (measured: texts parted at leads of 0.01).
NEAR_TIE = 0.25


@pytest.mark.skipif(not BUILT_IN.is_dir(), reason="the built-in model is not in this checkout")
def test_built_in_model_greedy_output_under_int8_follows_float32():
    """INT8 decoding of the built-in model picks fp32's greedy token wherever fp32 is
    not at a near-tie: generated text, and where it stops, equal up to the first near-tie (the one-row decode
    kernels), and the same choice at every clear position of fp32's continuation (the
    whole-sequence kernels)."""
    full = ds_model.from_pretrained(BUILT_IN, dtype="float32")
    int8 = ds_model.from_pretrained(BUILT_IN, dtype="float32", quantization="int8")
    assert isinstance(int8.lm_head, quant.Int8WeightOnlyLinear)
    tokenizer = ds_model.load_tokenizer(BUILT_IN)
    (eos,) = {*full.config.eos_token_ids, tokenizer.eos_token_id} - {None}

    def ended(ids: list[int]) -> list[int]:  # generate leaves out the EOS that stops it
        return [*ids, eos] if len(ids) < 32 else ids

    clear = total = 0
    for prompt in ["def fibonacci(n):", "import os\n", "class Stack:\n    def"]:
        prompt_ids = tokenizer.encode(prompt)
        new_ids = ended(full.generate(prompt_ids, 32))
        got = ended(int8.generate(prompt_ids, 32))
        ids, start = torch.tensor([prompt_ids + new_ids]), len(prompt_ids) - 1
        with torch.inference_mode():
            logits = full(ids).logits[0, start:-1].float()
            chosen = int8(ids).logits[0, start:-1].argmax(-1)
        top2 = logits.topk(2, dim=-1).values
        lead = top2[:, 0] - top2[:, 1]
        apart = next((i for i, (a, b) in enumerate(zip(got, new_ids)) if a != b), None)
        if apart is not None:  # the texts may part only where fp32 itself nearly tied
            assert lead[apart] < NEAR_TIE, (prompt, apart, lead.tolist())
        new_ids = torch.tensor(new_ids)
        sure = lead >= NEAR_TIE
        assert torch.equal(chosen[sure], new_ids[sure]), prompt
        clear, total = clear + int(sure.sum()), total + len(lead)
    assert clear >= 0.75 * total, f"only {clear} of {total} positions are clear choices"


@pytest.mark.parametrize("native", [True, False])
def test_dtype_auto_is_bfloat16_only_where_the_cpu_multiplies_it(tiny_path, monkeypatch, native):
    from ds_model.training import trainer

    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: native)
    model = ds_model.from_pretrained(tiny_path, dtype="auto")
    want = torch.bfloat16 if native else torch.float32
    assert {p.dtype for p in model.parameters()} == {want}
    assert ds_model.from_pretrained(tiny_path, dtype="auto", quantization="int8").generate(
        [1, 2, 3], 3
    )
