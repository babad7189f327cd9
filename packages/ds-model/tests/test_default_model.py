"""The rule that finds the built-in model when ds-model or ds-serve gets no model path."""

from __future__ import annotations

import pytest
from ds_model.default_model import DEFAULT_MODEL_DIR, DefaultModelNotFound, find_default_model


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv("DS_DEFAULT_MODEL", raising=False)


def test_found_from_a_nested_directory(tmp_path):
    model = tmp_path / DEFAULT_MODEL_DIR
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    assert find_default_model(nested) == model


def test_missing_model_names_the_path_it_looked_for(tmp_path):
    with pytest.raises(DefaultModelNotFound) as info:
        find_default_model(tmp_path)
    message = str(info.value)
    assert str(tmp_path / DEFAULT_MODEL_DIR) in message
    assert "config.json" in message


def test_a_directory_without_config_is_skipped(tmp_path):
    (tmp_path / DEFAULT_MODEL_DIR).mkdir(parents=True)
    with pytest.raises(DefaultModelNotFound):
        find_default_model(tmp_path)


def test_environment_override(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("DS_DEFAULT_MODEL", str(tmp_path))
    assert find_default_model("/") == tmp_path
    monkeypatch.setenv("DS_DEFAULT_MODEL", str(tmp_path / "nope"))
    with pytest.raises(DefaultModelNotFound, match="nope"):
        find_default_model("/")
