"""The public API of ds_batching is its __all__, and its version matches the installed metadata."""

import importlib.metadata

import ds_batching


def test_all_names_resolve():
    missing = [name for name in ds_batching.__all__ if not hasattr(ds_batching, name)]
    assert not missing, f"__all__ names that do not exist: {missing}"


def test_version_matches_metadata():
    assert ds_batching.__version__ == importlib.metadata.version("ds-batching")
