"""LoRA over quantized bases (QLoRA), through the protocol only, with an INT4 test double."""

import copy

import ds_lora
import pytest
import torch
from ds_lora import LoraConfig, LoraLinear, QuantizedMergeWarning
from ds_lora_testing import (
    Int4Linear,
    Int4LinearFromFloat,
    Int4LinearNoGrad,
    Int4LinearNoHook,
    TinyModel,
    quantize_model,
    randomize_adapters,
)
from torch import nn


def test_double_satisfies_the_protocols():
    layer = Int4Linear(torch.randn(6, 8), None)
    assert isinstance(layer, ds_lora.LinearLike)
    assert isinstance(layer, ds_lora.QuantizedLinearLike)
    assert isinstance(layer, ds_lora.Requantizable)
    assert not isinstance(Int4LinearNoHook(torch.randn(6, 8), None), ds_lora.Requantizable)


def _toy_task(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, 16, generator=gen)
    target = torch.randn(64, 4, 11, generator=gen) * 0.5
    return x, target


def test_qlora_trains_and_merges_back():
    torch.manual_seed(0)
    model = quantize_model(TinyModel(dim=16, hidden=24, layers=2, vocab=11))
    x, target = _toy_task()
    before = model(x).detach()
    ds_lora.inject(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    )
    assert isinstance(model.layers[0].q_proj.base_layer, Int4Linear)
    assert torch.equal(model(x), before)  # un-trained: the quantized base alone
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(40):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    # The quantized storage never changed while training.
    codes = model.layers[0].q_proj.base_layer.codes.clone()
    assert torch.equal(model.layers[0].q_proj.base_layer.codes, codes)

    with torch.no_grad():
        adapted = model(x)
        layer = model.layers[0].q_proj
        expected_weight = layer.base_layer.dequantize() + layer.delta_weight("default")
    with pytest.warns(QuantizedMergeWarning, match="re-quantized in place"):
        merged = ds_lora.merge_and_unload(model)
    assert isinstance(merged.layers[0].q_proj, Int4Linear)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    # The merged weight is the re-quantization of base + delta: within INT4 rounding.
    new_weight = merged.layers[0].q_proj.dequantize()
    step = merged.layers[0].q_proj.scale.max().item()
    assert (new_weight - expected_weight).abs().max() <= step / 2 + 1e-6
    with torch.no_grad():
        merged_out = merged(x)
    loss_adapted = nn.functional.mse_loss(adapted, target).item()
    loss_merged = nn.functional.mse_loss(merged_out, target).item()
    assert loss_merged < losses[0] * 0.8
    assert abs(loss_merged - loss_adapted) < 0.2 * loss_adapted


def test_dora_over_quantized_base_uses_dequantized_weight():
    torch.manual_seed(0)
    base = Int4Linear(torch.randn(10, 16), torch.randn(10))
    layer = LoraLinear(base)
    layer.add_adapter("d", LoraConfig(r=3, lora_alpha=6, lora_dropout=0.0, use_dora=True))
    layer.active_adapter = "d"
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), base(x), atol=1e-5, rtol=1e-5)
    randomize_adapters(layer, seed=4)
    w = base.dequantize()
    updated = w + 2.0 * layer.lora_B["d"].weight @ layer.lora_A["d"].weight
    m = layer.lora_magnitude_vector["d"].weight
    expected = x @ ((m / updated.norm(dim=1)).unsqueeze(1) * updated).T + base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_merge_through_from_float_fallback_replaces_the_layer():
    torch.manual_seed(0)
    model = quantize_model(TinyModel(dim=16, hidden=16), cls=Int4LinearFromFloat)
    ds_lora.inject(model, LoraConfig(r=2, lora_dropout=0.0, target_modules=["q_proj"]))
    randomize_adapters(model, seed=1)
    layer = model.layers[0].q_proj
    old_base = layer.base_layer
    expected = old_base.dequantize() + layer.delta_weight("default")
    with pytest.warns(QuantizedMergeWarning, match="from_float"):
        ds_lora.merge_adapter(model)
    assert layer.base_layer is not old_base
    assert isinstance(layer.base_layer, Int4LinearFromFloat)
    assert torch.equal(layer.base_layer.bias, old_base.bias)
    step = layer.base_layer.scale.max().item()
    assert (layer.base_layer.dequantize() - expected).abs().max() <= step / 2 + 1e-6


def test_merge_without_a_hook_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    model = quantize_model(TinyModel(dim=16, hidden=16), cls=Int4LinearNoHook)
    ds_lora.inject(model, LoraConfig(r=2, lora_dropout=0.0, target_modules=["q_proj"]))
    randomize_adapters(model, seed=1)
    x = torch.randn(2, 3, 16)
    before = model(x)
    with pytest.raises(TypeError, match="requantize"):
        ds_lora.merge_adapter(model)
    assert model.layers[0].q_proj.merged_adapters == []
    torch.testing.assert_close(model(x), before)


def test_mixed_batch_over_quantized_base():
    torch.manual_seed(0)
    model = quantize_model(TinyModel(dim=16, hidden=16))
    ds_lora.inject(model, LoraConfig(r=2, lora_dropout=0.0, target_modules="all-linear"), "a")
    ds_lora.inject(model, LoraConfig(r=4, lora_dropout=0.0, use_dora=True), "b")
    randomize_adapters(model, seed=2)
    model.eval()
    x = torch.randn(3, 2, 16)
    rows = ["b", None, "a"]
    with ds_lora.adapter_batch(model, rows):
        mixed = model(x)
    ds_lora.set_adapter(model, "b")
    torch.testing.assert_close(mixed[0:1], model(x[0:1]), atol=2e-5, rtol=1e-5)
    ds_lora.set_adapter(model, "a")
    torch.testing.assert_close(mixed[2:3], model(x[2:3]), atol=2e-5, rtol=1e-5)
    with ds_lora.disable_adapters(model):
        torch.testing.assert_close(mixed[1:2], model(x[1:2]), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_gradients_through_an_opaque_quantized_kernel_match_float(bias):
    """QLoRA gradients reach earlier adapters even when the quantized forward has no
    derivative; they equal those of a float model holding the dequantized weights."""
    torch.manual_seed(0)
    float_model = TinyModel(dim=16, hidden=16)
    quant_model = quantize_model(
        copy.deepcopy(float_model), cls=Int4LinearNoGrad, skip=("lm_head",)
    )
    with torch.no_grad():  # make the float twin hold exactly the dequantized weights
        for name, module in quant_model.named_modules():
            if isinstance(module, Int4LinearNoGrad):
                float_model.get_submodule(name).weight.copy_(module.dequantize())
    config = LoraConfig(r=2, lora_dropout=0.0, target_modules="all-linear", bias=bias)
    for model in (float_model, quant_model):
        ds_lora.inject(model, config)
        randomize_adapters(model, seed=3)
    x = torch.randn(2, 3, 16)
    grads = []
    for model in (float_model, quant_model):
        model(x).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert any("layers.0.q_proj.lora_A" in n for n in grads[1])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4)
