"""The config.json files DeepSeek publishes parse, and the model they describe (built on
the meta device: no memory) has the sizes DeepSeek reports."""

from __future__ import annotations

import json

import ds_model
import torch
from ds_model.cli import main

# DeepSeek-V3's config.json (FP8 checkpoint), abridged only of auto_map.
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "v_head_dim": 128,
    "vocab_size": 102400,
}

DEEPSEEK_CODER_6_7B = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 32013,
    "eos_token_id": 32021,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "max_position_embeddings": 16384,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"factor": 4.0, "type": "linear"},
    "rope_theta": 100000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 32256,
}


def sizes(raw: dict) -> tuple[int, int]:
    config = ds_model.ModelConfig.from_dict(raw)
    with torch.device("meta"):
        model = ds_model.DeepSeekForCausalLM(config)
    return ds_model.parameter_counts(model)


def test_deepseek_v3_is_671b_with_37b_active():
    total, active = sizes(DEEPSEEK_V3)
    assert abs(total / 671e9 - 1) < 0.01, total
    assert abs(active / 37e9 - 1) < 0.02, active
    config = ds_model.ModelConfig.from_dict(DEEPSEEK_V3)
    assert config.kv_cache_bytes_per_token(2) == (512 + 64) * 61 * 2
    assert config.topk_method == "noaux_tc" and config.interleaved_rope
    assert config.rope_scaling.rope_type == "yarn" and config.rope_scaling.factor == 40
    # YaRN's correction: 1/sqrt(192) x (0.1 ln 40 + 1)^2.
    assert abs(config.softmax_scale - 192**-0.5 * (0.1 * 2.302585 * 1.60206 + 1) ** 2) < 1e-4


def test_deepseek_v2_lite_is_15_7b_with_2_4b_active():
    total, active = sizes(DEEPSEEK_V2_LITE)
    assert abs(total / 15.7e9 - 1) < 0.01, total
    assert abs(active / 2.4e9 - 1) < 0.03, active


def test_deepseek_coder_6_7b(tmp_path, capsys):
    total, active = sizes(DEEPSEEK_CODER_6_7B)
    assert abs(total / 6.74e9 - 1) < 0.01, total
    assert total - active == 32256 * 4096  # dense: all but the embedding table
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_CODER_6_7B))
    assert main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_cache_bytes_per_token_bf16"] == 2 * 4096 * 32 * 2
    assert info["parameters"] == total


def test_hf_config_written_back_parses_to_the_same_config():
    for raw in (DEEPSEEK_V3, DEEPSEEK_V2_LITE, DEEPSEEK_CODER_6_7B):
        config = ds_model.ModelConfig.from_dict(raw)
        again = ds_model.ModelConfig.from_dict(json.loads(json.dumps(config.to_hf_dict())))
        assert again == config
