"""Bad input raises ValueError/TypeError naming the argument and what is allowed."""

import ds_attention
import pytest
import torch


def qkv(b=1, sq=8, sk=8, h=4, h_kv=4, d=16, dv=16, dtype=torch.float32):
    return (
        torch.randn(b, sq, h, d, dtype=dtype),
        torch.randn(b, sk, h_kv, d, dtype=dtype),
        torch.randn(b, sk, h_kv, dv, dtype=dtype),
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"h": 4, "h_kv": 3}, "multiple of k/v heads"),
        ({"dtype": torch.float64}, "allowed: float16, bfloat16, float32"),
        ({"d": 300, "dv": 16}, r"allowed: 1\.\.256"),
        ({"dv": 512}, r"v head_dim is 512; allowed"),
    ],
)
def test_bad_shapes_and_dtypes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ds_attention.attention(*qkv(**kwargs))


def test_mismatched_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k head_dim 8 != q head_dim 16"):
        ds_attention.attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="k seqlen 8 != v seqlen 7"):
        ds_attention.attention(q, k, v[:, :7])
    with pytest.raises(ValueError, match="must have 4 dims"):
        ds_attention.attention(q[0], k, v)
    with pytest.raises(ValueError, match="share a dtype"):
        ds_attention.attention(q.half(), k, v)


def test_bad_window_and_backend():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="window left must be >= 0"):
        ds_attention.attention(q, k, v, window=(-1, 0))
    with pytest.raises(ValueError, match="window must be None, an int or a"):
        ds_attention.attention(q, k, v, window=(1, 2, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        ds_attention.attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="softmax_scale must be > 0"):
        ds_attention.attention(q, k, v, softmax_scale=0.0)


def test_bad_block_mask_and_cu_seqlens():
    q, k, v = qkv(sq=40, sk=40)
    with pytest.raises(ValueError, match=r"block_mask must have shape \(1 or 1, 1 or 4, 3, 3\)"):
        ds_attention.attention(
            q, k, v, block_mask=torch.ones(1, 1, 2, 3, dtype=torch.bool), block_size=16
        )
    with pytest.raises(ValueError, match="block_mask must be a bool tensor"):
        ds_attention.attention(q, k, v, block_mask=torch.ones(1, 1, 1, 1), block_size=64)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        ds_attention.attention(
            q, k, v, block_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=48
        )
    with pytest.raises(ValueError, match="end at the packed length 40"):
        ds_attention.attention(q, k, v, cu_seqlens=torch.tensor([0, 10, 30], dtype=torch.int32))
    q2, k2, v2 = qkv(b=2)
    with pytest.raises(ValueError, match="batch must be 1"):
        ds_attention.attention(q2, k2, v2, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


def test_bad_block_selection_arguments():
    scores = torch.randn(1, 2, 3, 4)
    cand = torch.ones(3, 4, dtype=torch.bool)
    local = torch.tensor([0, 1, 3])
    select = ds_attention.select_blocks
    with pytest.raises(ValueError, match=r"scores must be a \(batch, heads, q_rows, k_blocks\)"):
        select(scores[0], cand, local, 0.5, 1)
    with pytest.raises(ValueError, match=r"candidates must be a bool tensor of shape .* \(3, 4\)"):
        select(scores, cand[:2], local, 0.5, 1)
    with pytest.raises(ValueError, match="candidates must be a bool tensor"):
        select(scores, cand.long(), local, 0.5, 1)
    with pytest.raises(ValueError, match=r"local must be an integer tensor of shape \(3,\)"):
        select(scores, cand, local.float(), 0.5, 1)
    for keep in (0.0, 1.5, 0, True, "2"):
        with pytest.raises(ValueError, match=r"keep must be a float in \(0, 1\] or an int >= 1"):
            select(scores, cand, local, keep, 1)
    with pytest.raises(ValueError, match="local_blocks must be an int >= 0, got -1"):
        select(scores, cand, local, 2, -1)


@pytest.mark.parametrize(
    "module",
    [
        ds_attention.Attention(32, 4),
        ds_attention.SparseAttention(32, 4, block_size=16),
        ds_attention.NativeSparseAttention(32, 4, block_size=16),
    ],
    ids=["dense", "sparse", "nsa"],
)
def test_modules_refuse_input_without_a_batch_dimension(module):
    with pytest.raises(ValueError, match=r"x must be \(batch, seqlen, dim\), got shape \(5, 32\)"):
        module(torch.randn(5, 32))
    with pytest.raises(ValueError, match=r"x must be \(batch, seqlen, dim\)"):
        module(torch.randn(5, 32), cache=ds_attention.KVCache(8))
