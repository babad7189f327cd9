"""Smoke test run in a fresh venv that holds only the ds-lora wheel and its dependencies."""

import importlib.metadata
import tempfile

import ds_lora
import torch
from torch import nn

requires = sorted(
    r.split(">")[0].split("=")[0].split(";")[0].strip()
    for r in importlib.metadata.requires("ds-lora") or []
)
assert requires == ["safetensors", "torch"], f"ds-lora declares {requires}"

model = nn.Sequential()
model.add_module("q_proj", nn.Linear(8, 8))
model.add_module("v_proj", nn.Linear(8, 4))
x = torch.randn(3, 8)
base = model(x)
ds_lora.inject(model, ds_lora.LoraConfig(r=2, lora_dropout=0.0))
assert torch.equal(model(x), base)
with torch.no_grad():
    model.q_proj.lora_B["default"].weight.fill_(0.5)
adapted = model(x)
with tempfile.TemporaryDirectory() as tmp:
    ds_lora.save_adapter(model, tmp)
    fresh = nn.Sequential()
    fresh.add_module("q_proj", nn.Linear(8, 8))
    fresh.add_module("v_proj", nn.Linear(8, 4))
    fresh.load_state_dict(
        {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    )
    ds_lora.load_adapter(fresh, tmp)
    torch.testing.assert_close(fresh(x), adapted)
print("ds-lora wheel stands alone:", ds_lora.__version__)
