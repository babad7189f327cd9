"""Every kernel against the dequantize-then-matmul reference (mean relative error < 1e-3).

The Triton kernel runs in the interpreter on CPU when there is no CUDA (conftest sets
TRITON_INTERPRET=1), at small shapes; the GPU test runs it at larger shapes.
"""

import importlib.util
from unittest import mock

import pytest
import torch
from ds_quant import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, quantize_
from ds_quant.kernels import (
    choose_w4a16_backend,
    cpu_gemv,
    cpu_gemv_available,
    w4a16_matmul_reference,
)
from ds_quant.kernels.cpu import (
    HAS_INT4_CPU,
    int8_weight_matmul_cpu,
)
from ds_quant.kernels.cpu_gemv import MAX_ROWS
from ds_quant.kernels.reference import int8_weight_matmul_reference
from ds_quant.primitives import pack_int4, quantize_int4, quantize_int8_per_channel
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def mean_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return float((got - ref).abs().mean() / ref.abs().mean())


def int4_operands(out_features, in_features, group_size, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    q, scale, zero = quantize_int4(w, group_size)
    return pack_int4(q).to(device), scale.to(device), zero.to(device)


def fp32_reference(x, packed, scale, zero, group_size, in_features):
    return w4a16_matmul_reference(x.float(), packed, scale, zero, group_size, in_features)


@needs_triton
@settings(max_examples=6)
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 40),
    k=st.integers(2, 80),
    group_size=st.sampled_from([16, 32, 64]),
)
def test_triton_w4a16_matches_reference_fp32(m, n, k, group_size):
    from ds_quant.kernels.triton_w4a16 import w4a16_matmul_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    packed, scale, zero = int4_operands(n, k, group_size, seed=m * 7 + n, device=device)
    x = torch.randn(m, k, device=device)
    got = w4a16_matmul_triton(x, packed, scale, zero, group_size, k)
    ref = fp32_reference(x, packed, scale, zero, group_size, k)
    assert got.shape == (m, n)
    assert mean_rel_err(got, ref) < 1e-3


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_w4a16_half_precision_within_twice_torch_error(dtype):
    from ds_quant.kernels.triton_w4a16 import w4a16_matmul_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    packed, scale, zero = int4_operands(48, 96, 32, device=device)
    x = torch.randn(3, 96, device=device)
    ref = fp32_reference(x, packed, scale, zero, 32, 96)
    got = w4a16_matmul_triton(x.to(dtype), packed, scale, zero, 32, 96)
    torch_same_dtype = w4a16_matmul_reference(x.to(dtype), packed, scale, zero, 32, 96)
    assert got.dtype == dtype
    err, torch_err = mean_rel_err(got, ref), mean_rel_err(torch_same_dtype, ref)
    assert err <= 2 * torch_err + 1e-6


@needs_triton
def test_layer_forced_to_triton_backend():
    torch.manual_seed(0)
    linear = nn.Linear(72, 40)  # 72 is not a multiple of the group size
    q = quantize_(linear, Int4WeightOnlyConfig(group_size=32))
    q.backend = "triton"
    x = torch.randn(2, 3, 72)
    if torch.cuda.is_available():
        q, x = q.cuda(), x.cuda()
    ref = x @ q.dequantize().T + q.bias
    assert mean_rel_err(q(x), ref) < 1e-3


@pytest.mark.gpu
def test_triton_w4a16_large_shapes_on_gpu():
    from ds_quant.kernels.triton_w4a16 import w4a16_matmul_triton

    packed, scale, zero = int4_operands(4096, 4096, 128, device="cuda")
    for m in (1, 16, 100):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        got = w4a16_matmul_triton(x, packed, scale, zero, 128, 4096)
        ref = fp32_reference(x, packed, scale, zero, 128, 4096)
        same = w4a16_matmul_reference(x, packed, scale, zero, 128, 4096)
        assert mean_rel_err(got, ref) <= 2 * mean_rel_err(same, ref) + 1e-6


def test_int8_dynamic_integer_matmul_matches_float_reference():
    torch.manual_seed(0)
    q = quantize_(nn.Linear(160, 48), Int8DynamicActivationInt8WeightConfig())
    x = torch.randn(5, 160)
    assert mean_rel_err(q(x), q.reference_forward(x)) < 1e-5


def test_auto_backend_selection():
    # CPU rows take the C kernel where it is built (test_cpu_gemv.py), however many;
    # without it, torch's packed op where that applies, else the reference:
    packed = "cpu_packed" if HAS_INT4_CPU else "reference"
    for rows in (1, MAX_ROWS, MAX_ROWS + 2, 100):
        want = "cpu_gemv" if cpu_gemv_available() else packed
        assert choose_w4a16_backend(torch.randn(rows, 128), 64, 128) == want
    x = torch.randn(MAX_ROWS + 2, 128)
    assert choose_w4a16_backend(x, 64, 16) == "reference"  # a group size neither steps
    with mock.patch.object(cpu_gemv, "_available", False):  # torch's ops only
        assert choose_w4a16_backend(x, 64, 128) == packed
        assert choose_w4a16_backend(x, 40, 128) == "reference"  # out_features % 16 != 0
        # A partial last group: the op takes it from 32 real values (MLA's 192 in groups
        # of 128).
        assert choose_w4a16_backend(x[:, :80], 64, 64) == "reference"  # 16 values
        assert choose_w4a16_backend(x[:, :96], 64, 64) == packed  # 32 values
        assert choose_w4a16_backend(torch.randn(MAX_ROWS + 1, 192), 64, 128) == packed
    assert choose_w4a16_backend(x.double(), 64, 128) == "reference"
    with pytest.raises(ValueError, match=r"backend must be one of"):
        choose_w4a16_backend(x, 64, 128, "fastest")
    with pytest.raises(ValueError, match=r"cpu_packed"):
        choose_w4a16_backend(x, 40, 128, "cpu_packed")


def test_cpu_cache_follows_weight_updates():
    torch.manual_seed(0)
    q = quantize_(nn.Linear(128, 32), Int4WeightOnlyConfig(group_size=32))
    x = torch.randn(2, 128)
    first = q(x)
    new = quantize_(nn.Linear(128, 32), Int4WeightOnlyConfig(group_size=32))
    q.load_state_dict(new.state_dict())
    torch.testing.assert_close(q(x), new(x))
    assert not torch.equal(first, q(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_weight_and_input_do_not_crash_the_int8_cpu_path(dtype):
    # torch 2.15's _weight_int8pack_mm segfaults on unaligned bf16 operands, which is
    # what safetensors hands back for a tensor at an odd file offset.
    from ds_quant import Int8WeightOnlyConfig

    torch.manual_seed(0)
    q = quantize_(nn.Linear(128, 80).to(dtype), Int8WeightOnlyConfig())
    storage = torch.empty(q.weight.numel() + 8, dtype=torch.int8)
    storage[8:] = q.weight.flatten()
    q.weight = storage[8:].view(80, 128)
    x_storage = torch.randn(3 * 128 + 8, dtype=dtype)
    x = x_storage[8:].view(3, 128)
    ref = int8_weight_matmul_reference(x, q.weight, q.weight_scale) + q.bias
    assert mean_rel_err(q(x), ref) < 1e-2
    assert (
        mean_rel_err(int8_weight_matmul_cpu(x, q.weight.clone(), q.weight_scale), ref - q.bias)
        < 1e-2
    )


@needs_triton
@settings(max_examples=8)
@given(
    m=st.integers(1, 4),
    n=st.integers(1, 150),
    k=st.integers(2, 600),
    group_size=st.sampled_from([32, 64, 128, 256]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_triton_gemv_kernels_match_reference(m, n, k, group_size, dtype):
    """Decode-sized inputs: the split-K W4A16 and INT8 matrix-vector kernels, ragged N
    and K included, within twice torch's own error in half precision."""
    from ds_quant.kernels.triton_gemv import int8_gemv_triton, w4a16_gemv_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    packed, scale, zero = int4_operands(n, k, group_size, seed=n * 13 + k, device=device)
    x32 = torch.randn(m, k, device=device)
    x = x32.to(dtype)
    ref = fp32_reference(x32, packed, scale, zero, group_size, k)
    got = w4a16_gemv_triton(x, packed, scale, zero, group_size, k)
    same = w4a16_matmul_reference(x, packed, scale, zero, group_size, k)
    assert got.shape == (m, n) and got.dtype == dtype
    assert mean_rel_err(got, ref) <= 2 * mean_rel_err(same, ref) + 1e-5
    g = torch.Generator().manual_seed(k)
    q, s = quantize_int8_per_channel(torch.randn(n, k, generator=g))
    q, s = q.to(device), s.to(device)
    ref8 = int8_weight_matmul_reference(x32, q, s)
    got8 = int8_gemv_triton(x, q, s)
    same8 = int8_weight_matmul_reference(x, q, s)
    assert got8.shape == (m, n) and got8.dtype == dtype
    assert mean_rel_err(got8, ref8) <= 2 * mean_rel_err(same8, ref8) + 1e-5


@needs_triton
def test_few_rows_take_the_gemv_kernel(monkeypatch):
    from ds_quant.kernels import triton_gemv, triton_w4a16

    calls = []
    real = triton_w4a16.w4a16_gemv_triton

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(triton_w4a16, "w4a16_gemv_triton", spy)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    packed, scale, zero = int4_operands(40, 96, 32, device=device)
    for m in (1, triton_gemv.GEMV_MAX_ROWS, triton_gemv.GEMV_MAX_ROWS + 1):
        x = torch.randn(m, 96, device=device)
        got = triton_w4a16.w4a16_matmul_triton(x, packed, scale, zero, 32, 96)
        assert mean_rel_err(got, fp32_reference(x, packed, scale, zero, 32, 96)) < 1e-3
    assert calls == [1, triton_gemv.GEMV_MAX_ROWS]  # more rows: the tiled kernel
    assert not triton_gemv.gemv_fits(1, 48)  # a group the chunks cannot tile


@pytest.mark.gpu
def test_gemv_kernels_large_shapes_and_int8_layer_on_gpu():
    from ds_quant import Int8WeightOnlyConfig
    from ds_quant.kernels.triton_gemv import w4a16_gemv_triton

    for n, k in ((11008, 4096), (4096, 11008)):
        packed, scale, zero = int4_operands(n, k, 128, device="cuda")
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        got = w4a16_gemv_triton(x, packed, scale, zero, 128, k)
        ref = fp32_reference(x, packed, scale, zero, 128, k)
        same = w4a16_matmul_reference(x, packed, scale, zero, 128, k)
        assert mean_rel_err(got, ref) <= 2 * mean_rel_err(same, ref) + 1e-6
    linear = nn.Linear(4096, 1000).cuda().bfloat16()
    q = quantize_(linear, Int8WeightOnlyConfig())
    for rows in (1, 3, 9):  # the GEMV kernel, then dequantize + matmul
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ q.dequantize(torch.float32).T + q.bias.float()
        assert mean_rel_err(q(x), ref) < 1e-2
