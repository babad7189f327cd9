"""Smoke test run in a fresh venv that holds only the ds-optim wheel and its dependencies."""

import importlib.metadata

import ds_optim
import torch

requires = importlib.metadata.requires("ds-optim") or []
assert all(not r.startswith("ds-") for r in requires), f"ds-optim is a leaf, declares {requires}"
assert "site-packages" in ds_optim.__file__

model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
opt = ds_optim.GroupedAdamW.from_model(model, "sensitivity", lr=1e-2)
model(torch.randn(3, 4)).pow(2).mean().backward()
opt.step()
comp = ds_optim.Int4GradientCompressor()
g = torch.randn(1000)
assert isinstance(comp, ds_optim.GradientCompressor)
assert (comp.decompress(comp.compress(g, key=0)) - g).abs().max() < g.abs().max() / 7
print("ds-optim wheel works alone:", ds_optim.__version__)
