"""safetensors round-trip: recipe in metadata, no re-quantization, bit-exact, atomic."""

import json
import os

import pytest
import torch
from ds_quant import (
    Fp8BlockConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    QuantizedLinear,
    calibrate,
    load_quantized,
    quantize_,
    read_recipe,
    save_quantized,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

CONFIGS = [
    Int8WeightOnlyConfig(),
    Int8DynamicActivationInt8WeightConfig(),
    Int4WeightOnlyConfig(group_size=32),
    Int4WeightOnlyConfig(group_size=64, symmetric=True),
    Fp8BlockConfig(block=(16, 16)),
]


class Net(nn.Module):
    def __init__(self, dim=48, hidden=80, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(32, dim, dtype=dtype)
        self.fc1 = nn.Linear(dim, hidden, dtype=dtype)
        self.norm = nn.LayerNorm(hidden, dtype=dtype)
        self.fc2 = nn.Linear(hidden, dim, bias=False, dtype=dtype)

    def forward(self, ids):
        return self.fc2(self.norm(torch.relu(self.fc1(self.embed(ids)))))


@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    config=st.sampled_from(CONFIGS),
    dim=st.sampled_from([16, 48, 50]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 100),
)
def test_round_trip_is_bit_exact_and_loads_into_a_meta_skeleton(tmp_path, config, dim, dtype, seed):
    torch.manual_seed(seed)
    model = quantize_(Net(dim, dtype=dtype), config)
    path = tmp_path / f"q{seed}.safetensors"
    save_quantized(model, path)
    with torch.device("meta"):
        skeleton = Net(dim, dtype=dtype)
    loaded = load_quantized(skeleton, path)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert original[key].dtype == restored[key].dtype, key
        assert torch.equal(original[key].view(torch.uint8), restored[key].view(torch.uint8)), key
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert type(loaded.fc1) is type(model.fc1) and loaded.fc1.config == config
    assert loaded.fc1.dequantize().dtype == dtype


def test_file_holds_no_float_weights_of_quantized_layers_and_the_recipe(tmp_path):
    model = quantize_(Net(), Int4WeightOnlyConfig(group_size=16))
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, metadata={"source": "unit-test"})
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        assert f.get_tensor("fc1.weight").dtype == torch.uint8
    assert {"fc1.weight", "fc1.weight_scale", "fc1.weight_zero", "fc2.weight"} <= keys
    assert meta["source"] == "unit-test" and meta["ds_quant.format"] == "1"
    recipe = json.loads(meta["ds_quant.recipe"])
    assert recipe == read_recipe(path)
    assert recipe["fc1"]["config"] == {
        "name": "int4_weight_only",
        "group_size": 16,
        "symmetric": False,
    }
    assert recipe["fc2"]["bias"] is False and recipe["fc1"]["dtype"] == "float32"


def test_calibrated_model_round_trips_with_input_scales(tmp_path):
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.embed.weight[:, :3] *= 30
    calibrate(model, Int4WeightOnlyConfig(group_size=16), [torch.randint(0, 32, (4, 8))])
    assert model.fc1.input_scale is not None
    save_quantized(model, tmp_path / "c.safetensors")
    with torch.device("meta"):
        skeleton = Net()
    loaded = load_quantized(skeleton, tmp_path / "c.safetensors")
    ids = torch.randint(0, 32, (3, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_write_is_atomic_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_quantized(quantize_(Net(), Int8WeightOnlyConfig()), path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ds_quant.serialization.save_file", boom)
    with pytest.raises(OSError, match=r"disk full"):
        save_quantized(quantize_(Net(), Int4WeightOnlyConfig(group_size=16)), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_bad_checkpoints_and_models(tmp_path):
    with pytest.raises(ValueError, match=r"no quantized layers"):
        save_quantized(Net(), tmp_path / "x.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match=r"not a ds-quant checkpoint"):
        load_quantized(Net(), plain)
    path = tmp_path / "m.safetensors"
    save_quantized(quantize_(Net(dim=48), Int8WeightOnlyConfig()), path)
    with pytest.raises(ValueError, match=r"layer 'fc1': checkpoint shape"):
        load_quantized(Net(dim=16), path)
    with pytest.raises(KeyError, match=r"'fc1', which the model does not have"):
        load_quantized(nn.Sequential(nn.Linear(2, 2)), path)


def test_tied_weights_are_refused_with_a_clear_error(tmp_path):
    model = quantize_(Net(), Int8WeightOnlyConfig())
    model.extra = nn.Linear(80, 48, bias=False)
    model.extra.weight = nn.Parameter(torch.zeros(48, 80))
    model.extra2 = model.extra
    model.norm2 = nn.LayerNorm(80)
    model.norm2.weight = model.norm.weight
    with pytest.raises(ValueError, match=r"shares memory"):
        save_quantized(model, tmp_path / "t.safetensors")
    assert all(isinstance(m, QuantizedLinear) for m in (model.fc1, model.fc2))


def test_distinct_views_of_one_buffer_are_saved_as_their_own_tensors(tmp_path):
    # Layers whose int8 weights were re-laid as views of one stacked buffer (as a
    # decoder stacks MoE experts) save and load like separately allocated ones.
    model = quantize_(Net(dim=48), Int8WeightOnlyConfig())
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    stacked = torch.cat((model.fc1.weight.flatten(), model.fc2.weight.flatten()))
    model.fc1.weight = stacked[: model.fc1.weight.numel()].view_as(model.fc1.weight)
    model.fc2.weight = stacked[model.fc1.weight.numel() :].view_as(model.fc2.weight)
    save_quantized(model, tmp_path / "v.safetensors")
    loaded = load_quantized(Net(dim=48), tmp_path / "v.safetensors")
    for key, value in expected.items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("tie", ["transpose", "slice"])
def test_weights_tied_through_a_view_are_refused(tmp_path, tie):
    model = quantize_(Net(), Int8WeightOnlyConfig())
    model.a = nn.Linear(80, 48, bias=False)
    model.b = nn.Linear(48, 80, bias=False)
    if tie == "transpose":
        model.b.weight = nn.Parameter(model.a.weight.t())
    else:
        model.b = nn.Linear(80, 24, bias=False)
        model.b.weight = nn.Parameter(model.a.weight[:24])
    with pytest.raises(ValueError, match=r"shares memory"):
        save_quantized(model, tmp_path / "t.safetensors")


def _with_recipe(src, dst, edit):
    """Copy checkpoint ``src`` to ``dst`` with its recipe changed by ``edit(recipe)``."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    recipe = json.loads(meta["ds_quant.recipe"])
    edit(recipe)
    save_file(tensors, str(dst), metadata={**meta, "ds_quant.recipe": json.dumps(recipe)})
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["fc1"].pop("in_features"), r"recipe entry 'fc1' has no 'in_features' field"),
        (lambda r: r["fc1"].update(dtype="float64"), r"recipe entry 'fc1': dtype='float64'"),
        (lambda r: r["fc1"].update(bias="yes"), r"recipe entry 'fc1': bias='yes', expected true"),
        (
            lambda r: r["fc2"]["config"].update(name="int3"),
            r"recipe entry 'fc2': config .*unknown quantization config name 'int3'",
        ),
        (lambda r: r.update(fc1=[1]), r"recipe entry 'fc1' must be an object"),
    ],
)
def test_broken_recipe_entries_name_file_and_entry(tmp_path, edit, message):
    path = tmp_path / "m.safetensors"
    save_quantized(quantize_(Net(), Int8WeightOnlyConfig()), path)
    bad = _with_recipe(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(ValueError, match=rf"{bad}: {message}"):
        load_quantized(Net(), bad)


def test_quantized_weight_of_the_wrong_dtype_is_refused_at_load(tmp_path):
    path = tmp_path / "m.safetensors"
    save_quantized(quantize_(Net(), Int8WeightOnlyConfig()), path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.startswith("fc1.") and tensors[k].dtype == torch.int8)
    tensors[key] = tensors[key].float()  # an attacker's or a converter's float32 "INT8"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(
        ValueError,
        match=rf"tensor '{key}' of quantized layer 'fc1' is stored "
        r"as torch.float32, but .* holds torch.int8",
    ):
        load_quantized(Net(), path)


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_quantized(quantize_(Net(), Int8WeightOnlyConfig()), path)
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ValueError, match=rf"{path}: not a readable safetensors file"):
        load_quantized(Net(), path)
