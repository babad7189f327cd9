"""Hostile or broken checkpoint directories: every mistake is a ``ConfigError`` or
``CheckpointError`` that names the file, the field or entry, the value and what is
allowed; nothing loads silently wrong and nothing outside the directory is read."""

from __future__ import annotations

import dataclasses
import json
import warnings

import ds_model
import pytest
from ds_model import CheckpointError, ConfigError, ModelConfig
from ds_model.config import PRESETS
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file


@pytest.fixture
def tiny_dir(tmp_path):
    model = ds_model.from_config("tiny", seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _kind(field: dataclasses.Field) -> str:
    return str(field.type).removesuffix(" | None")


# The fields from_dict reads, by declared type (head_dim is dropped for MLA models);
# the nested objects rope_scaling and attention have tests of their own.
_FIELDS = {
    f.name: _kind(f)
    for f in dataclasses.fields(ModelConfig)
    if f.name not in ("extra", "rope_scaling", "attention")
}
_WRONG = {
    "int": st.one_of(
        st.text(max_size=4),
        st.booleans(),
        st.floats(allow_nan=False).filter(lambda x: not x.is_integer()),
        st.lists(st.integers(), max_size=2),
    ),
    "float": st.one_of(
        st.text(max_size=4),
        st.booleans(),
        st.lists(st.floats(), max_size=2),
        st.just(float("inf")),
    ),
    "bool": st.one_of(st.sampled_from(["no", "false", "yes", ""]), st.integers(), st.floats()),
    "str": st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=2), max_size=2)),
    "int | list[int]": st.one_of(
        st.text(min_size=1, max_size=4),
        st.booleans(),
        st.floats(allow_nan=False),
        st.just([]),
        st.lists(st.text(max_size=2), min_size=1, max_size=2),
        st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    ),
}


@settings(max_examples=150, deadline=None)
@given(
    base=st.sampled_from(["tiny", "light"]),
    field=st.sampled_from(sorted(_FIELDS)),
    data=st.data(),
)
def test_every_mistyped_config_field_is_a_config_error_naming_it(base, field, data):
    if field == "head_dim" and PRESETS[base]["model_type"] != "llama":
        field = "hidden_size"
    value = data.draw(_WRONG[_FIELDS[field]], label="value")
    raw = {**PRESETS[base], field: value}
    with pytest.raises(ConfigError, match=rf"\b{field}="):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("rope_theta", "x", "a finite number"),
        ("rms_norm_eps", "1e-6", "a finite number"),
        ("tie_word_embeddings", "no", "true or false"),
        ("eos_token_id", "two", "token id"),
    ],
)
def test_mistyped_config_json_names_file_field_value_and_allowed(tiny_dir, field, value, allowed):
    config = json.loads((tiny_dir / "config.json").read_text())
    config[field] = value
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        ds_model.from_pretrained(tiny_dir)
    message = str(info.value)
    assert str(tiny_dir / "config.json") in message
    assert f"{field}={value!r}" in message and allowed in message


def test_rope_scaling_fields_are_typed_too():
    raw = {**PRESETS["tiny"], "rope_scaling": {"type": "yarn", "factor": "40"}}
    with pytest.raises(ConfigError, match=r"rope_scaling\.factor='40'"):
        ModelConfig.from_dict(raw)
    with pytest.raises(ConfigError, match=r"rope_scaling=\['yarn'\]"):
        ModelConfig.from_dict({**PRESETS["tiny"], "rope_scaling": ["yarn"]})


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_invalid_json_names_the_file_and_the_place(tmp_path, name):
    model = ds_model.from_config("tiny", seed=0)
    ds_model.save_pretrained(model, tmp_path, max_shard_bytes=64 * 1024)
    text = (tmp_path / name).read_text()
    (tmp_path / name).write_text(text[: len(text) // 2])
    error = ConfigError if name == "config.json" else CheckpointError
    with pytest.raises(error, match=rf"{tmp_path / name}: invalid JSON at line \d+ column \d+"):
        ds_model.from_pretrained(tmp_path)


def test_truncated_safetensors_names_the_file(tiny_dir):
    weights = tiny_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{weights}: not a readable safetensors file"):
        ds_model.from_pretrained(tiny_dir)


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/etc/passwd", "a/../../x"])
def test_index_entries_that_leave_the_directory_are_refused(tmp_path, escape):
    ckpt = tmp_path / "ckpt"
    model = ds_model.from_config("tiny", seed=0)
    ds_model.save_pretrained(model, ckpt, max_shard_bytes=64 * 1024)
    # The attacker's file is a perfectly valid shard: it must still not be read.
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key, shard = next(iter(index["weight_map"].items()))
    (tmp_path / "outside.safetensors").write_bytes((ckpt / shard).read_bytes())
    index["weight_map"][key] = escape
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"weight_map\['{key}'\]='{escape}' points outside"):
        ds_model.from_pretrained(ckpt)


def test_shards_in_a_subdirectory_still_load(tmp_path):
    model = ds_model.from_config("tiny", seed=0)
    ds_model.save_pretrained(model, tmp_path, max_shard_bytes=64 * 1024)
    (tmp_path / "shards").mkdir()
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in set(index["weight_map"].values()):
        (tmp_path / shard).rename(tmp_path / "shards" / shard)
    index["weight_map"] = {k: f"shards/./{v}" for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    loaded = ds_model.from_pretrained(tmp_path)
    assert all((loaded.state_dict()[k] == v).all() for k, v in model.state_dict().items())


def test_untied_checkpoint_head_is_not_dropped_by_a_string_flag(tiny_dir):
    """``"tie_word_embeddings": "false"`` is truthy in Python; it must not tie the head
    and discard the checkpoint's ``lm_head``."""
    assert "lm_head.weight" in load_file(tiny_dir / "model.safetensors")
    config = json.loads((tiny_dir / "config.json").read_text())
    config["tie_word_embeddings"] = "false"
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError, match="tie_word_embeddings='false'"):
            ds_model.from_pretrained(tiny_dir)


def test_ds_model_cli_prints_one_line_and_debug_shows_the_error(tiny_dir, capsys):
    from ds_model.cli import main

    config = json.loads((tiny_dir / "config.json").read_text())
    config["num_hidden_layers"] = 2.5
    (tiny_dir / "config.json").write_text(json.dumps(config))
    assert main(["info", str(tiny_dir)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"ds-model: error: {tiny_dir / 'config.json'}: num_hidden_layers=2.5: expected an integer"
    )
    with pytest.raises(ConfigError, match=r"num_hidden_layers=2\.5"):
        main(["info", str(tiny_dir), "--debug"])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rms_norm_eps", 0, "rms_norm_eps=0 must be > 0"),
        ("rope_theta", -1.0, r"rope_theta=-1\.0 must be > 0"),
        ("first_k_dense_replace", -1, "first_k_dense_replace=-1 must be >= 0"),
        ("moe_layer_freq", 0, "moe_layer_freq=0 must be a positive integer"),
    ],
)
def test_out_of_range_config_values_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**PRESETS["tiny"], field: value})
