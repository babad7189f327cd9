"""The CPU decode kernels (``ds_quant.kernels.cpu_gemv``) against their references.

Two references: the kernel's own (``int*_gemv_reference``: the same int16 rounding of
each activation row, then float64 products), which it must match to float32 summation
roundoff; and ds-quant's dequantize-then-matmul, which it must match within that
rounding's bound (half an int16 step of each row, max |x| / 65534, times the weights'
absolute row sums). Then the layers' routing (decode rows to the kernel), the compiled
ops, the stacked-experts form, and the build (cache, missing compiler, the switch).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from ds_quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
from ds_quant.kernels import cpu_gemv
from ds_quant.kernels.cpu import int8_weight_matmul_cpu, prepack_int4_cpu, w4a16_matmul_cpu
from ds_quant.kernels.cpu_gemv import (
    MAX_ROWS,
    NORM_ROWS,
    bf16_gemv,
    bf16_gemv_reference,
    bf16_takes,
    fp32_gemv,
    fp32_gemv_reference,
    fp32_takes,
    int4_gemv,
    int4_gemv_reference,
    int4_takes,
    int8_gemv,
    int8_gemv_reference,
    int8_takes,
    rms_norm,
    rms_norm_reference,
    rms_norm_takes,
)
from ds_quant.kernels.reference import int8_weight_matmul_reference, w4a16_matmul_reference
from ds_quant.primitives import dequantize_int4, pack_int4, quantize_int4, quantize_int8_per_channel
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

# test_other_instruction_sets_... runs this module again in a fresh process with the
# build flags it names here (an AVX2 build, an AVX512BW build without VNNI).
if os.environ.get("DS_QUANT_TEST_FLAGS"):
    cpu_gemv.FLAGS = (
        *(flag for flag in cpu_gemv.FLAGS if flag != "-march=native"),
        *os.environ["DS_QUANT_TEST_FLAGS"].split(),
    )
pytestmark = pytest.mark.skipif(
    not cpu_gemv.available(), reason="no C++ compiler or no AVX2 / AVX512BW on this CPU"
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}
SUM_ROUNDOFF = 1e-6  # float32 sums of a few thousand terms, relative to sum |terms|


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` (rows, k) in another memory layout."""
    if layout == "transposed":
        return x.t().contiguous().t()
    if layout == "strided":
        return torch.stack((x, torch.zeros_like(x)), dim=-1)[..., 0]
    if layout == "offset":  # 3 elements into its storage: no alignment
        storage = torch.zeros(x.numel() + 3, dtype=x.dtype)
        storage[3:] = x.flatten()
        return storage[3:].view(x.shape)
    return x


def assert_within(got, exact, terms, x, dtype):
    """``got`` within the output's rounding and float32 summation of ``exact``."""
    bound = OUTPUT_ROUNDING[dtype] * 1.01 * exact.abs() + SUM_ROUNDOFF * terms + 1e-30
    assert ((got.double() - exact).abs() <= bound).all()


def int16_rounding(x: torch.Tensor) -> torch.Tensor:
    """Half an int16 step of each row: the most the kernel moves any activation."""
    return x.double().abs().amax(-1, keepdim=True) / 65534


layouts = st.sampled_from(["contiguous", "transposed", "strided", "offset"])


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, MAX_ROWS),
    k=st.integers(1, 300),
    n=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    layout=layouts,
    q_offset=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_int8_kernel_matches_its_reference(rows, k, n, dtype, layout, q_offset, seed):
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_int8_per_channel(torch.randn(n, k, generator=g))
    q = torch.cat((torch.zeros(q_offset, dtype=torch.int8), q.flatten()))[q_offset:].view(n, k)
    x = laid_out(torch.randn(rows, k, generator=g).to(dtype), layout)
    got = int8_gemv(x, q, scale)
    assert got.dtype == dtype and got.shape == (rows, n)
    w_abs = q.double().abs() * scale.double()[:, None]
    terms = x.double().abs() @ w_abs.t()
    assert_within(got, int8_gemv_reference(x.double(), q, scale), terms, x, dtype)
    # Against the dequantize-then-matmul ground truth: the int16 rounding's bound.
    exact = int8_weight_matmul_reference(x.double(), q, scale)
    bound = int16_rounding(x) * w_abs.sum(-1) + SUM_ROUNDOFF * terms
    bound = bound + OUTPUT_ROUNDING[dtype] * 1.01 * exact.abs() + 1e-30
    assert ((got.double() - exact).abs() <= bound).all()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, MAX_ROWS),
    groups=st.integers(0, 3),
    partial=st.integers(0, 255),
    group_size=st.sampled_from([64, 128, 256]),
    n=st.integers(1, 40),
    symmetric=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    layout=layouts,
    seed=st.integers(0, 2**16),
)
def test_int4_kernel_matches_its_reference(
    rows, groups, partial, group_size, n, symmetric, dtype, layout, seed
):
    """Whole groups and a partial last one (the padding meets no activation)."""
    k = groups * group_size + partial % group_size or group_size
    g = torch.Generator().manual_seed(seed)
    q, scale, zero = quantize_int4(torch.randn(n, k, generator=g), group_size, symmetric)
    packed = pack_int4(q)
    x = laid_out(torch.randn(rows, k, generator=g).to(dtype), layout)
    args = (packed, scale, zero, group_size, k)
    got = int4_gemv(x, *args)
    assert got.dtype == dtype and got.shape == (rows, n)
    w_abs = dequantize_int4(*args, dtype=torch.float64).abs()
    terms = int4_terms(x, q, scale, zero, group_size, k)
    assert_within(got, int4_gemv_reference(x.double(), *args), terms, x, dtype)
    exact = w4a16_matmul_reference(x.double(), *args)
    bound = int16_rounding(x) * w_abs.sum(-1) + SUM_ROUNDOFF * terms
    bound = bound + OUTPUT_ROUNDING[dtype] * 1.01 * exact.abs() + 1e-30
    assert ((got.double() - exact).abs() <= bound).all()


def int4_terms(x, q, scale, zero, group_size, k):
    """What the kernel's float32 roundoff scales with: it sums (q - zero) per group as
    sum q x - zero sum x, so (|q| + |zero|) * scale per weight, not |q - zero| * scale."""
    per_input = lambda t: t.double().repeat_interleave(group_size, -1)[:, :k]  # noqa: E731
    magnitudes = (q.double()[:, :k].abs() + per_input(zero).abs()) * per_input(scale).abs()
    return x.double().abs() @ magnitudes.t()


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    rows=st.integers(1, 2 * MAX_ROWS + 3),
    k=st.integers(1, 300),
    n=st.integers(1, 70),
    layout=layouts,
    w_offset=st.integers(0, 3),
    input_major=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_float_kernels_match_their_references(
    dtype, rows, k, n, layout, w_offset, input_major, seed
):
    """bfloat16 / float32 rows by a weight of their dtype: the exact product (rounded
    once to bfloat16 for bf16_gemv), up to float32 summation; rows past ``MAX_ROWS`` run
    in passes, every row's result is what it gets alone, and leading dimensions are
    kept. A float32 weight may also be laid input-major (unit stride along its outputs)."""
    gemv = bf16_gemv if dtype == torch.bfloat16 else fp32_gemv
    input_major = input_major and dtype == torch.float32 and n > 1 and k > 1
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    stored = w.t() if input_major else w  # the matrix as memory holds it, at an offset
    flat = torch.cat((torch.zeros(w_offset, dtype=w.dtype), stored.flatten()))[w_offset:]
    w = flat.view(k, n).t() if input_major else flat.view(n, k)
    assert (w.stride(1) != 1) == input_major
    x = laid_out(torch.randn(rows, k, generator=g).to(dtype), layout)
    got = gemv(x, w)
    assert got.dtype == dtype and got.shape == (rows, n)
    terms = x.double().abs() @ w.double().abs().t()
    assert_within(got, x.double() @ w.double().t(), terms, x, dtype)
    if dtype == torch.bfloat16:
        # Against the reference, itself rounded to bfloat16: a unit in the last place
        # apart at most (both round the same sum, one after float32 summation).
        reference = bf16_gemv_reference(x, w).double()
        bound = 2**-7 * reference.abs() + SUM_ROUNDOFF * terms + 1e-30
    else:  # the reference is the float64 product rounded to float32 once
        reference = fp32_gemv_reference(x, w).double()
        bound = 2**-23 * reference.abs() + SUM_ROUNDOFF * terms + 1e-30
    assert ((got.double() - reference).abs() <= bound).all()
    for r in range(rows):
        assert torch.equal(got[r : r + 1], gemv(x[r : r + 1], w))
    assert torch.equal(gemv(x.reshape(rows, 1, k), w), got.view(rows, 1, n))


def test_bf16_takes_a_few_bf16_rows_outside_autograd():
    w = torch.randn(16, 32).bfloat16()
    assert bf16_takes(torch.randn(1, 1, 32).bfloat16(), w)
    rows = cpu_gemv.bf16_rows()
    # 4 with AVX512-BF16 dot products; the re-runs below build without them.
    dot_products = "avx512_bf16" in cpu_flags() and not os.environ.get("DS_QUANT_TEST_FLAGS")
    assert rows == (4 if dot_products else 1)
    assert bf16_takes(torch.randn(rows, 32).bfloat16(), w)
    assert not bf16_takes(torch.randn(rows + 1, 32).bfloat16(), w)  # oneDNN's
    assert not bf16_takes(torch.randn(0, 32).bfloat16(), w)
    assert not bf16_takes(torch.randn(1, 32), w)
    assert not bf16_takes(torch.randn(1, 32).bfloat16(), w.float())
    assert not bf16_takes(torch.randn(1, 32).bfloat16(), w.t().contiguous().t())
    assert not bf16_takes(torch.randn(1, 32).bfloat16().requires_grad_(), w)
    assert not bf16_takes(torch.randn(1, 32).bfloat16(), w.clone().requires_grad_())
    with torch.no_grad():  # a model's weights require grad; inference does not track it
        assert bf16_takes(torch.randn(1, 32).bfloat16().requires_grad_(), w.requires_grad_())


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(torch.bfloat16, "bfloat16"), (torch.float32, "float32")],
    ids=["bf16", "fp32"],
)
def test_float_kernels_on_long_rows_special_values_and_bad_arguments(dtype, name):
    """Thousands of inputs (float32 sums), a NaN or inf row, leading dimensions, and
    arguments the ops refuse by name."""
    gemv = bf16_gemv if dtype == torch.bfloat16 else fp32_gemv
    op = getattr(
        torch.ops.ds_quant, "bf16_gemv_cpu" if dtype == torch.bfloat16 else "fp32_gemv_cpu"
    )
    g = torch.Generator().manual_seed(0)
    w = torch.randn(33, 5000, generator=g).to(dtype)
    x = torch.randn(3, 5000, generator=g).to(dtype)
    x[1, 7] = float("nan")
    x[2, 9] = float("inf")
    got = gemv(x, w)
    terms = x[:1].double().abs() @ w.double().abs().t()
    assert_within(got[:1], x[:1].double() @ w.double().t(), terms, x, dtype)
    assert got[1].isnan().all()
    assert torch.equal(got[2].double(), x[2].double() @ w.double().t())  # inf, signed by w
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(RuntimeError, match=f"w must be a 2-D {name} CPU tensor"):
        op(x, w.to(other))
    with pytest.raises(RuntimeError, match=rf"x must be a {name} CPU tensor \(\.\.\., 5000\)"):
        op(x[:, :64], w)
    torch.library.opcheck(op.default, (x[:1, :64].clone(), w[:, :64].clone()))
    clean = torch.randn(2, 1, 64, generator=g).to(dtype)
    torch.library.opcheck(op.default, (clean, w[:, :64].clone()))
    input_major = w.t().contiguous().t()
    with pytest.raises(RuntimeError, match=f"w must be a 2-D {name} CPU tensor"):
        op(x[:, ::2], w[:, ::2])  # unit stride along neither dimension
    if dtype == torch.bfloat16:
        with pytest.raises(RuntimeError, match="with unit inner stride and"):
            op(x, input_major)
        return
    # float32 weights laid input-major, read in place: sums in input order.
    got = op(x, input_major)
    assert_within(got[:1], x[:1].double() @ w.double().t(), terms, x, dtype)
    assert got[1].isnan().all()
    assert torch.equal(got[2].double(), x[2].double() @ w.double().t())
    torch.library.opcheck(op.default, (clean, input_major[:, :64]))
    # One input: any stride on the size-1 dimension, either layout.
    for strides in ((1, 3), (1, 1), (5, 1)):
        column = torch.randn(30, generator=g).as_strided((6, 1), strides)
        one = torch.randn(2, 1, generator=g)
        torch.testing.assert_close(op(one, column), one @ column.t(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("dtype", "input_major"),
    [(torch.bfloat16, False), (torch.float32, False), (torch.float32, True)],
    ids=["bf16", "fp32", "fp32-input-major"],
)
def test_float_kernels_split_over_threads_give_the_one_thread_result(dtype, input_major):
    """Over two threads a layer's outputs are split between them (rows of the weight, or
    column blocks of an input-major one): each output is summed as one thread sums it."""
    gemv = bf16_gemv if dtype == torch.bfloat16 else fp32_gemv
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 300, generator=g).to(dtype)
    if input_major:
        w = w.t().contiguous().t()
    x = torch.randn(3, 300, generator=g).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemv(x, w)
        torch.set_num_threads(2)
        assert torch.equal(gemv(x, w), one)
    finally:
        torch.set_num_threads(threads)


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    dim=st.integers(1, 600),
    layout=st.sampled_from(["contiguous", "strided", "offset"]),
    eps=st.sampled_from([1e-6, 1e-5, 0.0, 0.5]),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_matches_its_reference(dtype, lead, dim, layout, eps, scale, seed):
    """Any leading dimensions, widths on and off the sixteen-lane step, rows laid with a
    stride or at an odd offset: RMSNorm's float32 arithmetic, to the rounding of the sum
    of squares' order (the output's last place: float32 a few units, bfloat16 one)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(*lead, dim, generator=g) * scale
    x = laid_out(rows.reshape(-1, dim).to(dtype), layout).view(*lead, dim)
    w = (torch.randn(dim, generator=g) + 1).to(dtype)
    got = rms_norm(x, w, eps)
    want = rms_norm_reference(x, w, eps)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=4 * 2**-23, atol=1e-30)
    else:
        ulp = 2.0 ** (torch.frexp(want.float()).exponent.float() - 8)
        assert ((got.float() - want.float()).abs() <= ulp).all()
    flat = x.reshape(-1, dim)
    for r in range(flat.shape[0]):  # a row's result is what it gets alone
        assert torch.equal(got.reshape(-1, dim)[r : r + 1], rms_norm(flat[r : r + 1], w, eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_on_special_values_and_bad_arguments(dtype):
    """Rows with a NaN, an inf, or all zeros (eps 0: 0 / 0) give what torch's ops give
    (a NaN row; zeros but NaN where the inf was; a NaN row), a zero row with eps > 0
    zeros, and the op refuses what it cannot take by argument name."""
    op = torch.ops.ds_quant.rms_norm_cpu
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 70, generator=g).to(dtype)
    w = torch.randn(70, generator=g).to(dtype)
    x[1, 3], x[2, 5] = float("nan"), float("inf")
    x[3] = 0
    got = rms_norm(x, w, 0.0)
    want = rms_norm_reference(x, w, 0.0)
    last_place = 4 * 2**-23 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(got, want, rtol=last_place, atol=0, equal_nan=True)
    assert got[1].isnan().all() and got[3].isnan().all()
    assert got[2, 5].isnan() and (got[2, :5] == 0).all()
    assert torch.equal(rms_norm(x[3:], w, 1e-6), torch.zeros(1, 70, dtype=dtype))
    with pytest.raises(RuntimeError, match="x must be a float32 or bfloat16 CPU tensor"):
        op(x.half(), w.half(), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be a contiguous 1-D"):
        op(x, w[:64], 1e-6)
    with pytest.raises(RuntimeError, match="weight must be a contiguous 1-D"):
        op(x, w.double(), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be a contiguous 1-D"):
        op(x[:, ::2], w[::2], 1e-6)
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        op(x, w, -1.0)
    torch.library.opcheck(op.default, (torch.randn(2, 1, 70).to(dtype), w, 1e-6))
    torch.library.opcheck(op.default, (torch.randn(3, 70).to(dtype), w, 1e-6))


def test_rms_norm_takes_decode_rows_outside_autograd_autocast_and_tracing():
    w = torch.randn(32)
    assert rms_norm_takes(torch.randn(1, 1, 32), w)
    assert rms_norm_takes(torch.randn(2, 32).bfloat16(), w.bfloat16())
    assert rms_norm_takes(torch.randn(NORM_ROWS, 32), w)
    assert not rms_norm_takes(torch.randn(NORM_ROWS + 1, 32), w)  # torch's, over threads
    assert not rms_norm_takes(torch.randn(0, 32), w)
    assert not rms_norm_takes(torch.randn(1, 32).bfloat16(), w)  # autocast's float weight
    assert not rms_norm_takes(torch.randn(1, 32).half(), w.half())
    assert not rms_norm_takes(torch.randn(1, 16), w[::2])
    assert not rms_norm_takes(torch.randn(1, 31), w)
    assert not rms_norm_takes(torch.tensor(1.0), w[:1])
    assert not rms_norm_takes(torch.randn(1, 32).requires_grad_(), w)
    assert not rms_norm_takes(torch.randn(1, 32), w.clone().requires_grad_())
    with torch.no_grad():
        assert rms_norm_takes(torch.randn(1, 32).requires_grad_(), w.requires_grad_())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not rms_norm_takes(torch.randn(1, 32), w)
    seen = []

    def traced(x):
        seen.append(rms_norm_takes(x, w))
        return x

    torch.compile(traced, backend="eager", fullgraph=True)(torch.randn(1, 32))
    assert seen == [False]


def test_fp32_takes_a_few_fp32_rows_outside_autograd():
    w = torch.randn(16, 32)
    assert fp32_takes(torch.randn(1, 1, 32), w)
    rows = cpu_gemv.fp32_rows()
    assert rows == 4
    assert fp32_takes(torch.randn(rows, 32), w)
    assert not fp32_takes(torch.randn(rows + 1, 32), w)  # torch's matmul
    assert not fp32_takes(torch.randn(0, 32), w)
    assert not fp32_takes(torch.randn(1, 32).bfloat16(), w)
    assert not fp32_takes(torch.randn(1, 32), w.double())
    assert fp32_takes(torch.randn(1, 32), w.t().contiguous().t())  # input-major
    assert not fp32_takes(torch.randn(1, 16), w[:, ::2])  # unit stride along neither
    assert not fp32_takes(torch.randn(1, 32).requires_grad_(), w)
    assert not fp32_takes(torch.randn(1, 32), w.clone().requires_grad_())
    with torch.no_grad():
        assert fp32_takes(torch.randn(1, 32).requires_grad_(), w.requires_grad_())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear would run in bfloat16
        assert not fp32_takes(torch.randn(1, 32), w)
        assert not bf16_takes(torch.randn(1, 32).bfloat16(), w.bfloat16())


def test_int8_kernel_over_long_rows():
    """Past 4096 inputs the int32 sums are carried in float32 block by block: no
    overflow at the largest products (|x| at its maximum, |q| = 127 everywhere)."""
    k = 3 * 4096 + 40
    q = torch.full((5, k), 127, dtype=torch.int8)
    q[1] = -127
    scale = torch.full((5,), 1e-3)
    x = torch.full((2, k), 7.5)
    exact = int8_weight_matmul_reference(x.double(), q, scale)
    torch.testing.assert_close(int8_gemv(x, q, scale).double(), exact, rtol=1e-6, atol=0)


def test_kernels_on_zero_and_non_finite_rows():
    """A zero row gives zeros; a row holding inf or NaN gives NaN (not a finite guess)."""
    q, scale = quantize_int8_per_channel(torch.randn(6, 64))
    q4, s4, z4 = quantize_int4(torch.randn(6, 64), 64, False)
    x = torch.randn(3, 64)
    x[0] = 0
    x[1, 5] = float("inf")
    x[2, 7] = float("nan")
    for got in (int8_gemv(x, q, scale), int4_gemv(x, pack_int4(q4), s4, z4, 64, 64)):
        assert torch.equal(got[0], torch.zeros(6))
        assert got[1:].isnan().all()


@pytest.mark.parametrize("rows", [1, MAX_ROWS, MAX_ROWS + 1, 3 * MAX_ROWS + 5])
def test_layers_run_every_cpu_row_count_on_the_kernel(rows):
    """Decode rows and prefill alike; a row's result does not depend on the rows that
    share its call (torch's packed ops rounded activations to bfloat16, so a token's
    logits changed with the size of the step that carried it)."""
    torch.manual_seed(rows)
    int8 = quantize_(nn.Linear(96, 40), Int8WeightOnlyConfig())
    int4 = quantize_(nn.Linear(192, 40), Int4WeightOnlyConfig(group_size=64))
    x8, x4 = torch.randn(rows, 96), torch.randn(rows, 192)
    assert int8_takes(x8, int8.weight) and int4_takes(x4, 64)
    kernel8 = int8_gemv(x8, int8.weight, int8.weight_scale) + int8.bias
    kernel4 = int4_gemv(x4, int4.weight, int4.weight_scale, int4.weight_zero, 64, 192) + int4.bias
    with torch.inference_mode():
        y8, y4 = int8(x8), int4(x4)
        assert torch.equal(y8, kernel8) and torch.equal(y4, kernel4)
        for r in range(rows):
            assert torch.equal(int8(x8[r : r + 1]), y8[r : r + 1])
            assert torch.equal(int4(x4[r : r + 1]), y4[r : r + 1])
    # Close to the float layer each quantized.
    torch.testing.assert_close(
        y8, nn.functional.linear(x8, int8.dequantize(), int8.bias), rtol=2e-2, atol=2e-2
    )
    torch.testing.assert_close(
        y4, nn.functional.linear(x4, int4.dequantize(), int4.bias), rtol=2e-2, atol=2e-2
    )


def test_decode_rows_that_need_gradients_get_the_dequantized_weights_gradient():
    """A decode-sized input that needs a gradient (a LoRA over a quantized base, trained a
    token at a time): the layer's forward may run the kernel, its backward is the
    dequantized weight's. Called outside a layer, the ``*_takes`` checks refuse such an
    input: the ops have no backward and would drop its gradient."""
    torch.manual_seed(0)
    int8 = quantize_(nn.Linear(64, 32), Int8WeightOnlyConfig())
    int4 = quantize_(nn.Linear(128, 32), Int4WeightOnlyConfig(group_size=64))
    stack = torch.zeros(2, 4, 128, dtype=torch.int8)
    for layer in (int8, int4):
        x = torch.randn(1, layer.in_features, requires_grad=True)
        assert not int8_takes(x, int8.weight) and not int4_takes(x, 64)
        assert not cpu_gemv.experts_gemv_takes(x, stack)
        with torch.no_grad():
            assert int8_takes(x, int8.weight) and int4_takes(x, 64)
            assert cpu_gemv.experts_gemv_takes(x, stack)
        layer(x).sum().backward()
        expected = layer.dequantize().float().sum(0, keepdim=True)
        torch.testing.assert_close(x.grad, expected, rtol=2e-2, atol=2e-2)


def test_ops_run_any_number_of_rows_and_refuse_bad_arguments_by_name():
    """More rows than one call takes run in slices of ``MAX_ROWS``; a wrong scale, group
    size or expert index is an error naming it, never a read outside the weights."""
    torch.manual_seed(0)
    q, scale = quantize_int8_per_channel(torch.randn(2 * 24, 128))
    q4, s4, z4 = quantize_int4(torch.randn(24, 128), 64, False)
    packed = pack_int4(q4)
    x = torch.randn(2 * MAX_ROWS + 3, 128)
    ops = torch.ops.ds_quant
    whole8 = ops.int8_gemv_cpu(x, q[:24], scale[:24])
    whole4 = ops.int4_gemv_cpu(x, packed, s4, z4, 64)
    for start in range(0, x.shape[0], MAX_ROWS):
        part = x[start : start + MAX_ROWS]
        assert torch.equal(whole8[start : start + MAX_ROWS], int8_gemv(part, q[:24], scale[:24]))
        assert torch.equal(
            whole4[start : start + MAX_ROWS], int4_gemv(part, packed, s4, z4, 64, 128)
        )
    # A size-1 dimension may carry any stride (compiled graphs pass such views).
    one_row = torch.randn(128).as_strided((1, 128), (3, 1))
    one_q = q[:1].clone().as_strided((1, 128), (5, 1))
    assert torch.equal(
        ops.int8_gemv_cpu(one_row, one_q, scale[:1]),
        ops.int8_gemv_cpu(one_row.contiguous(), one_q.contiguous(), scale[:1]),
    )
    one_packed = packed[:1].clone().as_strided((1, 64), (7, 1))
    assert torch.equal(
        ops.int4_gemv_cpu(one_row, one_packed, s4[:1], z4[:1], 64),
        ops.int4_gemv_cpu(one_row.contiguous(), packed[:1], s4[:1], z4[:1], 64),
    )
    with pytest.raises(RuntimeError, match=r"scale must be \[24\] \(one value per weight row\)"):
        ops.int8_gemv_cpu(x, q[:24], scale)
    with pytest.raises(RuntimeError, match="q must have at least one input column"):
        ops.int8_gemv_cpu(x[:, :0], q[:24, :0], scale[:24])
    with pytest.raises(RuntimeError, match="group_size must be a multiple of"):
        ops.int4_gemv_cpu(x, packed, s4, z4, 48)
    stack, stack_scale = q.view(2, 24, 128), scale.view(2, 24)
    for bad in ([2], [-1], [0, 5]):
        with pytest.raises(RuntimeError, match=r"experts\[\d\] = -?\d is outside the stack of 2"):
            ops.int8_experts_gemv_cpu(x[:1], stack, stack_scale, torch.tensor(bad))
    with pytest.raises(RuntimeError, match="x must be a 2-D CPU tensor"):
        ops.int8_gemv_cpu(x[:, :64], q[:24], scale[:24])


def test_int4_group_sizes_the_kernel_does_not_step_keep_torchs_path():
    """Groups of 16 (no vector step fits): the layer's other paths, here the reference."""
    layer = quantize_(nn.Linear(64, 32, bias=False), Int4WeightOnlyConfig(group_size=16))
    x = torch.randn(1, 64)
    assert not int4_takes(x, 16)
    assert not int4_takes(x, 65536)  # past MAX_GROUP: its int32 group sums could overflow
    assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantize()))


def test_compiled_layers_call_the_kernel_ops_and_equal_eager():
    """A compiled batch-1 step traces whole (``fullgraph``) through the ops and gives
    the eager layers' results exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(
        quantize_(nn.Linear(128, 96), Int8WeightOnlyConfig()),
        nn.SiLU(),
        quantize_(
            nn.Linear(96, 64),
            Int4WeightOnlyConfig(group_size=32 if cpu_gemv._group_step() == 32 else 64),
        ),
    )
    x = torch.randn(1, 128)
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize(
    "name",
    [
        "int8_gemv_cpu",
        "int4_gemv_cpu",
        "int8_experts_gemv_cpu",
        "int4_experts_gemv_cpu",
        "rms_norm_cpu",
    ],
)
def test_op_registrations_pass_opcheck(name):
    torch.manual_seed(0)
    q, scale = quantize_int8_per_channel(torch.randn(3 * 24, 128))
    q, scale = q.view(3, 24, 128), scale.view(3, 24)
    q4, s4, z4 = quantize_int4(torch.randn(3 * 24, 128), 64, False)
    packed, s4, z4 = pack_int4(q4).view(3, 24, 64), s4.view(3, 24, 2), z4.view(3, 24, 2)
    x, experts = torch.randn(2, 128), torch.tensor([2, 0])
    args = {
        "int8_gemv_cpu": (x, q[0], scale[0]),
        "int4_gemv_cpu": (x, packed[0], s4[0], z4[0], 64),
        "int8_experts_gemv_cpu": (x, q, scale, experts),
        "int4_experts_gemv_cpu": (x[:1], packed, s4, z4, experts, 64),
        "rms_norm_cpu": (x, torch.randn(128), 1e-6),
    }[name]
    torch.library.opcheck(getattr(torch.ops.ds_quant, name).default, args)


@settings(max_examples=15, deadline=None)
@given(
    experts=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_experts_ops_equal_the_kernel_per_expert(experts, shared, seed):
    """Row r by expert ``experts[r]`` of the stack (the one input row for all, or a row
    each): what a routed MoE token runs, reading only its experts' weights."""
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_int8_per_channel(torch.randn(4 * 24, 128, generator=g))
    q4, s4, z4 = quantize_int4(torch.randn(4 * 24, 128, generator=g), 64, False)
    q, scale = q.view(4, 24, 128), scale.view(4, 24)
    packed, s4, z4 = pack_int4(q4).view(4, 24, 64), s4.view(4, 24, 2), z4.view(4, 24, 2)
    x = torch.randn(1 if shared else len(experts), 128, generator=g)
    idx = torch.tensor(experts)
    got8 = torch.ops.ds_quant.int8_experts_gemv_cpu(x, q, scale, idx)
    got4 = torch.ops.ds_quant.int4_experts_gemv_cpu(x, packed, s4, z4, idx, 64)
    for r, e in enumerate(experts):
        row = x[0 if shared else r]
        assert torch.equal(got8[r], int8_gemv(row, q[e], scale[e]))
        assert torch.equal(got4[r], int4_gemv(row, packed[e], s4[e], z4[e], 64, 128))


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


PROBE = """
    import warnings
    warnings.simplefilter("always")
    from ds_quant.kernels import cpu_gemv
    print(cpu_gemv.available())
"""


@pytest.mark.slow
def test_build_is_cached_switch_and_missing_compiler(tmp_path):
    """Built once into the cache directory and reused by a later process; with no
    compiler, a warning and torch's ops; the switch turns the kernel off."""
    env = {"DS_QUANT_CACHE_DIR": str(tmp_path)}
    first = run_python(PROBE, env)
    assert first.stdout.strip() == "True", first.stderr
    built = list(tmp_path.glob("cpu_gemv-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    again = run_python(PROBE, env)
    assert again.stdout.strip() == "True" and built[0].stat().st_mtime_ns == stamp
    empty = tmp_path / "empty"
    missing = run_python(PROBE, {"DS_QUANT_CACHE_DIR": str(empty), "CXX": str(empty / "c++")})
    assert missing.stdout.strip() == "False"
    assert "could not be built" in missing.stderr
    off = run_python(PROBE, {**env, "DS_QUANT_CPU_GEMV": "0"})
    assert off.stdout.strip() == "False" and "could not be built" not in off.stderr
    assert list(tmp_path.glob("cpu_gemv-*.so")) == built
    # No writable home cache: the temporary directory's, only if it is this user's own.
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    shared = tmp_path / "tmp" / f"ds-quant-{os.getuid()}"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    unsafe = run_python(
        PROBE,
        {"DS_QUANT_CACHE_DIR": "", "XDG_CACHE_HOME": str(not_a_dir), "TMPDIR": str(shared.parent)},
    )
    assert unsafe.stdout.strip() == "False"
    assert "is not this user's own directory" in unsafe.stderr
    # A direct call loads the kernels itself, or names why they are missing.
    direct = run_python(DIRECT, env)
    assert direct.stdout.strip() == "[[4.0, 4.0]]", direct.stderr[-2000:]
    direct_off = run_python(DIRECT, {**env, "DS_QUANT_CPU_GEMV": "0"})
    assert "the CPU decode kernel is not available" in direct_off.stderr


DIRECT = """
    import torch
    from ds_quant.kernels import cpu_gemv
    q = torch.ones(2, 4, dtype=torch.int8)
    print(cpu_gemv.int8_gemv(torch.ones(1, 4), q, torch.ones(2)).tolist())
"""


def test_backends_force_each_cpu_path_and_refuse_what_they_cannot_run():
    """Backend "cpu_gemv" forces the CPU kernel (any number of rows; an input it cannot
    take, float64 here: an error saying what it needs), "cpu_packed" torch's packed op."""
    torch.manual_seed(0)
    int8 = quantize_(nn.Linear(64, 32, bias=False), Int8WeightOnlyConfig())
    int4 = quantize_(nn.Linear(128, 32, bias=False), Int4WeightOnlyConfig(group_size=64))
    x8, x4 = torch.randn(1, 64), torch.randn(1, 128)
    auto8, auto4 = int8(x8), int4(x4)
    int8.backend = int4.backend = "cpu_gemv"
    assert torch.equal(int8(x8), auto8) and torch.equal(int4(x4), auto4)
    many = torch.randn(MAX_ROWS + 1, 64)
    assert torch.equal(int8(many), int8_gemv(many, int8.weight, int8.weight_scale))
    for layer, x in ((int8, x8.double()), (int4, x4.double())):
        with pytest.raises(ValueError, match="backend 'cpu_gemv' needs CPU float rows"):
            layer(x)
    int8.backend = int4.backend = "cpu_packed"
    unit = torch.ones(32, dtype=torch.bfloat16)
    assert torch.equal(int8(x8), int8_weight_matmul_cpu(x8, int8.weight, int8.weight_scale, unit))
    weight, scales_and_zeros = prepack_int4_cpu(int4.weight, int4.weight_scale, int4.weight_zero)
    assert torch.equal(int4(x4), w4a16_matmul_cpu(x4, weight, scales_and_zeros, 64, 128))


def test_the_build_uses_the_widest_instruction_set_the_cpu_has():
    """1 AVX2, 2 AVX512BW, 3 AVX512BW with VNNI (or what the re-run below asked for)."""
    flags = cpu_flags()
    widest = 3 if {"avx512bw", "avx512_vnni"} <= flags else 2 if "avx512bw" in flags else 1
    assert cpu_gemv._load() == int(os.environ.get("DS_QUANT_TEST_ISA", widest))


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "isa"),
    [("-march=haswell", 1), ("-march=native -mno-avx512vnni -mno-avx512bf16", 2)],
    ids=["avx2", "avx512bw-without-vnni"],
)
def test_other_instruction_sets_match_the_reference(flags, isa, tmp_path):
    """The kernel's AVX2 and AVX512BW (no VNNI, no BF16 dot products) paths, built where
    the CPU runs them: this module's other tests, in a process that loads that build."""
    needed = {1: {"avx2", "fma"}, 2: {"avx512bw", "avx512f"}}[isa]
    if not needed <= cpu_flags():
        pytest.skip(f"needs a CPU with {sorted(needed)}")
    if os.environ.get("DS_QUANT_TEST_FLAGS"):
        pytest.skip("this process already runs one instruction set's build")
    env = {
        "DS_QUANT_TEST_FLAGS": flags,
        "DS_QUANT_TEST_ISA": str(isa),
        "DS_QUANT_CACHE_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            __file__,
            "-q",
            "-m",
            "not slow",
            "-p",
            "no:cacheprovider",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and " skipped" not in done.stdout
