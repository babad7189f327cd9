"""Quantized layers against the float layer (SQNR) and their public semantics."""

import pytest
import torch
from ds_quant import (
    Fp8BlockConfig,
    Int4WeightOnlyConfig,
    Int4WeightOnlyLinear,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    QuantizedLinearProtocol,
    quantize_,
)
from ds_quant.kernels import cpu_gemv
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn


def sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.detach(), got.detach()
    return float(10 * torch.log10(ref.pow(2).mean() / (got - ref).pow(2).mean()))


def layer_sqnr(config, in_features=1024, out_features=512, seed=0) -> float:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    x = torch.randn(64, in_features)
    with torch.no_grad():
        ref = linear(x)
        q = quantize_(linear, config)
        return sqnr(ref, q(x))


def test_int8_weight_only_sqnr_at_least_35_db():
    assert layer_sqnr(Int8WeightOnlyConfig()) >= 35


def test_int8_dynamic_sqnr_at_least_30_db():
    assert layer_sqnr(Int8DynamicActivationInt8WeightConfig()) >= 30


def test_int4_g128_sqnr_at_least_20_db():
    assert layer_sqnr(Int4WeightOnlyConfig(group_size=128)) >= 20


def test_int4_symmetric_and_smaller_groups_also_pass():
    assert layer_sqnr(Int4WeightOnlyConfig(group_size=128, symmetric=True)) >= 18
    assert layer_sqnr(Int4WeightOnlyConfig(group_size=32)) > layer_sqnr(Int4WeightOnlyConfig())


CONFIGS = [
    Int8WeightOnlyConfig(),
    Int8DynamicActivationInt8WeightConfig(),
    Int4WeightOnlyConfig(group_size=32),
    Int4WeightOnlyConfig(group_size=128, symmetric=True),
    Fp8BlockConfig(block=(16, 32)),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_layer_satisfies_the_protocol_and_forward_matches_dequantize(config):
    torch.manual_seed(1)
    linear = nn.Linear(96, 48)
    q = quantize_(linear, config)
    assert isinstance(q, QuantizedLinearProtocol)
    assert (q.in_features, q.out_features) == (96, 48)
    w = q.dequantize()
    assert w.shape == (48, 96) and w.dtype == torch.float32
    assert not w.is_floating_point() or w.dtype != q.weight.dtype  # weight is the stored form
    x = torch.randn(2, 5, 96)
    y = q(x)
    assert y.shape == (2, 5, 48) and y.dtype == x.dtype
    if config.name == "fp8_block":
        torch.testing.assert_close(y, x @ w.T + linear.bias, rtol=1e-4, atol=1e-4)
    elif config.name in ("int8_weight_only", "int4_weight_only"):
        # CPU rows run ds-quant's kernel where it is built (activations rounded to int16
        # per row: test_cpu_gemv), else torch's packed ops, which take bfloat16
        # activations and return a bfloat16 result (test_cpu_kernels bounds each path's
        # rounding; INT4's bf16 scales add to the packed op's).
        kernel = cpu_gemv.available()
        exact = ((x if kernel else x.bfloat16().float()) @ w.T + linear.bias).detach()
        if config.name == "int8_weight_only":
            # The kernel: 1/32767 of a row's largest activation per element, summed.
            rtol, atol = (1e-3, 2e-4) if kernel else (2**-8, 1e-5)
            torch.testing.assert_close(y - linear.bias, exact - linear.bias, rtol=rtol, atol=atol)
        else:
            assert float((y.detach() - exact).abs().mean() / exact.abs().mean()) < 5e-3


@settings(max_examples=15)
@given(
    in_features=st.integers(1, 300),
    out_features=st.sampled_from([1, 16, 48]),
    group_size=st.sampled_from([32, 64, 128]),
)
def test_int4_in_features_not_a_multiple_of_group_size(in_features, out_features, group_size):
    torch.manual_seed(in_features)
    linear = nn.Linear(in_features, out_features)
    q = quantize_(linear, Int4WeightOnlyConfig(group_size=group_size))
    assert q.weight.shape == (out_features, -(-in_features // group_size) * group_size // 2)
    x = torch.randn(3, in_features)
    with torch.no_grad():
        ref = x @ q.dequantize().T + linear.bias
        # bfloat16 activations in the packed CPU kernel (test_cpu_kernels bounds them).
        assert float((q(x) - ref).abs().mean() / ref.abs().mean()) < 5e-3
        # The partial last group is quantized like any other: within half its step.
        step = q.weight_scale.repeat_interleave(group_size, dim=1)[:, :in_features]
        assert torch.all((q.dequantize() - linear.weight).abs() <= 0.5 * step * (1 + 1e-5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, 64).to(dtype)
    x = torch.randn(4, 256, dtype=dtype)
    ref = linear(x).float()
    for config in (Int8WeightOnlyConfig(), Int4WeightOnlyConfig()):
        q = quantize_(linear, config)
        y = q(x)
        assert y.dtype == dtype and q.dequantize().dtype == dtype
        assert sqnr(ref, y.float()) > 18


def test_weight_is_the_stored_quantized_tensor_and_bias_stays_float():
    q = quantize_(nn.Linear(64, 32), Int4WeightOnlyConfig(group_size=32))
    assert isinstance(q, Int4WeightOnlyLinear)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (32, 32)
    assert "weight" in dict(q.named_buffers()) and q.bias.dtype == torch.float32
    assert [n for n, _ in q.named_parameters()] == ["bias"]


def test_layer_without_bias():
    linear = nn.Linear(64, 32, bias=False)
    for config in CONFIGS:
        q = quantize_(linear, config)
        assert q.bias is None
        x = torch.randn(2, 64)
        assert q(x).shape == (2, 32)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_gradients_reach_the_input_and_bias_so_an_adapter_can_train(config):
    # A LoRA-style wrapper that only knows in_features / out_features / __call__
    # (ds-lora's LinearLike), trained on top of the frozen quantized layer.
    torch.manual_seed(0)
    base = quantize_(nn.Linear(64, 32), config)

    class Adapter(nn.Module):
        def __init__(self, base, rank=4):
            super().__init__()
            self.base = base
            self.a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
            self.b = nn.Parameter(torch.zeros(base.out_features, rank))

        def forward(self, x):
            return self.base(x) + x @ self.a.T @ self.b.T

    model = Adapter(base)
    x = torch.randn(2, 3, 64, requires_grad=True)
    model(x).square().sum().backward()
    grad_y = 2 * model(x).detach()
    expected = grad_y @ (base.dequantize() + model.b @ model.a).detach()
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-4)
    assert model.b.grad is not None and model.b.grad.abs().sum() > 0
    assert base.bias.grad is not None
    assert not any(t.requires_grad for t in base.buffers())


@settings(max_examples=20, deadline=None)
@given(
    config=st.sampled_from(
        [
            Int8WeightOnlyConfig(),
            Int8DynamicActivationInt8WeightConfig(),
            Int4WeightOnlyConfig(group_size=32),
            Fp8BlockConfig(block=(32, 32)),
        ]
    ),
    out_features=st.sampled_from([16, 48, 80]),
    in_features=st.sampled_from([32, 64, 96]),
)
def test_a_weight_stored_transposed_quantizes_like_its_row_major_copy(
    config, out_features, in_features
):
    """A weight laid out (in, out) in memory (ds-model's CPU decode layout) is the same
    matrix: its quantized layer equals the row-major weight's, buffers row-major."""
    torch.manual_seed(out_features + in_features)
    plain = nn.Linear(in_features, out_features)
    strided = nn.Linear(in_features, out_features)
    with torch.no_grad():
        strided.weight.data = plain.weight.t().contiguous().t()
        strided.bias.copy_(plain.bias)
    assert not strided.weight.is_contiguous()
    a, b = quantize_(plain, config), quantize_(strided, config)
    for (name, x), y in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(x, y) and y.is_contiguous(), name
    inputs = torch.randn(3, in_features)
    with torch.no_grad():
        assert torch.equal(a(inputs), b(inputs))
