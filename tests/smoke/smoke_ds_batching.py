"""Smoke test run in a fresh venv that holds only the ds-batching wheel."""

import importlib.metadata
import importlib.util

import ds_batching

requires = importlib.metadata.requires("ds-batching") or []
assert not requires, f"ds-batching must have no dependencies, declares {requires}"
assert importlib.util.find_spec("torch") is None, "torch is installed next to ds-batching"
assert "ds_batching" in ds_batching.__file__
print("ds-batching wheel stands alone:", ds_batching.__version__)
