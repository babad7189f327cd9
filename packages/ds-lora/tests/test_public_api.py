"""The public API of ds_lora is its __all__, and its version matches the installed metadata."""

import importlib.metadata

import ds_lora


def test_all_names_resolve():
    missing = [name for name in ds_lora.__all__ if not hasattr(ds_lora, name)]
    assert not missing, f"__all__ names that do not exist: {missing}"


def test_version_matches_metadata():
    assert ds_lora.__version__ == importlib.metadata.version("ds-lora")
