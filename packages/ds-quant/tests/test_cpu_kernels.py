"""The packed CPU kernels against ds-quant's dequantize-then-matmul reference, at every
shape class each one takes, and the layers' fallback to the reference where they do not.

The CPU ops compute with bfloat16 activations (see ``ds_quant.kernels.cpu``), so their
ground truth is the float32 reference on the input rounded to bfloat16, and the error
allowed is the ops' own roundings, per output element: the result rounded to bfloat16
once (INT8: bfloat16's unit roundoff 2^-8, relative), plus for INT4 the bfloat16 group
scales and zero points (2^-8 of each term the op sums).
"""

from unittest import mock

import pytest
import torch
from ds_quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
from ds_quant.kernels import cpu_gemv
from ds_quant.kernels.cpu import (
    HAS_INT4_CPU,
    HAS_INT8_CPU,
    int8_weight_matmul_cpu,
    prepack_int4_cpu,
    w4a16_matmul_cpu,
)
from ds_quant.kernels.cpu_gemv import MAX_ROWS
from ds_quant.kernels.reference import int8_weight_matmul_reference, w4a16_matmul_reference
from ds_quant.primitives import (
    dequantize_int4,
    pack_int4,
    quantize_int4,
    quantize_int8_per_channel,
    unpack_int4,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One rounding of the result to the output dtype, on top of the op's bfloat16 result.
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}
BF16_ROUNDOFF = 2**-8


def torch_ops_only():
    """Layers on torch's packed ops (and the reference) alone: the CPU kernel off."""
    return mock.patch.object(cpu_gemv, "_available", False)


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` (rows, k) in another memory layout."""
    if layout == "transposed":
        return x.t().contiguous().t()
    if layout == "strided":
        return torch.stack((x, torch.zeros_like(x)), dim=-1)[..., 0]
    if layout == "offset":  # a view 2 elements into its storage: not 64-byte aligned
        storage = torch.zeros(x.numel() + 2, dtype=x.dtype)
        storage[2:] = x.flatten()
        return storage[2:].view(x.shape)
    return x


def batch_rows(x: torch.Tensor, rows: int, batched: bool) -> torch.Tensor:
    return x.view(rows, 1, -1) if batched else x


shapes = dict(
    rows=st.integers(1, 9),
    n=st.integers(1, 72),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "transposed", "strided", "offset"]),
    batched=st.booleans(),
)


@pytest.mark.skipif(not HAS_INT8_CPU, reason="torch has no packed INT8 CPU op")
@settings(max_examples=25, deadline=None)
@given(k16=st.integers(1, 20), seed=st.integers(0, 2**16), **shapes)
def test_int8_cpu_kernel_matches_reference(k16, seed, rows, n, dtype, layout, batched):
    k = 16 * k16  # the shape class the op takes (the layer routes the others around it)
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_int8_per_channel(torch.randn(n, k, generator=g))
    x = laid_out(torch.randn(rows, k, generator=g).to(dtype), layout)
    got = int8_weight_matmul_cpu(batch_rows(x, rows, batched), q, scale)
    assert got.dtype == dtype and got.shape == (*batch_rows(x, rows, batched).shape[:-1], n)
    xb = x.bfloat16().float()
    exact = int8_weight_matmul_reference(xb, q, scale)
    terms = xb.abs() @ (q.float().abs() * scale[:, None]).t()
    bound = (BF16_ROUNDOFF + OUTPUT_ROUNDING[dtype]) * 1.01 * exact.abs() + 1e-6 * terms + 1e-30
    assert ((got.float().reshape(rows, n) - exact).abs() <= bound).all()


@pytest.mark.skipif(not HAS_INT4_CPU, reason="torch has no packed INT4 CPU op")
@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 600),
    n16=st.integers(1, 5),
    group_size=st.sampled_from([32, 64, 128, 256]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
    **{name: s for name, s in shapes.items() if name != "n"},
)
def test_int4_cpu_kernel_matches_reference(
    k, n16, group_size, symmetric, seed, rows, dtype, layout, batched
):
    n = 16 * n16  # the op's out_features class; any k (the last group is padded)
    g = torch.Generator().manual_seed(seed)
    q, scale, zero = quantize_int4(torch.randn(n, k, generator=g), group_size, symmetric)
    packed = pack_int4(q)
    x = laid_out(torch.randn(rows, k, generator=g).to(dtype), layout)
    cpu_weight, scales_and_zeros = prepack_int4_cpu(packed, scale, zero)
    got = w4a16_matmul_cpu(
        batch_rows(x, rows, batched), cpu_weight, scales_and_zeros, group_size, k
    )
    assert got.dtype == dtype and got.shape == (*batch_rows(x, rows, batched).shape[:-1], n)
    xb = x.bfloat16().float()
    exact = w4a16_matmul_reference(xb, packed, scale, zero, group_size, k)
    # |(q - 8) * s| + |z| per weight: the magnitudes the op's bf16 scales and zeros scale.
    centred = (unpack_int4(packed).float() - 8).view(n, -1, group_size).abs()
    s = scale.bfloat16().float()[..., None]
    z = ((8 - zero) * scale).abs()[..., None]
    terms = xb.abs() @ (centred * s + z).view(n, -1)[:, :k].t()
    bound = (
        (BF16_ROUNDOFF + OUTPUT_ROUNDING[dtype]) * 1.01 * exact.abs()
        + BF16_ROUNDOFF * terms
        + 1e-30
    )
    assert ((got.float().reshape(rows, n) - exact).abs() <= bound).all()


@settings(max_examples=12, deadline=None)
@given(k=st.integers(1, 80), rows=st.integers(1, 5), dtype=st.sampled_from(DTYPES))
def test_int8_layer_takes_the_reference_where_the_op_does_not_apply(k, rows, dtype):
    # in_features % 16 != 0: torch's op crashes on such bfloat16 inputs. (The CPU
    # kernel, which takes them where it is built, is off: test_cpu_gemv.py covers it.)
    k = k if k % 16 else k + 1
    torch.manual_seed(k)
    layer = quantize_(nn.Linear(k, 24, bias=False).to(dtype), Int8WeightOnlyConfig())
    x = torch.randn(MAX_ROWS + rows, k, dtype=dtype)
    want = int8_weight_matmul_reference(x, layer.weight, layer.weight_scale)
    with torch_ops_only():
        assert torch.equal(layer(x), want)


@settings(max_examples=12, deadline=None)
@given(
    k=st.integers(1, 300),
    n=st.integers(1, 40),
    group_size=st.sampled_from([16, 32, 128]),
    dtype=st.sampled_from(DTYPES),
)
def test_int4_layer_takes_the_reference_where_the_op_does_not_apply(k, n, group_size, dtype):
    if n % 16 == 0 and group_size != 16:
        n += 1  # out_features % 16 == 0 and group size 32..256 take the op
    torch.manual_seed(k)
    layer = quantize_(
        nn.Linear(k, n, bias=False).to(dtype), Int4WeightOnlyConfig(group_size=group_size)
    )
    x = torch.randn(MAX_ROWS + 3, k, dtype=dtype)
    w = dequantize_int4(layer.weight, layer.weight_scale, layer.weight_zero, group_size, k)
    with torch_ops_only():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, w.to(dtype)))


@pytest.mark.parametrize("config", [Int8WeightOnlyConfig(), Int4WeightOnlyConfig(group_size=32)])
def test_layer_backend_reference_is_dequantize_then_matmul(config):
    torch.manual_seed(0)
    layer = quantize_(nn.Linear(64, 32), config)
    x = torch.randn(4, 64)
    layer.backend = "reference"
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dequantize(), layer.bias))
    layer.backend = "fastest"
    with pytest.raises(ValueError, match="backend must be one of"):
        layer(x)


def test_state_dict_keeps_the_canonical_format_after_cpu_calls():
    torch.manual_seed(0)
    layer = quantize_(nn.Linear(256, 64), Int4WeightOnlyConfig(group_size=128))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(torch.randn(2, 256))  # builds the op's own layout
    after = layer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert after["weight"].dtype == torch.uint8 and after["weight"].shape == (64, 128)


@pytest.mark.skipif(not HAS_INT4_CPU, reason="torch has no packed INT4 CPU op")
@settings(max_examples=15, deadline=None)
@given(
    groups=st.integers(0, 3),
    partial=st.integers(1, 255),
    group_size=st.sampled_from([32, 64, 128, 256]),
    n16=st.integers(1, 4),
    rows=st.integers(1, 9),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_int4_layer_with_a_partial_last_group(groups, partial, group_size, n16, rows, dtype, seed):
    # A partial last group of at least 32 values takes the op (MLA's 192-wide input in
    # groups of 128) within its bounds; fewer take the reference, exactly. (The CPU
    # kernel off.)
    rows += MAX_ROWS
    partial = partial % group_size or 1
    k, n = groups * group_size + partial, 16 * n16
    torch.manual_seed(seed)
    layer = quantize_(
        nn.Linear(k, n, bias=False).to(dtype), Int4WeightOnlyConfig(group_size=group_size)
    )
    x = torch.randn(rows, k, dtype=dtype)
    with torch_ops_only():
        got = layer(x)
    args = (layer.weight, layer.weight_scale, layer.weight_zero, group_size, k)
    if partial < 32:
        w = dequantize_int4(*args)
        assert torch.equal(got, torch.nn.functional.linear(x, w.to(dtype)))
        return
    xb = x.bfloat16().float()
    exact = w4a16_matmul_reference(xb, *args)
    centred = (unpack_int4(layer.weight).float() - 8).view(n, -1, group_size).abs()
    s = layer.weight_scale.bfloat16().float()[..., None]
    z = ((8 - layer.weight_zero) * layer.weight_scale).abs()[..., None]
    terms = xb.abs() @ (centred * s + z).view(n, -1)[:, :k].t()
    bound = (BF16_ROUNDOFF + OUTPUT_ROUNDING[dtype]) * 1.01 * exact.abs() + BF16_ROUNDOFF * terms
    assert ((got.float() - exact).abs() <= bound + 1e-30).all()


def count_int4_layouts(monkeypatch) -> list[int]:
    """A list that grows by one each time an INT4 layer builds its CPU op layout."""
    import ds_quant.linear_int4 as linear_int4

    made: list[int] = []
    prepack = linear_int4.prepack_int4_cpu
    monkeypatch.setattr(
        linear_int4, "prepack_int4_cpu", lambda *a, **k: made.append(1) or prepack(*a, **k)
    )
    return made


@pytest.mark.skipif(not HAS_INT4_CPU, reason="torch has no packed INT4 CPU op")
def test_int4_cpu_layout_is_made_only_for_torchs_op_where_the_kernel_runs(monkeypatch):
    """Every CPU call runs ds-quant's kernel on the stored weight (training inputs too:
    the layer's backward uses the dequantized weight), so torch's layout, as large as
    the weight, is made only when something forces its op, once."""
    if not cpu_gemv.available():
        pytest.skip("no CPU kernel on this machine")
    made = count_int4_layouts(monkeypatch)
    torch.manual_seed(0)
    layer = quantize_(nn.Linear(256, 64), Int4WeightOnlyConfig(group_size=128))
    with torch.inference_mode():
        for rows in (1, 9, 40):
            layer(torch.randn(rows, 256))
    x = torch.randn(3, 256, requires_grad=True)
    layer(x).sum().backward()
    assert made == [] and x.grad is not None
    layer.backend = "cpu_packed"
    layer(x), layer(x)
    assert len(made) == 1


@pytest.mark.skipif(not HAS_INT4_CPU, reason="torch has no packed INT4 CPU op")
@torch_ops_only()
def test_int4_cpu_layout_is_made_at_quantize_and_load_not_per_call(monkeypatch):
    """Without the kernel (torch's ops serve inference too)."""
    made = count_int4_layouts(monkeypatch)
    torch.manual_seed(0)
    layer = quantize_(nn.Linear(256, 64), Int4WeightOnlyConfig(group_size=128))
    assert len(made) == 1  # at quantize time
    x = torch.randn(2, 256)
    first = layer(x)
    layer(torch.randn(1, 256))
    assert len(made) == 1  # calls reuse it
    other = quantize_(nn.Linear(256, 64), Int4WeightOnlyConfig(group_size=128))
    made.clear()
    layer.load_state_dict(other.state_dict())  # new values: a new layout, once
    assert len(made) == 1
    torch.testing.assert_close(layer(x), other(x))
    assert not torch.equal(layer(x), first)
    assert len(made) == 1


@pytest.mark.skipif(not HAS_INT4_CPU, reason="torch has no packed INT4 CPU op")
@torch_ops_only()
def test_int4_prepack_after_buffers_are_re_laid_by_hand(monkeypatch):
    """Buffers replaced by views of another storage (as ds-model stacks MoE experts):
    ``prepack()`` builds the layout for them at once, and calls then reuse it."""
    torch.manual_seed(0)
    layer = quantize_(nn.Linear(256, 64), Int4WeightOnlyConfig(group_size=128))
    x = torch.randn(1, 256)
    expected = layer(x)
    stacked = {
        n: torch.stack([getattr(layer, n)] * 2) for n in ("weight", "weight_scale", "weight_zero")
    }
    for name, t in stacked.items():
        setattr(layer, name, t[1])
    made = count_int4_layouts(monkeypatch)
    layer.prepack()
    assert len(made) == 1
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert len(made) == 1  # the call used the layout prepack() made
