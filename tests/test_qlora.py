"""QLoRA across packages: ds-lora adapters over ds-quant's real INT4 layers, which meet
only through ds_lora's protocols (neither package imports the other)."""

import warnings

import pytest
import torch
from torch import nn

ds_quant = pytest.importorskip("ds_quant")
import ds_lora  # noqa: E402
from ds_lora import LoraConfig, LoraLinear, QuantizedMergeWarning  # noqa: E402


class Net(nn.Module):
    def __init__(self, dim=64, hidden=128, vocab=16):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x):
        x = x + self.v_proj(torch.tanh(self.q_proj(x)))
        x = x + self.down_proj(torch.relu(self.up_proj(x)))
        return self.lm_head(x)


def _quantized_net():
    torch.manual_seed(0)
    net = Net()
    ds_quant.quantize_(
        net,
        ds_quant.Int4WeightOnlyConfig(group_size=32),
        filter_fn=lambda m, name: isinstance(m, nn.Linear) and name != "lm_head",
    )
    return net


def test_ds_quant_int4_satisfies_ds_lora_protocols():
    net = _quantized_net()
    layer = net.q_proj
    assert isinstance(layer, ds_quant.Int4WeightOnlyLinear)
    assert isinstance(layer, ds_lora.LinearLike)
    assert isinstance(layer, ds_lora.QuantizedLinearLike)


def test_qlora_over_ds_quant_int4_trains_and_merges_back():
    net = _quantized_net()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, 64, generator=gen)
    target = torch.randn(32, 4, 16, generator=gen)
    before = net(x).detach()
    ds_lora.inject(
        net, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    )
    assert isinstance(net.q_proj, LoraLinear)
    assert isinstance(net.q_proj.base_layer, ds_quant.Int4WeightOnlyLinear)
    assert torch.equal(net(x), before)
    stored = net.q_proj.base_layer.weight.clone()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert torch.equal(net.q_proj.base_layer.weight, stored)  # the INT4 base never trains

    with torch.no_grad():
        adapted_loss = nn.functional.mse_loss(net(x), target).item()
        expected = net.q_proj.base_layer.dequantize(torch.float32) + net.q_proj.delta_weight(
            "default"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = ds_lora.merge_and_unload(net)
    assert any(issubclass(w.category, QuantizedMergeWarning) for w in caught)
    assert isinstance(merged.q_proj, ds_quant.Int4WeightOnlyLinear)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    # The merged INT4 weight is base + delta up to INT4 rounding (half a step per group).
    step = merged.q_proj.weight_scale.max().item()
    got = merged.q_proj.dequantize(torch.float32)
    assert (got - expected).abs().max() <= step / 2 + 1e-5
    with torch.no_grad():
        merged_loss = nn.functional.mse_loss(merged(x), target).item()
    assert merged_loss < losses[0] * 0.9
    assert abs(merged_loss - adapted_loss) < 0.1 * adapted_loss
