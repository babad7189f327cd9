"""Smoke test run in a fresh venv that holds the ds-serve wheel and its declared deps."""

import importlib.metadata
import re

import ds_serve
from ds_serve.cli import build_parser

# A requirement's name is everything before its version specifier or marker.
requires = {
    re.match(r"[A-Za-z0-9._-]+", r).group(0) for r in importlib.metadata.requires("ds-serve")
}
expected = {"ds-model", "ds-batching", "msgspec", "starlette", "uvicorn", "llguidance"}
assert expected <= requires, requires
assert "site-packages" in ds_serve.__file__
assert build_parser().parse_args([]).host == "127.0.0.1"
for name in ("int8", "int4", "w8a8", "fp8"):  # the names ds-model's from_pretrained takes
    assert build_parser().parse_args(["--quantization", name]).quantization == name
entry = [
    e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "ds-serve"
]
assert entry and entry[0].value == "ds_serve.cli:main", entry
print("ds-serve wheel stands alone:", ds_serve.__version__)
