"""quantize_: the registry, filter_fn, and clear errors for bad input."""

import dataclasses

import pytest
import torch
from ds_quant import (
    AlreadyQuantizedError,
    Fp8BlockConfig,
    Int4WeightOnlyConfig,
    Int4WeightOnlyLinear,
    Int8WeightOnlyConfig,
    Int8WeightOnlyLinear,
    QuantConfig,
    config_from_dict,
    quantize_,
    register_quant_handler,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32))
    )


def test_quantizes_every_linear_in_place_and_returns_the_model():
    model = small_model()
    assert quantize_(model, Int8WeightOnlyConfig()) is model
    assert isinstance(model[0], Int8WeightOnlyLinear)
    assert isinstance(model[2][0], Int8WeightOnlyLinear)
    assert isinstance(model[2][1], nn.LayerNorm)


def test_filter_fn_receives_module_and_name():
    model = small_model()
    seen = []

    def only_inner(module, fqn):
        seen.append(fqn)
        return isinstance(module, nn.Linear) and fqn.startswith("2.")

    quantize_(model, Int4WeightOnlyConfig(group_size=32), only_inner)
    assert "0" in seen and "2.0" in seen
    assert isinstance(model[0], nn.Linear) and isinstance(model[2][0], Int4WeightOnlyLinear)


def test_configs_satisfy_protocol_are_frozen_and_round_trip():
    for config in (Int8WeightOnlyConfig(), Int4WeightOnlyConfig(64, True), Fp8BlockConfig()):
        assert isinstance(config, QuantConfig)
        assert config_from_dict(config.to_dict()) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        Int4WeightOnlyConfig().group_size = 64  # type: ignore[misc]


def test_unknown_config_is_a_type_error_naming_the_known_ones():
    @dataclasses.dataclass(frozen=True)
    class Int3Config:
        name = "int3"

    with pytest.raises(TypeError, match=r"unknown quantization config.*Int4WeightOnlyConfig"):
        quantize_(small_model(), Int3Config())
    with pytest.raises(TypeError, match=r"unknown quantization config"):
        quantize_(small_model(), "int4")


@settings(max_examples=20)
@given(group_size=st.integers(-300, 300).filter(lambda g: g < 2 or g & (g - 1)))
def test_group_size_not_a_power_of_two_is_rejected(group_size):
    with pytest.raises(ValueError, match=f"group_size must be a power of two.*got {group_size}"):
        Int4WeightOnlyConfig(group_size=group_size)


def test_other_bad_config_values():
    with pytest.raises(TypeError, match=r"group_size must be an int"):
        Int4WeightOnlyConfig(group_size=128.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"symmetric must be a bool"):
        Int4WeightOnlyConfig(symmetric="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"block must be two positive ints"):
        Fp8BlockConfig(block=(128, 0))
    with pytest.raises(KeyError, match=r"unknown quantization config name 'int3'"):
        config_from_dict({"name": "int3"})


def test_quantizing_an_already_quantized_layer_is_an_error():
    model = small_model()
    quantize_(model, Int8WeightOnlyConfig())
    select_all = lambda m, n: isinstance(m, nn.Linear | Int8WeightOnlyLinear)  # noqa: E731
    with pytest.raises(AlreadyQuantizedError, match=r"'0' is already quantized"):
        quantize_(model, Int4WeightOnlyConfig(), select_all)
    with pytest.raises(ValueError, match=r"already quantized"):
        quantize_(model[0], Int8WeightOnlyConfig(), lambda m, n: True)


def test_non_linear_target_is_a_type_error_and_nothing_is_replaced():
    model = small_model()
    with pytest.raises(TypeError, match=r"'2.1' of type LayerNorm.*only nn.Linear"):
        quantize_(model, Int8WeightOnlyConfig(), lambda m, n: n in ("0", "2.1"))
    assert isinstance(model[0], nn.Linear)  # validated before any swap
    with pytest.raises(TypeError, match=r"needs an nn.Linear"):
        Int8WeightOnlyLinear.from_float(nn.Conv1d(2, 2, 1), Int8WeightOnlyConfig())


def test_quantizing_a_bare_linear_returns_the_new_layer():
    linear = nn.Linear(64, 16)
    q = quantize_(linear, Int4WeightOnlyConfig(group_size=32))
    assert isinstance(q, Int4WeightOnlyLinear) and isinstance(linear, nn.Linear)


def test_register_a_custom_handler():
    @dataclasses.dataclass(frozen=True)
    class FakeQuantConfig:
        bits: int = 6
        name = "fake6"

    def handler(linear, config):
        return nn.Identity()

    register_quant_handler(FakeQuantConfig, handler)
    model = small_model()
    quantize_(model, FakeQuantConfig())
    assert isinstance(model[0], nn.Identity)
    with pytest.raises(TypeError, match=r"config_type must be a class"):
        register_quant_handler(FakeQuantConfig(), handler)  # type: ignore[arg-type]


def test_meta_linear_cannot_be_quantized():
    with torch.device("meta"):
        linear = nn.Linear(8, 8)
    with pytest.raises(ValueError, match=r"meta device"):
        quantize_(linear, Int8WeightOnlyConfig())
