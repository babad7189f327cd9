"""Smoke test run in a fresh venv that holds only the ds-quant wheel (and its deps):
quantize a small model three ways, save it, load it into a meta skeleton, compare."""

import importlib.metadata
import platform
import shutil
import tempfile
from pathlib import Path

import ds_quant
import torch
from torch import nn

requires = importlib.metadata.requires("ds-quant") or []
assert not [r for r in requires if r.startswith("ds-")], f"ds-quant is a leaf, requires {requires}"
assert "site-packages" in ds_quant.__file__


def make() -> nn.Module:
    return nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 32))


torch.manual_seed(0)
x = torch.randn(4, 96)
for config in (
    ds_quant.Int8WeightOnlyConfig(),
    ds_quant.Int4WeightOnlyConfig(group_size=32),
    ds_quant.Fp8BlockConfig(),
):
    model = make()
    reference = model(x)
    ds_quant.quantize_(model, config)
    err = (model(x) - reference).pow(2).mean() / reference.pow(2).mean()
    assert err < 0.05, (config, float(err))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        ds_quant.save_quantized(model, path)
        with torch.device("meta"):
            skeleton = make()
        loaded = ds_quant.load_quantized(skeleton, path)
        assert torch.equal(loaded(x), model(x))
if platform.machine() == "x86_64" and shutil.which("c++"):
    # The CPU decode kernel builds from the sources the wheel ships.
    assert ds_quant.kernels.cpu_gemv_available(), "the CPU decode kernel did not build"
print("ds-quant wheel works alone:", ds_quant.__version__)
