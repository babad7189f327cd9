"""The public API of ds_serve is its __all__, and its version matches the installed metadata."""

import importlib.metadata

import ds_serve


def test_all_names_resolve():
    missing = [name for name in ds_serve.__all__ if not hasattr(ds_serve, name)]
    assert not missing, f"__all__ names that do not exist: {missing}"


def test_version_matches_metadata():
    assert ds_serve.__version__ == importlib.metadata.version("ds-serve")
