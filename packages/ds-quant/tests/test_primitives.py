"""Round-to-nearest quantizers and 4-bit packing: error bounds and losslessness."""

import pytest
import torch
from ds_quant import pack_int4, unpack_int4
from ds_quant.primitives import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8_per_channel,
)
from hypothesis import given, settings
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def weights(draw, max_rows=24, max_cols=300):
    """Float (out, in) weights with zeros, constant rows and outliers mixed in."""
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    dtype = draw(st.sampled_from(DTYPES))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * magnitude
    kind = draw(st.sampled_from(["plain", "zeros", "constant_row", "outliers", "zero_row"]))
    if kind == "zeros":
        w.zero_()
    elif kind == "constant_row":
        w[draw(st.integers(0, rows - 1))] = draw(st.sampled_from([0.0, 3.0, -0.7]))
    elif kind == "outliers":
        mask = torch.rand(rows, cols, generator=g) < 0.02
        w[mask] *= 100
    elif kind == "zero_row":
        w[0] = 0
    return w.to(dtype)


@settings(max_examples=60)
@given(w=weights(), group_size=st.sampled_from([2, 16, 32, 64, 128, 256]), sym=st.booleans())
def test_int4_error_is_at_most_half_a_step_per_group(w, group_size, sym):
    q, scale, zero = quantize_int4(w, group_size, sym)
    _, k = w.shape
    k_pad = q.shape[1]
    assert k_pad % group_size == 0 and k_pad - k < group_size
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    back = dequantize_int4(pack_int4(q), scale, zero, group_size, k)
    assert back.shape == w.shape
    step = scale.repeat_interleave(group_size, dim=1)[:, :k]
    wf = w.float()
    # Half a step, plus float rounding of (q - zero) * scale relative to the values.
    bound = 0.5 * step * (1 + 1e-5) + 1e-6 * wf.abs().amax(dim=1, keepdim=True)
    assert torch.all((back - wf).abs() <= bound)
    # A group that is all zeros dequantizes to exact zeros.
    zero_groups = (wf == 0).all(dim=1)
    assert torch.all(back[zero_groups] == 0)


@settings(max_examples=40)
@given(w=weights())
def test_int8_error_is_at_most_half_a_step_per_channel(w):
    q, scale = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (w.shape[0],)
    back = dequantize_int8(q, scale, torch.float32)
    wf = w.float()
    bound = 0.5 * scale[:, None] * (1 + 1e-5) + 1e-6 * wf.abs().amax(dim=1, keepdim=True)
    assert torch.all((back - wf).abs() <= bound)
    assert torch.all(back[wf == 0] == 0)


def test_constant_group_is_exact():
    w = torch.full((2, 64), 0.3)
    q, scale, zero = quantize_int4(w, 32, symmetric=False)
    back = dequantize_int4(pack_int4(q), scale, zero, 32, 64)
    torch.testing.assert_close(back, w, rtol=0, atol=1e-7)


@settings(max_examples=50)
@given(rows=st.integers(1, 20), half=st.integers(1, 40), seed=st.integers(0, 1000))
def test_pack_unpack_is_lossless(rows, half, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, 2 * half), generator=g, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (rows, half) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    # and the other way round: every byte value survives unpack -> pack
    b = torch.randint(0, 256, (rows, half), generator=g, dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(b)), b)


def test_pack_layout_low_nibble_first():
    assert pack_int4(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x21, 0x0F]]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"0..15"):
        pack_int4(torch.tensor([[16, 0]]))
    with pytest.raises(ValueError, match=r"even"):
        pack_int4(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"uint8"):
        unpack_int4(torch.tensor([[1, 2]], dtype=torch.int32))
