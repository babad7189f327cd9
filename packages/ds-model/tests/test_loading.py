"""Loading and saving: layouts, FP8 through ds-quant, quantization and LoRA at load,
multi-token-prediction keys, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import warnings

import ds_model
import pytest
import torch
from ds_model import CheckpointError, ConfigError, MissingShardError, ShapeMismatchError
from safetensors.torch import load_file, save_file


@pytest.fixture
def tiny_dir(tmp_path):
    model = ds_model.from_config("tiny", seed=0)
    model.save_pretrained(tmp_path)
    return tmp_path, model


def logits(model, ids=None):
    ids = torch.arange(1, 9)[None] if ids is None else ids
    with torch.no_grad():
        return model(ids).logits


def assert_same_model(loaded, model) -> None:
    """Weights bit-equal, logits equal to rounding: memory-mapped safetensors place
    tensors at 8-byte offsets, and MKL's kernels round differently on data that is not
    64-byte aligned (6e-8, seen on an AMD EPYC host)."""
    saved = model.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(t, saved[k]) for k, t in loaded.state_dict().items())
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-6)


def test_round_trip_is_exact_and_atomic(tiny_dir):
    path, model = tiny_dir
    assert not [p.name for p in path.iterdir() if p.name.startswith(".")]
    keys = load_file(path / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys  # DeepSeek's layout
    loaded = ds_model.from_pretrained(path)
    assert_same_model(loaded, model)


def test_sharded_checkpoint_with_index(tmp_path):
    model = ds_model.from_config("tiny", seed=1)
    ds_model.save_pretrained(model, tmp_path, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert_same_model(ds_model.AutoModel.from_pretrained(tmp_path), model)


def test_missing_shard_names_the_file(tmp_path):
    model = ds_model.from_config("tiny", seed=1)
    ds_model.save_pretrained(model, tmp_path, max_shard_bytes=64 * 1024)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(MissingShardError, match=victim.name):
        ds_model.from_pretrained(tmp_path)


def test_shape_mismatch_names_key_and_both_shapes(tiny_dir):
    path, _ = tiny_dir
    state = load_file(path / "model.safetensors")
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    state[key] = torch.zeros(5, 7)
    save_file(state, path / "model.safetensors")
    with pytest.raises(ShapeMismatchError, match=r"kv_b_proj.weight.*\(5, 7\).*\(128, 32\)"):
        ds_model.from_pretrained(path)


def test_missing_tensor_is_named(tiny_dir):
    path, _ = tiny_dir
    state = load_file(path / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        ds_model.from_pretrained(path)


def test_unknown_model_type_lists_supported(tiny_dir):
    path, _ = tiny_dir
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "mixtral"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="llama, deepseek_v2, deepseek_v3"):
        ds_model.from_pretrained(path)


def test_not_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        ds_model.from_pretrained("deepseek-ai/DeepSeek-V3")


def test_invalid_config_values_are_rejected():
    with pytest.raises(ConfigError, match="num_experts_per_tok=9 exceeds n_routed_experts=8"):
        ds_model.ModelConfig.from_preset("tiny", num_experts_per_tok=9)
    with pytest.raises(ConfigError, match="topk_method='best'"):
        ds_model.ModelConfig.from_preset("tiny", topk_method="best")
    with pytest.raises(ConfigError, match="rope_scaling type='dynamic'"):
        ds_model.ModelConfig.from_preset("tiny", rope_scaling={"type": "dynamic", "factor": 2.0})


def test_prompt_longer_than_context_is_rejected():
    model = ds_model.from_config("tiny", seed=0)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model.generate(list(range(1, 514)), 1)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.generate([1, 2, 3], 510)
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        model(torch.zeros(1, 513, dtype=torch.long))


def test_mtp_layers_are_skipped_with_a_note(tiny_dir):
    path, model = tiny_dir
    state = load_file(path / "model.safetensors")
    for key in [k for k in state if k.startswith("model.layers.1.")]:
        state[key.replace("model.layers.1.", "model.layers.2.")] = state[key].clone()
    state["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(state, path / "model.safetensors")
    with pytest.warns(UserWarning, match=r"skipped layers \[2\].*multi-token"):
        loaded = ds_model.from_pretrained(path)
    assert_same_model(loaded, model)


def test_fp8_block_weights_load_through_ds_quant(tiny_dir):
    quant = pytest.importorskip("ds_quant")
    path, model = tiny_dir
    state = load_file(path / "model.safetensors")
    block = (16, 16)
    reference = {}
    for key in list(state):
        if key.endswith("proj.weight") and state[key].dim() == 2:
            q, scale = quant.quantize_fp8_block(state[key], block)
            state[key], state[key + "_scale_inv"] = q, scale
            reference[key] = quant.dequantize_fp8_block(q, scale, block, torch.float32)
    save_file(state, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block)}
    (path / "config.json").write_text(json.dumps(config))
    loaded = ds_model.from_pretrained(path, dtype=torch.float32)
    q_proj = loaded.model.layers[0].self_attn.q_a_proj.weight
    assert torch.equal(q_proj, reference["model.layers.0.self_attn.q_a_proj.weight"])
    expert = loaded.model.layers[1].mlp.experts[3].down_proj.weight
    assert torch.equal(expert, reference["model.layers.1.mlp.experts.3.down_proj.weight"])
    # FP8 rounding changes the logits a little, not a lot.
    assert (logits(loaded) - logits(model)).abs().max() < 0.05 * logits(model).abs().max()


def test_quantization_at_load(tiny_dir):
    quant = pytest.importorskip("ds_quant")
    path, model = tiny_dir
    loaded = ds_model.from_pretrained(path, quantization=quant.Int8WeightOnlyConfig())
    attn = loaded.model.layers[0].self_attn
    assert isinstance(attn.q_b_proj, quant.QuantizedLinear)
    # Routed experts are linear layers too: in a MoE model they are most of the weights.
    experts = loaded.model.layers[1].mlp.experts
    assert all(isinstance(e.down_proj, quant.QuantizedLinear) for e in experts)
    # The head, the largest matrix a decode step reads, is INT8 under weight-only recipes.
    assert isinstance(loaded.lm_head, quant.Int8WeightOnlyLinear)
    assert isinstance(loaded.model.layers[1].mlp.gate.weight, torch.nn.Parameter)  # router
    ref = logits(model)
    assert (logits(loaded) - ref).abs().max() < 0.05 * ref.abs().max()
    assert loaded.generate([1, 2, 3], 4) is not None


def test_lora_adapter_at_load(tiny_dir, tmp_path):
    lora = pytest.importorskip("ds_lora")
    path, _ = tiny_dir
    model = ds_model.from_pretrained(path)
    config = lora.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_b_proj", "o_proj"], lora_dropout=0.0
    )
    lora.inject(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapter = tmp_path / "adapter"
    lora.save_adapter(model, adapter)
    expected = logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = ds_model.from_pretrained(path, adapter=adapter)
    assert torch.allclose(logits(loaded), expected, atol=1e-6)
    base = ds_model.from_pretrained(path)
    assert not torch.allclose(logits(base), expected, atol=1e-3)


def test_bfloat16_load_and_preset_names():
    model = ds_model.from_pretrained("tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert len(model.generate([1, 2, 3], 3)) <= 3
    with pytest.raises(ValueError, match="not a torch floating dtype"):
        ds_model.from_pretrained("tiny", dtype="int8")


def test_parameter_counts_count_k_of_e_routed_experts():
    model = ds_model.from_config("tiny")
    total, active = ds_model.parameter_counts(model)
    c = model.config
    assert total == sum(p.numel() for p in model.parameters())
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    routed_off = per_expert * (c.n_routed_experts - c.num_experts_per_tok)
    assert total - active == routed_off + c.vocab_size * c.hidden_size  # + embedding table


def test_fp8_linears_can_stay_fp8(tiny_dir):
    quant = pytest.importorskip("ds_quant")
    path, _ = tiny_dir
    state = load_file(path / "model.safetensors")
    for key in list(state):
        if key.endswith("proj.weight") and state[key].dim() == 2:
            state[key], state[key + "_scale_inv"] = quant.quantize_fp8_block(state[key], (16, 16))
    save_file(state, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    (path / "config.json").write_text(json.dumps(config))
    dequantized = ds_model.from_pretrained(path, dtype=torch.float32)
    kept = ds_model.from_pretrained(path, dtype=torch.float32, keep_fp8=True)
    attn = kept.model.layers[0].self_attn
    assert isinstance(attn.kv_b_proj, quant.Fp8BlockLinear)
    assert attn.kv_b_proj.weight.dtype == torch.float8_e4m3fn
    experts = kept.model.layers[1].mlp.experts
    assert all(isinstance(e.gate_proj, quant.Fp8BlockLinear) for e in experts)
    torch.testing.assert_close(logits(kept), logits(dequantized), atol=1e-5, rtol=1e-5)
    assert kept.generate([1, 2, 3], 4) == dequantized.generate([1, 2, 3], 4)


def test_save_refuses_adapter_layers(tiny_dir, tmp_path):
    # Quantized models save in ds-quant's format (test_quantized_save.py); LoRA layers
    # must be merged or saved as an adapter.
    lora = pytest.importorskip("ds_lora")
    path, _ = tiny_dir
    model = ds_model.from_pretrained(path)
    lora.inject(model, lora.LoraConfig(r=2, target_modules=["o_proj"]))
    with pytest.raises(CheckpointError, match="merge the adapter"):
        model.save_pretrained(tmp_path / "out")


def test_quantization_by_name_and_named_adapters(tiny_dir, tmp_path):
    quant = pytest.importorskip("ds_quant")
    lora = pytest.importorskip("ds_lora")
    path, _ = tiny_dir
    int4 = ds_model.from_pretrained(path, quantization="int4")
    assert isinstance(int4.model.layers[0].mlp.gate_proj, quant.Int4WeightOnlyLinear)
    assert isinstance(int4.lm_head, quant.Int8WeightOnlyLinear)  # 8-bit head under 4-bit
    assert isinstance(ds_model.from_pretrained(path, quantization="fp8").lm_head, torch.nn.Linear)
    by_ds_quant_name = ds_model.from_pretrained(path, quantization="int8_weight_only")
    assert isinstance(by_ds_quant_name.model.layers[0].mlp.gate_proj, quant.Int8WeightOnlyLinear)
    with pytest.raises(ValueError, match="quantization='int3' is unknown"):
        ds_model.from_pretrained(path, quantization="int3")
    model = ds_model.from_pretrained(path)
    lora.inject(model, lora.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]))
    lora.save_adapter(model, tmp_path / "a")
    base = ds_model.from_pretrained(path)
    ds_model.load_adapter(base, tmp_path / "a", adapter_name="first")
    ds_model.load_adapter(base, tmp_path / "a", adapter_name="second")
    assert lora.adapter_names(base) == ["first", "second"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ds_model.load_adapter(base, tmp_path / "missing")


@pytest.mark.parametrize(
    "targets",
    [
        ["q_b_proj", "o_proj", "gate_proj", "lm_head"],
        # kv_b_proj runs on every cached context token, not on the step's new tokens.
        ["q_b_proj", "kv_b_proj", "o_proj"],
        # The routed experts' projections too: each expert sees a subset of the rows.
        ["gate_proj", "up_proj", "down_proj"],
    ],
)
def test_runner_serves_a_mixed_adapter_batch(tiny_dir, tmp_path, targets):
    lora = pytest.importorskip("ds_lora")
    path, _ = tiny_dir
    dirs = {}
    for i, name in enumerate(("a", "b")):
        model = ds_model.from_pretrained(path)
        lora.inject(model, lora.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(i))
        lora.save_adapter(model, tmp_path / name)
        dirs[name] = tmp_path / name
    served = ds_model.from_pretrained(path)
    for name, d in dirs.items():
        ds_model.load_adapter(served, d, adapter_name=name)
    runner = ds_model.ModelRunner(served, num_blocks=12, block_size=4)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    names = ["a", None, "b"]
    logits = runner.step(prompts, [0, 0, 0], [[0, 1], [2], [3]], adapters=names)
    decode = runner.step([[13], [14], [15]], [5, 3, 4], [[0, 1], [2], [3, 4]], adapters=names)
    for row, name in enumerate(names):
        alone = (
            ds_model.from_pretrained(path, adapter=dirs[name])
            if name
            else ds_model.from_pretrained(path)
        )
        with torch.no_grad():
            expected = alone(torch.tensor([prompts[row]])).logits[0, -1]
            after = alone(torch.tensor([[*prompts[row], 13 + row]])).logits[0, -1]
        torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decode[row], after, atol=1e-5, rtol=1e-5)
    # Two single-token rows: each routed expert serves one or two rows of the batch.
    pair = runner.step([[16], [17]], [6, 5], [[0, 1], [3, 4]], adapters=["a", "b"])
    for got, row, token in zip(pair, (0, 2), (16, 17)):
        alone = ds_model.from_pretrained(path, adapter=dirs[names[row]])
        with torch.no_grad():
            want = alone(torch.tensor([[*prompts[row], 13 + row, token]])).logits[0, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # A prefill given before a decode row: each keeps its own adapter and logits row.
    mixed = runner.step([[20, 21, 22], [18]], [0, 7], [[5], [0, 1]], adapters=["b", "a"])
    for got, name, tokens in zip(mixed, "ba", ([20, 21, 22], [*prompts[0], 13, 16, 18])):
        alone = ds_model.from_pretrained(path, adapter=dirs[name])
        with torch.no_grad():
            want = alone(torch.tensor([tokens])).logits[0, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one entry per sequence"):
        runner.step([[1]], [0], [[5]], adapters=["a", "b"])


def test_default_tensor_parallel_plan_shards_mlps_but_not_routed_experts():
    from ds_model.training.distributed import default_tp_plan

    model = ds_model.from_config("tiny")
    plan = default_tp_plan(model)
    assert plan["model.layers.0.mlp.gate_proj"] == "colwise"  # the dense layer
    assert plan["model.layers.1.mlp.shared_experts.down_proj"] == "rowwise"
    assert not [name for name in plan if ".mlp.experts." in name]
