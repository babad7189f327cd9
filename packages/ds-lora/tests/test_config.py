"""LoraConfig: validated on construction; PEFT's adapter_config.json in and out."""

import math

import pytest
from ds_lora import LoraConfig, LoraConfigError
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"r": 0}, ["r", "0"]),
        ({"r": -3}, ["r", "-3"]),
        ({"r": 2.5}, ["r", "2.5"]),
        ({"r": True}, ["r"]),
        ({"lora_alpha": 0}, ["lora_alpha"]),
        ({"lora_alpha": float("nan")}, ["lora_alpha"]),
        ({"lora_dropout": 1.0}, ["lora_dropout", "[0, 1)"]),
        ({"lora_dropout": -0.1}, ["lora_dropout"]),
        ({"bias": "some"}, ["bias", "'some'", "lora_only"]),
        ({"init": "pissa"}, ["init", "'pissa'", "gaussian"]),
        ({"use_dora": 1}, ["use_dora"]),
        ({"target_modules": []}, ["target_modules"]),
        ({"target_modules": ["q_proj", ""]}, ["target_modules"]),
        ({"target_modules": "q_proj("}, ["target_modules", "regex"]),
        ({"target_modules": 3}, ["target_modules"]),
        ({"modules_to_save": "lm_head"}, ["modules_to_save"]),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs, names):
    with pytest.raises(LoraConfigError) as info:
        LoraConfig(**kwargs)
    assert isinstance(info.value, ValueError)
    for name in names:
        assert name in str(info.value)


def test_scaling_plain_and_rslora():
    assert LoraConfig(r=16, lora_alpha=32).scaling == 2.0
    assert math.isclose(LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling, 8.0)


def test_config_is_immutable_and_lists_become_tuples():
    config = LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    assert config.target_modules == ("q_proj", "v_proj")
    assert config.modules_to_save == ("lm_head",)
    with pytest.raises(AttributeError):
        config.r = 4  # type: ignore[misc]


configs = st.builds(
    LoraConfig,
    r=st.integers(1, 64),
    lora_alpha=st.one_of(st.integers(1, 128), st.floats(0.5, 64)),
    target_modules=st.one_of(
        st.lists(
            st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj"]), min_size=1, unique=True
        ),
        st.just("all-linear"),
        st.just(r".*\.(q|v)_proj"),
    ),
    lora_dropout=st.sampled_from([0.0, 0.05, 0.1]),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    use_rslora=st.booleans(),
    use_dora=st.booleans(),
    modules_to_save=st.one_of(st.none(), st.just(["lm_head"])),
    init=st.sampled_from(["default", "gaussian"]),
)


@settings(max_examples=40)
@given(configs)
def test_peft_dict_round_trips(config):
    data = config.to_peft_dict()
    assert data["peft_type"] == "LORA"
    back = LoraConfig.from_peft_dict(data)
    assert back.r == config.r and back.lora_alpha == config.lora_alpha
    assert back.scaling == config.scaling
    assert set(back.target_modules) == set(config.target_modules) or (
        back.target_modules == config.target_modules
    )
    assert (back.bias, back.use_dora, back.use_rslora, back.init) == (
        config.bias,
        config.use_dora,
        config.use_rslora,
        config.init,
    )
    assert back.modules_to_save == config.modules_to_save


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fan_in_fan_out", True),
        ("rank_pattern", {"q_proj": 4}),
        ("layers_to_transform", [0]),
        ("lora_bias", True),
        ("init_lora_weights", "pissa"),
        ("peft_type", "IA3"),
        ("target_modules", None),
    ],
)
def test_peft_features_not_implemented_are_refused(field, value):
    data = LoraConfig().to_peft_dict()
    data[field] = value
    with pytest.raises(LoraConfigError, match=field):
        LoraConfig.from_peft_dict(data)
