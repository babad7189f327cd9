"""Block quantization and the compressors: error bounds, unbiasedness, error feedback,
non-finite input, packing, bad input."""

from __future__ import annotations

import pickle

import pytest
import torch
from ds_optim import (
    GradientCompressor,
    Int4GradientCompressor,
    Int8GradientCompressor,
    dequantize_blockwise,
    quantize_blockwise,
)
from ds_optim.blockquant import pack_int4, unpack_int4
from hypothesis import given, settings
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


@st.composite
def gradients(draw, finite: bool = True):
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    log_scale = draw(st.sampled_from([-30, -12, -3, 0, 3, 12]))
    if dtype == torch.float16:
        log_scale = max(-6, min(log_scale, 3))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 10.0**log_scale
    # Some all-zero blocks and mixed magnitudes inside one tensor.
    if draw(st.booleans()):
        x.view(-1)[: x.numel() // 2] = 0.0
    if draw(st.booleans()):
        x.view(-1)[::3] *= 1e4 if dtype != torch.float16 else 10.0
    return x.to(dtype)


def block_steps(q, n):
    """Per-element quantization step (the block's scale), aligned with the flat input."""
    return q.scales.float().repeat_interleave(q.block_size)[:n]


@settings(max_examples=60)
@given(
    x=gradients(),
    bits=st.sampled_from([4, 8]),
    block=st.sampled_from([2, 8, 32, 128]),
    scale_dtype=st.sampled_from([torch.bfloat16, torch.float16]),
)
def test_deterministic_error_is_at_most_half_a_step(x, bits, block, scale_dtype):
    q = quantize_blockwise(x, bits=bits, block_size=block, scale_dtype=scale_dtype)
    out = dequantize_blockwise(q)
    assert out.shape == x.shape and out.dtype == x.dtype
    xf = x.float().reshape(-1)
    step = block_steps(q, xf.numel())
    # An fp16 scale cannot exceed 65504: such blocks overflow, like fp16 math, and
    # must come out non-finite rather than clipped.
    overflow = ~torch.isfinite(step)
    expected_overflow = xf.abs() > 65504 * ((1 << (bits - 1)) - 1)
    if scale_dtype == torch.bfloat16:
        assert not overflow.any()
    else:
        assert (overflow | ~expected_overflow).all()
    assert not torch.isfinite(out.reshape(-1)[overflow]).any()
    ok = ~overflow
    err = (out.float().reshape(-1) - xf).abs()[ok]
    fi = torch.finfo(x.dtype)
    bound = 0.5 * step[ok] * (1 + 1e-5) + xf.abs()[ok] * OUT_ULP[x.dtype] + fi.tiny * fi.eps
    assert torch.isfinite(out.reshape(-1)[ok]).all()
    assert (err <= bound).all(), float((err - bound).max())
    assert q.codes.dtype == torch.uint8
    assert q.codes.numel() == q.scales.numel() * block * bits // 8


def test_all_zero_block_is_exact_and_scale_zero():
    x = torch.zeros(300)
    x[200:] = torch.randn(100)
    q = quantize_blockwise(x, bits=4, block_size=128)
    assert q.scales[0] == 0 and q.scales[1] != 0
    assert torch.equal(dequantize_blockwise(q)[:128], torch.zeros(128))


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_tiny_and_huge_magnitudes_keep_the_bound(scale_dtype):
    hi = 1e30 if scale_dtype == torch.bfloat16 else 4e4
    for mag in (1e-40, 1e-30, 1e-8, hi):
        x = torch.randn(256, generator=torch.Generator().manual_seed(1)) * mag
        q = quantize_blockwise(x, bits=4, block_size=64, scale_dtype=scale_dtype)
        step = block_steps(q, 256)
        assert (step > 0).all()
        assert ((dequantize_blockwise(q) - x).abs() <= 0.5 * step * (1 + 1e-5)).all(), mag


@settings(max_examples=30)
@given(
    x=gradients(),
    bits=st.sampled_from([4, 8]),
    where=st.integers(0, 10**6),
    bad=st.sampled_from([float("inf"), float("-inf"), float("nan")]),
)
def test_non_finite_input_stays_non_finite(x, bits, where, bad):
    x = x.clone()
    i = where % x.numel()
    x.view(-1)[i] = bad
    comp = (Int4GradientCompressor if bits == 4 else Int8GradientCompressor)(block_size=4)
    out = comp.decompress(comp.compress(x, key="k")).reshape(-1)
    assert not torch.isfinite(out[i])
    assert not torch.isfinite(out[(i // 4) * 4 : (i // 4) * 4 + 4]).any()  # whole block marked
    # The residual of that block is untouched and stays finite for the next step.
    assert torch.isfinite(comp.residuals["k"]).all()


def test_fp16_scale_overflow_reads_as_overflow_not_garbage():
    x = torch.full((8,), 1e6)
    q = quantize_blockwise(x, bits=4, block_size=8, scale_dtype=torch.float16)
    assert not torch.isfinite(dequantize_blockwise(q)).any()


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([4, 8]))
def test_stochastic_rounding_is_unbiased(seed, bits):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, generator=gen)
    comp = (Int4GradientCompressor if bits == 4 else Int8GradientCompressor)(
        block_size=64, stochastic_rounding=True, error_feedback=False, seed=seed
    )
    trials = 2000
    # One block per trial: every block has x's scale and its own rounding noise.
    rounded = comp.decompress(comp.compress(x.repeat(trials))).view(trials, 64)
    step = float(x.abs().max()) / (7 if bits == 4 else 127)
    assert ((rounded - x).abs() < step * (1 + 1e-2)).all()
    # Each trial's error has mean 0 and variance <= step^2 / 4: 5 sigma of the mean.
    assert (rounded.mean(0) - x).abs().max() <= 5 * step / (2 * trials**0.5)
    # Stochastic rounding really is random (deterministic rounding would give 0 spread).
    assert rounded.std(0).max() > 0.1 * step


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    steps=st.integers(1, 40),
    stochastic=st.booleans(),
    bits=st.sampled_from([4, 8]),
    n=st.integers(1, 300),
)
def test_error_feedback_sum_stays_within_one_step(seed, steps, stochastic, bits, n):
    gen = torch.Generator().manual_seed(seed)
    cls = Int4GradientCompressor if bits == 4 else Int8GradientCompressor
    comp = cls(block_size=32, stochastic_rounding=stochastic, error_feedback=True, seed=seed)
    true_sum = torch.zeros(n, dtype=torch.float64)
    sent_sum = torch.zeros(n, dtype=torch.float64)
    for _ in range(steps):
        g = torch.randn(n, generator=gen) * float(torch.rand((), generator=gen) * 3 + 0.01)
        q = comp.compress(g, key=0)
        true_sum += g.double()
        sent_sum += comp.decompress(q).double()
    last_step = block_steps(q, n).double()
    assert ((sent_sum - true_sum).abs() <= last_step * (1 + 1e-4) + 1e-5).all()


def test_without_error_feedback_the_sum_drifts_more():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(128, generator=gen)
    fb = Int4GradientCompressor(128, stochastic_rounding=False, error_feedback=True)
    nofb = Int4GradientCompressor(128, stochastic_rounding=False, error_feedback=False)
    a = sum(fb.decompress(fb.compress(g, key=0)) for _ in range(50))
    b = sum(nofb.decompress(nofb.compress(g, key=0)) for _ in range(50))
    assert (a - 50 * g).abs().max() < 0.2 * (b - 50 * g).abs().max()


@settings(max_examples=30)
@given(
    codes=st.lists(st.integers(-8, 7), min_size=1, max_size=64).filter(lambda c: len(c) % 2 == 0)
)
def test_pack_unpack_int4_round_trip(codes):
    t = torch.tensor(codes, dtype=torch.int8)
    packed = pack_int4(t)
    assert packed.dtype == torch.uint8 and packed.numel() == len(codes) // 2
    assert torch.equal(unpack_int4(packed), t)
    assert int(packed[0]) == (codes[0] + 8) | ((codes[1] + 8) << 4)


def test_int4_payload_is_7_7x_smaller_than_fp32():
    x = torch.randn(128 * 64)
    q = Int4GradientCompressor().compress(x)
    assert x.numel() * 4 / q.nbytes == pytest.approx(512 / 66)


@pytest.mark.parametrize("bad", [0, -2, 3, 127, 1.5, True, "128"])
def test_bad_block_size_is_rejected(bad):
    with pytest.raises((ValueError, TypeError), match="block_size"):
        Int4GradientCompressor(block_size=bad)
    with pytest.raises((ValueError, TypeError), match="block_size"):
        quantize_blockwise(torch.ones(4), block_size=bad)


def test_other_bad_input():
    with pytest.raises(ValueError, match="scale_dtype"):
        Int4GradientCompressor(scale_dtype=torch.float32)
    with pytest.raises(TypeError, match="floating-point"):
        Int4GradientCompressor().compress(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="bits"):
        Int4GradientCompressor().decompress(Int8GradientCompressor().compress(torch.ones(4)))
    with pytest.raises(ValueError, match="bits"):
        quantize_blockwise(torch.ones(4), bits=3)


def test_compressors_satisfy_the_protocol_and_resume_exactly():
    for cls in (Int4GradientCompressor, Int8GradientCompressor):
        a = cls(block_size=16, seed=3)
        assert isinstance(a, GradientCompressor)
        gen = torch.Generator().manual_seed(0)
        grads = [torch.randn(40, generator=gen) for _ in range(6)]
        for g in grads[:3]:
            a.compress(g, key="b")
        b = pickle.loads(pickle.dumps(a))
        c = cls(block_size=16, seed=99)
        c.load_state_dict(a.state_dict())
        for g in grads[3:]:
            qa, qb, qc = a.compress(g, key="b"), b.compress(g, key="b"), c.compress(g, key="b")
            assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.codes, qc.codes)
            assert torch.equal(qa.scales, qb.scales) and torch.equal(qa.scales, qc.scales)


def test_residual_is_dropped_when_a_key_changes_size():
    comp = Int4GradientCompressor(block_size=8, stochastic_rounding=False)
    comp.compress(torch.randn(16), key=0)
    x = torch.randn(24)
    fresh = Int4GradientCompressor(block_size=8, stochastic_rounding=False)
    assert torch.equal(comp.compress(x, key=0).codes, fresh.compress(x, key=0).codes)
