"""Parity with transformers on tiny random checkpoints, one per listed variant.

Each case builds a transformers model, saves it, loads it with ds-model and checks:
fp32 logits on a left-padded batch within 1e-4, 32 greedy tokens identical, and that
ds-model's own save_pretrained output loads back in transformers with the same logits.
"""

from __future__ import annotations

import warnings

import ds_model
import pytest
import torch

transformers = pytest.importorskip("transformers")


YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
MLA = {
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 12,
    "moe_intermediate_size": 16,
    "n_shared_experts": 1,
}
COMMON = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "eos_token_id": None,
    "bos_token_id": None,
    "pad_token_id": None,
}

CASES = {
    # noaux_tc with n_group > 1, a non-zero correction bias, no q low-rank, YaRN, dense first layer.
    "v3_noaux_yarn": (
        "DeepseekV3",
        {
            **MLA,
            "q_lora_rank": None,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_group": 4,
            "topk_group": 2,
            "first_k_dense_replace": 1,
            "rope_scaling": YARN,
        },
    ),
    # q low-rank set, tied embeddings, rotate-half rope layout, all layers MoE.
    "v3_qlora_tied": (
        "DeepseekV3",
        {
            **MLA,
            "q_lora_rank": 24,
            "n_routed_experts": 4,
            "num_experts_per_tok": 3,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 0,
            "tie_word_embeddings": True,
            "rope_interleave": False,
            "routed_scaling_factor": 1.5,
        },
    ),
    "v2_greedy": (
        "DeepseekV2",
        {
            **MLA,
            "q_lora_rank": None,
            "n_routed_experts": 6,
            "num_experts_per_tok": 2,
            "topk_method": "greedy",
            "first_k_dense_replace": 1,
        },
    ),
    "v2_group_limited_yarn": (
        "DeepseekV2",
        {
            **MLA,
            "q_lora_rank": 24,
            "n_routed_experts": 8,
            "num_experts_per_tok": 3,
            "topk_method": "group_limited_greedy",
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 16.0,
            "rope_scaling": YARN,
            "tie_word_embeddings": True,
        },
    ),
    "llama_gqa_linear": (
        "Llama",
        {"num_key_value_heads": 2, "rope_scaling": {"type": "linear", "factor": 4.0}},
    ),
    "llama_tied": ("Llama", {"tie_word_embeddings": True, "attention_bias": True}),
}


def build_hf(case: str, seed: int = 0):
    family, extra = CASES[case]
    config = getattr(transformers, f"{family}Config")(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if "e_score_correction_bias" in name:
                t.copy_(torch.randn_like(t) * 0.5)
            elif name.endswith("bias"):
                t.normal_(0, 0.02)
            elif "norm" in name:
                t.copy_(1 + 0.1 * torch.randn_like(t))
    return model


def padded_batch(vocab: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :9] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    hf = build_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(path)
    ours = ds_model.from_pretrained(path, dtype=torch.float32)
    return request.param, hf, ours


def test_logits_match_on_padded_batch(pair):
    _, hf, ours = pair
    ids, mask, positions = padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
        out = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ref[real] - out[real]).abs().max().item() <= 1e-4


def test_greedy_32_tokens_identical(pair):
    _, hf, ours = pair
    ids, _, _ = padded_batch(hf.config.vocab_size, seed=2)
    prompt = ids[:1, :7]
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours.generate(prompt[0].tolist(), 32) == ref[0, 7:].tolist()


def test_batched_greedy_matches_each_prompt_alone(pair):
    _, hf, ours = pair
    ids, mask, _ = padded_batch(hf.config.vocab_size, seed=3)
    rows = [ids[b][mask[b].bool()].tolist() for b in range(3)]
    batched = ours.generate(rows, 8)
    assert batched == [ours.generate(r, 8) for r in rows]


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    case, _, ours = pair
    ours.save_pretrained(tmp_path)
    family, _ = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = getattr(transformers, f"{family}ForCausalLM").from_pretrained(tmp_path).eval()
    ids, mask, positions = padded_batch(ours.config.vocab_size, seed=4)
    with torch.no_grad():
        ref = back(ids, attention_mask=mask, position_ids=positions).logits
        out = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ref[real] - out[real]).abs().max().item() <= 1e-4


def test_peft_adapter_trained_on_transformers_loads_at_load_time(tmp_path):
    """A LoRA adapter PEFT saved for transformers' DeepSeek-V3 loads through
    ``from_pretrained(adapter=...)`` and gives the same logits."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("ds_lora")
    hf = build_hf("v3_noaux_yarn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path / "base")
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "kv_b_proj"]
        )
        tuned = peft.get_peft_model(hf, config)
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        tuned.save_pretrained(tmp_path / "adapter")
        ours = ds_model.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    ids, mask, positions = padded_batch(hf.config.vocab_size, seed=5)
    with torch.no_grad():
        ref = tuned(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ref[real] - out[real]).abs().max().item() <= 1e-4
