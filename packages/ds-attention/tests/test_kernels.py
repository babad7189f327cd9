"""The Triton kernel family against the float32 reference, forward and backward.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1) at
small shapes; there the interpreter cannot compute bf16 tl.dot correctly, so bf16 dots
are upcast to float32 in interpreter mode only (every other step, including the bf16
loads, P's rounding to bf16 and bf16 stores, runs as on the GPU). The larger shapes at
the bottom run the native paths on CUDA (marker ``gpu``).
"""

import ds_attention
import pytest
import torch
from attn_testutils import attn, check_close, rand_qkv, reference

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

CASES = {
    # name: (b, sq, sk, h, h_kv, d_qk, d_v, mask kwargs)
    "dense": (2, 33, 40, 2, 2, 16, 16, {"causal": False}),
    "causal": (2, 37, 37, 4, 2, 16, 16, {"causal": True}),
    "causal_kv_longer": (1, 20, 45, 2, 2, 24, 8, {"causal": True}),
    "causal_q_longer": (1, 45, 20, 2, 1, 16, 16, {"causal": True}),
    "window_left": (1, 50, 50, 2, 2, 16, 16, {"causal": True, "window": 7}),
    "window_both": (1, 33, 33, 2, 2, 16, 16, {"causal": False, "window": (3, 17)}),
    "window_right_only": (1, 33, 33, 2, 1, 16, 16, {"causal": False, "window": (None, 5)}),
    "gqa_4to1": (1, 24, 24, 4, 1, 16, 16, {"causal": True}),
    "mla_192_128": (1, 20, 20, 2, 2, 192, 128, {"causal": True}),
    "seqlen_1": (2, 1, 19, 2, 2, 16, 16, {"causal": True}),
    "softmax_scale": (1, 18, 18, 2, 2, 16, 16, {"causal": True, "softmax_scale": 0.5}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name, dtype):
    b, sq, sk, h, h_kv, d_qk, d_v, kw = CASES[name]
    q, k, v = rand_qkv(b, sq, sk, h, h_kv, d_qk, d_v, dtype, device=DEVICE)
    check_close(attn("triton", **kw), q, k, v, kw, dtype)


def _block_mask(b, h, nq, nk, seed, density=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, nq, nk, generator=g) < density


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse(dtype, causal):
    q, k, v = rand_qkv(2, 40, 40, 4, 2, 16, 16, dtype, device=DEVICE)
    bm = _block_mask(2, 4, 3, 3, seed=1).to(DEVICE)
    kw = {"causal": causal, "block_mask": bm, "block_size": 16}
    check_close(attn("triton", **kw), q, k, v, kw, dtype)


def test_block_sparse_broadcast_layout_and_larger_blocks():
    q, k, v = rand_qkv(2, 70, 70, 2, 1, 16, 16, torch.float32, device=DEVICE)
    bm = _block_mask(1, 1, 3, 3, seed=2).to(DEVICE)
    kw = {"causal": True, "window": 40, "block_mask": bm, "block_size": 32}
    check_close(attn("triton", **kw), q, k, v, kw, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen(dtype):
    q, k, v = rand_qkv(1, 50, 50, 2, 1, 16, 16, dtype, device=DEVICE)
    cu = torch.tensor([0, 1, 18, 18, 50], dtype=torch.int32, device=DEVICE)
    kw = {"causal": True, "window": (9, None), "cu_seqlens": cu}
    check_close(attn("triton", **kw), q, k, v, kw, dtype)


def test_varlen_separate_q_and_k_lengths_with_blocks():
    q, k, v = rand_qkv(1, 21, 47, 2, 2, 16, 16, torch.float32, device=DEVICE)
    cu_q = torch.tensor([0, 5, 21], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 20, 47], dtype=torch.int32, device=DEVICE)
    bm = _block_mask(2, 2, 1, 2, seed=3, density=0.7).to(DEVICE)
    kw = {"causal": True, "cu_seqlens": (cu_q, cu_k), "block_mask": bm, "block_size": 16}
    check_close(attn("triton", **kw), q, k, v, kw, torch.float32)


def test_return_lse_matches_reference():
    q, k, v = rand_qkv(1, 30, 30, 2, 2, 16, 16, torch.float32, device=DEVICE)
    out, lse = ds_attention.attention(q, k, v, window=4, return_lse=True, backend="triton")
    ref_out, ref_lse = reference(q, k, v, causal=True, window=4)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_are_zero_with_finite_grads():
    q, k, v = rand_qkv(1, 30, 10, 2, 2, 16, 16, torch.float32, device=DEVICE, requires_grad=True)
    out, lse = ds_attention.attention(q, k, v, causal=True, return_lse=True, backend="triton")
    assert torch.all(out[:, :20] == 0) and torch.isneginf(lse[:, :, :20]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.all(q.grad[:, :20] == 0)


def test_masked_key_tiles_are_never_read():
    """Skipping, not compute-and-discard: NaN in V's fully masked tiles (0 * NaN would
    poison the output) leaves every query that cannot see them finite."""
    tile = 16 if DEVICE == "cpu" else 64
    s = 4 * tile
    q, k, v = rand_qkv(1, s, s, 1, 1, 16, 16, torch.float32, device=DEVICE)
    v_nan = v.clone()
    v_nan[:, tile:] = float("nan")  # causal: the first query tile never sees these
    out = ds_attention.attention(q, k, v_nan, causal=True, backend="triton")
    assert torch.isfinite(out[:, :tile]).all()
    v_nan = v.clone()
    v_nan[:, :tile] = float("nan")  # window: the last query tile never sees these
    out = ds_attention.attention(q, k, v_nan, causal=True, window=tile - 1, backend="triton")
    assert torch.isfinite(out[:, -tile:]).all()
    bm = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=DEVICE)
    bm[..., 2] = False
    v_nan = v.clone()
    v_nan[:, 2 * tile : 3 * tile] = float("nan")  # block-sparse: key block 2 is listed nowhere
    out = ds_attention.attention(
        q, k, v_nan, causal=False, block_mask=bm, block_size=tile, backend="triton"
    )
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "kw",
    [
        {"causal": True},
        {"causal": False},
        {"causal": True, "window": 256},
        {"causal": False, "window": (128, 64)},
    ],
    ids=str,
)
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (192, 128)], ids=str)
def test_kernel_large_gpu(dtype, kw, dims):
    q, k, v = rand_qkv(2, 1000, 1000, 8, 2, dims[0], dims[1], dtype, device="cuda")
    check_close(attn("triton", **kw), q, k, v, kw, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_block_sparse_and_varlen_large_gpu(dtype):
    q, k, v = rand_qkv(1, 2000, 2000, 8, 2, 128, 128, dtype, device="cuda")
    cu = torch.tensor([0, 700, 701, 2000], dtype=torch.int32, device="cuda")
    bm = _block_mask(3, 8, 11, 11, seed=4, density=0.3).cuda()
    kw = {"causal": True, "cu_seqlens": cu, "block_mask": bm, "block_size": 128}
    check_close(attn("triton", **kw), q, k, v, kw, dtype)


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)], ids=str)
@pytest.mark.parametrize(
    "kw",
    [
        {"causal": True, "window": (9, None)},
        {"causal": False, "window": (5, 20)},
        {"causal": True, "block": True},
        {"causal": True, "varlen": True},
    ],
    ids=["window", "two-sided", "block-sparse", "varlen"],
)
def test_unequal_tile_shapes(monkeypatch, tiles, kw):
    """On the GPU the backward uses BLOCK_M != BLOCK_N; exercise that in the interpreter."""
    from ds_attention.kernels import flash

    monkeypatch.setattr(flash, "_tiles", lambda *a, **k: (*tiles, 4, 2))
    kw = dict(kw)
    q, k, v = rand_qkv(1, 70, 70, 2, 1, 16, 16, torch.float32, device=DEVICE)
    if kw.pop("block", False):
        kw["block_mask"] = _block_mask(1, 2, 3, 3, seed=7).to(DEVICE)
        kw["block_size"] = 32
    if kw.pop("varlen", False):
        kw["cu_seqlens"] = torch.tensor([0, 33, 34, 70], dtype=torch.int32, device=DEVICE)
    check_close(attn("triton", **kw), q, k, v, kw, torch.float32)
