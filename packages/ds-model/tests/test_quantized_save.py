"""A model quantized by ds-quant saves with save_pretrained and loads back with
from_pretrained as it was: the same stored tensors (nothing requantized), the same
greedy output, the recipe recorded in config.json; bad recipe metadata is refused by
field name."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import ds_model
import ds_quant
import pytest
import torch
from ds_model import ModelConfig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()
LLAMA = S.LLAMA_GQA
CONFIGS = {
    "int8": ds_quant.Int8WeightOnlyConfig(),
    "int4": ds_quant.Int4WeightOnlyConfig(group_size=32),
    "w8a8": ds_quant.Int8DynamicActivationInt8WeightConfig(),
    "fp8": ds_quant.Fp8BlockConfig(block=(16, 16)),
}
PROMPT = torch.tensor([[3, 17, 42, 5, 9]])


def build(kind: str) -> ds_model.DeepSeekForCausalLM:
    config = ModelConfig.from_preset("tiny") if kind == "v3" else ModelConfig.from_dict(LLAMA)
    return ds_model.from_config(config, seed=0)


def greedy(model) -> list[int]:
    return model.generate(PROMPT, max_new_tokens=12)


def stored(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["llama", "v3"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_quantized_model_loads_back_exactly(tmp_path, kind, method):
    model = ds_quant.quantize_(build(kind), CONFIGS[method])
    before = greedy(model)
    model.save_pretrained(tmp_path)
    loaded = ds_model.from_pretrained(tmp_path)
    # Every stored tensor comes back bit for bit, in its stored dtype (no float detour).
    saved, back = stored(model), stored(loaded)
    assert saved.keys() == back.keys()
    for key, tensor in saved.items():
        assert back[key].dtype == tensor.dtype, key
        assert torch.equal(back[key], tensor), key
    quantized = {n for n, m in loaded.named_modules() if isinstance(m, ds_quant.QuantizedLinear)}
    assert quantized == {n for n, m in model.named_modules() if hasattr(m, "dequantize")}
    if kind == "v3":  # the routed experts are quantized too
        assert "model.layers.1.mlp.experts.7.down_proj" in quantized
    assert greedy(loaded) == before
    block = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert block["quant_method"] == "ds_quant"
    assert block["method"] == CONFIGS[method].name
    assert block["config"] == CONFIGS[method].to_dict()
    assert block["bits"] == (4 if method == "int4" else 8)
    if method == "int4":
        assert block["group_size"] == 32


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    config=st.sampled_from(
        [
            *CONFIGS.values(),
            ds_quant.Int4WeightOnlyConfig(group_size=16, symmetric=True),
            ds_quant.Fp8BlockConfig(block=(32, 8)),
        ]
    ),
    hidden=st.sampled_from([24, 32, 48]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    tied=st.booleans(),
    seed=st.integers(0, 50),
)
def test_any_recipe_shape_and_dtype_round_trips_bit_exact(
    tmp_path_factory, config, hidden, dtype, tied, seed
):
    shape = {**LLAMA, "hidden_size": hidden, "intermediate_size": 2 * hidden}
    model_config = ModelConfig.from_dict({**shape, "tie_word_embeddings": tied})
    model = ds_model.from_config(model_config, seed=seed, dtype=dtype)
    ds_quant.quantize_(
        model, config, filter_fn=lambda m, n: isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    path = tmp_path_factory.mktemp("q")
    model.save_pretrained(path)
    loaded = ds_model.from_pretrained(path)
    assert loaded.dtype == dtype
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    with torch.no_grad():
        assert torch.equal(loaded(PROMPT).logits, model(PROMPT).logits)


def test_the_record_names_other_recipes_and_float_layers(tmp_path):
    # from_pretrained's INT4 recipe quantizes the head to INT8 and the model's router
    # is not a linear layer; a filter leaves some linear layers float.
    model = build("llama")
    ds_quant.quantize_(
        model,
        CONFIGS["int4"],
        filter_fn=lambda m, n: isinstance(m, torch.nn.Linear) and "o_proj" not in n,
    )
    ds_quant.quantize_(
        model,
        ds_quant.Int8WeightOnlyConfig(),
        filter_fn=lambda m, n: n.endswith("o_proj") and n.startswith("model.layers.0"),
    )
    before = greedy(model)
    ds_model.save_pretrained(model, tmp_path)
    block = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert block["method"] == "int4_weight_only"
    assert block["module_configs"] == {
        "model.layers.0.self_attn.o_proj": {"name": "int8_weight_only"}
    }
    assert block["modules_to_not_convert"] == ["model.layers.1.self_attn.o_proj"]
    loaded = ds_model.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, torch.nn.Linear)
    assert greedy(loaded) == before


def test_from_pretrained_quantization_then_save_round_trips_with_dtype(tmp_path):
    source = tmp_path / "float"
    build("v3").save_pretrained(source)
    model = ds_model.from_pretrained(source, quantization="int4")  # head: INT8
    before = greedy(model)
    model.save_pretrained(tmp_path / "q")
    # Asking for what it is saved as is allowed; the model is used as saved.
    same = ds_model.from_pretrained(tmp_path / "q", quantization="int4", dtype="float32")
    assert greedy(same) == before
    half = ds_model.from_pretrained(tmp_path / "q", dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert half.model.layers[0].self_attn.o_proj.weight.dtype == torch.uint8  # still packed
    assert half(PROMPT).logits.dtype == torch.bfloat16


def test_a_conflicting_quantization_request_is_refused(tmp_path):
    ds_quant.quantize_(build("v3"), CONFIGS["int8"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"quantization='int4' conflicts with .*int8_weight_only"):
        ds_model.from_pretrained(tmp_path, quantization="int4")
    with pytest.raises(ValueError, match="conflicts"):
        ds_model.from_pretrained(tmp_path, quantization=ds_quant.Int4WeightOnlyConfig())


def test_a_tied_float_head_stays_tied(tmp_path):
    model = ds_model.from_config(ModelConfig.from_dict({**LLAMA, "tie_word_embeddings": True}))
    ds_quant.quantize_(
        model,
        CONFIGS["int8"],
        filter_fn=lambda m, n: isinstance(m, torch.nn.Linear) and n != "lm_head",
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = greedy(model)
    model.save_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # saving left it tied
    loaded = ds_model.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert greedy(loaded) == before


def test_a_quantized_model_with_an_adapter_is_refused(tmp_path):
    import ds_lora

    model = ds_quant.quantize_(build("llama"), CONFIGS["int8"])
    ds_lora.inject(model, ds_lora.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ds_model.CheckpointError, match="merge the adapter"):
        model.save_pretrained(tmp_path)


# ---- bad metadata ------------------------------------------------------------------------


@pytest.fixture
def saved_int4(tmp_path):
    ds_quant.quantize_(build("llama"), CONFIGS["int4"]).save_pretrained(tmp_path)
    return tmp_path


def edit_block(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"format_version": "9"}, r"quantization_config\.format_version='9'"),
        ({"method": "int3"}, r"quantization_config\.method='int3'"),
        ({"bits": 8}, r"quantization_config\.bits=8"),
        ({"group_size": 64}, r"quantization_config\.group_size=64"),
        ({"config": {"name": "int4_weight_only", "group_size": 3}}, r"quantization_config\.config"),
        ({"config": "int4"}, r"quantization_config\.config='int4'"),
        ({"module_configs": []}, r"quantization_config\.module_configs=\[\]"),
        (
            {"module_configs": {"lm_head": {"name": "int8_weight_only"}}},
            r"module_configs\['lm_head'\]",
        ),
        (
            {"module_configs": {"nope": {"name": "int8_weight_only"}}},
            r"module_configs names 'nope'",
        ),
        ({"modules_to_not_convert": "lm_head"}, r"quantization_config\.modules_to_not_convert"),
        ({"modules_to_not_convert": ["lm_head"]}, r"modules_to_not_convert names 'lm_head'"),
    ],
)
def test_wrong_quantization_metadata_is_refused_naming_the_field(saved_int4, changes, field):
    edit_block(saved_int4, **changes)
    with pytest.raises(ds_model.ConfigError, match=field):
        ds_model.from_pretrained(saved_int4)


def test_a_record_that_disagrees_with_the_weights_file_is_refused(saved_int4):
    # config.json says group size 64 consistently; the file was written with 32.
    config = {"name": "int4_weight_only", "group_size": 64, "symmetric": False}
    edit_block(saved_int4, group_size=64, config=config)
    with pytest.raises(ds_model.ConfigError, match=r"stores it as .*'group_size': 32"):
        ds_model.from_pretrained(saved_int4)


def test_a_weights_file_without_the_recipe_or_with_float_weights_is_refused(saved_int4):
    file = saved_int4 / "model.safetensors"
    tensors = load_file(file)
    save_file(tensors, file, metadata={"format": "pt"})  # the recipe dropped
    with pytest.raises(ValueError, match="not a ds-quant checkpoint"):
        ds_model.from_pretrained(saved_int4)
    (saved_int4 / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing"):
        ds_model.from_pretrained(saved_int4)


# ---- ds-model quantize -------------------------------------------------------------------


def test_the_quantize_command_saves_what_from_pretrained_quantizes(tmp_path, capsys):
    from ds_model.cli import main

    build("v3").save_pretrained(tmp_path / "float")
    argv = ["quantize", str(tmp_path / "float"), str(tmp_path / "q"), "--method", "int4"]
    assert main([*argv, "--group-size", "32"]) == 0
    expected = ds_model.from_pretrained(
        tmp_path / "float", quantization=ds_quant.Int4WeightOnlyConfig(group_size=32)
    )
    loaded = ds_model.from_pretrained(tmp_path / "q")
    assert (
        json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"][
            "group_size"
        ]
        == 32
    )
    assert greedy(loaded) == greedy(expected)
    assert main([*argv, "--group-size", "3"]) == 2
    assert "group_size must be a power of two" in capsys.readouterr().err
    argv[-1] = "int8"
    assert main([*argv, "--group-size", "32"]) == 2
    assert "--group-size applies to --method int4" in capsys.readouterr().err
