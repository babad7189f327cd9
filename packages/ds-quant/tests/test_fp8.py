"""DeepSeek-V3 FP8 block weights: dequantization against hand-made values, the layer."""

import pytest
import torch
from ds_quant import (
    Fp8BlockConfig,
    Fp8BlockLinear,
    dequantize_fp8_block,
    quantize_,
    quantize_fp8_block,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

FP8 = torch.float8_e4m3fn


def test_dequantize_matches_hand_made_reference_with_partial_edge_blocks():
    # 3x5 weight, 2x2 blocks -> scale grid (2, 3); the last row / column blocks are partial.
    values = torch.tensor(
        [[1.0, -2.0, 0.5, 4.0, -1.0], [3.0, 0.0, -0.5, 2.0, 1.5], [-4.0, 1.0, 2.0, 0.25, 8.0]]
    )  # every value is exact in float8_e4m3fn
    scale_inv = torch.tensor([[0.5, 2.0, 10.0], [-1.0, 0.125, 3.0]])
    expected = torch.tensor(
        [
            [0.5, -1.0, 1.0, 8.0, -10.0],
            [1.5, 0.0, -1.0, 4.0, 15.0],
            [4.0, -1.0, 0.25, 0.03125, 24.0],
        ]
    )
    got = dequantize_fp8_block(values.to(FP8), scale_inv, block_size=(2, 2), dtype=torch.float32)
    assert torch.equal(got, expected)


def test_default_block_is_128_and_dtype_is_bfloat16():
    w = torch.ones(130, 300, dtype=FP8)
    s = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    got = dequantize_fp8_block(w, s)
    assert got.dtype == torch.bfloat16 and got.shape == (130, 300)
    assert got[127, 127] == 0 and got[128, 0] == 3 and got[129, 299] == 5 and got[0, 256] == 2


@settings(max_examples=25)
@given(
    rows=st.integers(1, 70),
    cols=st.integers(1, 70),
    br=st.sampled_from([1, 8, 16, 32]),
    bc=st.sampled_from([1, 8, 16, 32]),
    magnitude=st.sampled_from([0.0, 1e-3, 1.0, 1e3]),
)
def test_quantize_then_dequantize_is_within_fp8_precision(rows, cols, br, bc, magnitude):
    g = torch.Generator().manual_seed(rows * 131 + cols)
    w = torch.randn(rows, cols, generator=g) * magnitude
    q, s = quantize_fp8_block(w, (br, bc))
    assert q.dtype == FP8 and s.shape == (-(-rows // br), -(-cols // bc))
    back = dequantize_fp8_block(q, s, (br, bc), torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values; values
    # far below their block's maximum fall to subnormals, bounded by the block step.
    step = torch.repeat_interleave(torch.repeat_interleave(s, br, 0), bc, 1)[:rows, :cols]
    bound = w.abs() * 2**-4 + step * 2**-9 + 1e-30
    assert torch.all((back - w).abs() <= bound)


def test_dequantize_rejects_wrong_scale_shape():
    with pytest.raises(ValueError, match=r"weight_scale_inv must have shape"):
        dequantize_fp8_block(torch.zeros(130, 128, dtype=FP8), torch.ones(1, 1))


def test_from_fp8_runs_a_checkpoint_weight():
    torch.manual_seed(0)
    w = torch.randn(200, 136)
    q, s = quantize_fp8_block(w)
    bias = torch.randn(200)
    layer = Fp8BlockLinear.from_fp8(q, s, bias=bias, dtype=torch.float32)
    assert (layer.in_features, layer.out_features) == (136, 200)
    x = torch.randn(3, 136)
    expected = x @ dequantize_fp8_block(q, s, dtype=torch.float32).T + bias
    torch.testing.assert_close(layer(x), expected)
    # The buffer names are DeepSeek-V3's, so its checkpoint tensors load by name.
    assert set(layer.state_dict()) == {"weight", "weight_scale_inv", "bias"}


def test_from_fp8_rejects_non_fp8_weight():
    with pytest.raises(TypeError, match=r"float8_e4m3fn"):
        Fp8BlockLinear.from_fp8(torch.zeros(4, 4), torch.ones(1, 1))


def test_quantize_model_to_fp8_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 192), nn.GELU(), nn.Linear(192, 64))
    x = torch.randn(4, 256)
    expected = model(x)
    quantize_(model, Fp8BlockConfig())
    assert isinstance(model[0], Fp8BlockLinear) and model[0].weight_scale_inv.shape == (2, 2)
    y = model(x)
    sqnr = 10 * torch.log10(expected.pow(2).mean() / (y - expected).pow(2).mean())
    assert sqnr > 25
