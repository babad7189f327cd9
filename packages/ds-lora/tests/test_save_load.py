"""PEFT on-disk format written and read by ds-lora; clear errors on files that do not fit;
bad targets and names."""

import json

import ds_lora
import pytest
import torch
from ds_lora import AdapterShapeError, LoraConfig, TargetModulesError
from ds_lora_testing import TinyModel, randomize_adapters
from safetensors.torch import load_file, save_file


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyModel(dim=16, hidden=12, layers=2)


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=3, lora_alpha=6, lora_dropout=0.0),
        LoraConfig(r=2, lora_dropout=0.0, use_dora=True, target_modules="all-linear"),
        LoraConfig(r=2, lora_dropout=0.0, bias="all", modules_to_save=["lm_head"]),
        LoraConfig(
            r=4,
            lora_dropout=0.0,
            bias="lora_only",
            use_rslora=True,
            target_modules=r".*\.(up|down)_proj",
        ),
    ],
    ids=["plain", "dora", "bias-all+modules_to_save", "lora_only+rslora+regex"],
)
def test_round_trip_same_outputs_and_peft_keys(tmp_path, config):
    x = torch.randn(2, 3, 16)
    model = _model()
    ds_lora.inject(model, config)
    randomize_adapters(model, seed=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name:  # trained biases, module copies
                param.add_(0.1)
    expected = model(x)
    ds_lora.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in keys)
    assert "base_model.model.layers.0.up_proj.lora_A.weight" in keys or "q_proj" in str(
        config.target_modules
    )
    assert not any(".default." in k for k in keys)
    if config.use_dora:
        assert "base_model.model.layers.0.q_proj.lora_magnitude_vector" in keys
    if config.modules_to_save:
        assert "base_model.model.lm_head.weight" in keys
    if config.bias == "all":
        assert "base_model.model.layers.0.norm.bias" in keys
    fresh = _model()
    ds_lora.load_adapter(fresh, tmp_path, is_trainable=True)
    torch.testing.assert_close(fresh(x), expected, atol=1e-6, rtol=0)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == config.r


def test_loaded_adapter_is_frozen_by_default_and_second_name_works(tmp_path):
    model = _model()
    ds_lora.inject(model, LoraConfig(r=2, lora_dropout=0.0))
    randomize_adapters(model, seed=2)
    ds_lora.save_adapter(model, tmp_path)
    fresh = _model()
    ds_lora.load_adapter(fresh, tmp_path, adapter_name="first")
    ds_lora.load_adapter(fresh, tmp_path, adapter_name="second")
    assert ds_lora.adapter_names(fresh) == ["first", "second"]
    assert not any(p.requires_grad for p in fresh.parameters())
    x = torch.randn(1, 2, 16)
    ds_lora.set_adapter(fresh, "second")
    torch.testing.assert_close(fresh(x), model(x), atol=1e-6, rtol=0)


def test_no_temporary_files_left_and_overwrite_is_whole(tmp_path):
    model = _model()
    ds_lora.inject(model, LoraConfig(r=2))
    ds_lora.save_adapter(model, tmp_path)
    ds_lora.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    model = _model()
    ds_lora.inject(model, LoraConfig(r=2))
    ds_lora.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    key = "base_model.model.layers.1.v_proj.lora_B.weight"
    state[key] = torch.zeros(16, 5)
    save_file(state, path)
    fresh = _model()
    with pytest.raises(AdapterShapeError) as info:
        ds_lora.load_adapter(fresh, tmp_path)
    message = str(info.value)
    assert key in message and "(16, 5)" in message and "(16, 2)" in message
    # Nothing half-loaded is left behind.
    assert ds_lora.adapter_names(fresh) == []
    assert not any("lora_" in n for n, _ in fresh.named_parameters())


def test_unexpected_and_missing_keys_are_listed(tmp_path):
    model = _model()
    ds_lora.inject(model, LoraConfig(r=2))
    ds_lora.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    state.pop("base_model.model.layers.0.q_proj.lora_A.weight")
    state["base_model.model.layers.7.q_proj.lora_A.weight"] = torch.zeros(2, 16)
    save_file(state, path)
    with pytest.raises(AdapterShapeError) as info:
        ds_lora.load_adapter(_model(), tmp_path)
    assert "layers.7.q_proj.lora_A.weight" in str(info.value)
    assert "layers.0.q_proj.lora_A.weight" in str(info.value)


def test_missing_files_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        ds_lora.load_adapter(_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ds_lora.LoraConfigError, match="not valid JSON"):
        ds_lora.load_adapter(_model(), tmp_path)


def test_target_matching_nothing_lists_the_module_names():
    with pytest.raises(TargetModulesError) as info:
        ds_lora.inject(_model(), LoraConfig(target_modules=["query", "value"]))
    message = str(info.value)
    for name in ("q_proj", "v_proj", "up_proj", "down_proj", "lm_head", "layers.0.q_proj"):
        assert name in message
    with pytest.raises(TargetModulesError, match="LayerNorm"):
        ds_lora.inject(_model(), LoraConfig(target_modules=["norm"]))


def test_suffix_rule_and_regex_and_all_linear():
    model = _model()
    with pytest.raises(TargetModulesError):
        ds_lora.inject(model, LoraConfig(target_modules=["proj"]))  # suffix of a name part
    ds_lora.inject(model, LoraConfig(target_modules="all-linear"), "all")
    wrapped = {n for n, m in model.named_modules() if isinstance(m, ds_lora.LoraLinear)}
    assert "lm_head" not in wrapped and len(wrapped) == 8
    ds_lora.inject(model, LoraConfig(target_modules=r"layers\.0\.q_proj"), "re")
    carriers = {
        n
        for n, m in model.named_modules()
        if isinstance(m, ds_lora.LoraLinear) and "re" in m.lora_A
    }
    assert carriers == {"layers.0.q_proj"}


def test_unknown_adapter_and_bad_names():
    model = _model()
    ds_lora.inject(model, LoraConfig(r=2), "a")
    with pytest.raises(ds_lora.AdapterNotFoundError, match=r"'b'.*\['a'\]") as info:
        ds_lora.set_adapter(model, "b")
    assert isinstance(info.value, KeyError)
    with pytest.raises(ds_lora.AdapterStateError, match="already exists"):
        ds_lora.inject(model, LoraConfig(r=2), "a")
    with pytest.raises(ValueError, match="adapter_name"):
        ds_lora.inject(model, LoraConfig(r=2), "a.b")
    with pytest.raises(ds_lora.AdapterNotFoundError):
        ds_lora.save_adapter(model, "/nonexistent-never-written", "b")


def test_save_pretrained_uses_peft_directory_layout(tmp_path):
    lora = ds_lora.get_peft_model(_model(), LoraConfig(r=2, lora_dropout=0.0))
    lora.add_adapter("extra", LoraConfig(r=3, lora_dropout=0.0, target_modules=["up_proj"]))
    randomize_adapters(lora, seed=4)
    lora.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "extra" / "adapter_model.safetensors").is_file()
    fresh = ds_lora.LoraModel.from_pretrained(_model(), tmp_path)
    fresh.load_adapter(tmp_path / "extra", "extra")
    x = torch.randn(1, 2, 16)
    for name in ("default", "extra"):
        lora.set_adapter(name)
        fresh.set_adapter(name)
        torch.testing.assert_close(fresh(x), lora(x), atol=1e-6, rtol=0)
