"""Module behaviour: sparse with ratio 1 is dense, the gate's limits, KV-cache decoding,
and the top-k block selection the sparse modules share."""

import ds_attention
import pytest
import torch
from ds_attention import (
    Attention,
    DynamicAttention,
    KVCache,
    NativeSparseAttention,
    SparseAttention,
    select_blocks,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def _x(b=2, s=70, dim=64, seed=0):
    return torch.randn(b, s, dim, generator=torch.Generator().manual_seed(seed))


def test_attention_module_names_and_gqa_shapes():
    m = Attention(64, 8, num_kv_heads=2)
    names = {n for n, _ in m.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= names
    assert m.k_proj.out_features == 16
    assert m(_x()).shape == (2, 70, 64)


def test_sparse_ratio_one_equals_dense():
    torch.manual_seed(0)
    sparse = SparseAttention(64, 4, sparse_ratio=1.0, block_size=16)
    dense = Attention(64, 4)
    dense.load_state_dict(sparse.state_dict())
    x = _x()
    torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    blocks=st.integers(1, 8),
    keep=st.one_of(st.floats(0.01, 1.0), st.integers(1, 9)),
    local_blocks=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_select_blocks_keeps_the_forced_blocks_then_the_best_scores(
    rows, blocks, keep, local_blocks, seed
):
    """Per row: only candidates; block 0 and the local window always; as many blocks as
    the budget (or the forced ones) allow; every other kept block outscores every
    dropped candidate."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 3, rows, blocks, generator=gen)
    local = torch.randint(0, blocks, (rows,), generator=gen)
    candidates = torch.rand(rows, blocks, generator=gen) < 0.7
    layout = select_blocks(scores, candidates, local, keep, local_blocks)
    assert layout.shape == scores.shape and layout.dtype == torch.bool
    assert not (layout & ~candidates).any()
    kb = torch.arange(blocks)
    forced = (kb == 0) | ((kb <= local[:, None]) & (kb > local[:, None] - local_blocks))
    forced &= candidates
    assert (layout | ~forced).all()
    n_cand = candidates.sum(-1)
    budget = torch.ceil(n_cand * keep).long() if isinstance(keep, float) else n_cand.clamp(max=keep)
    want = torch.maximum(budget, forced.sum(-1))
    assert (layout.sum(-1) == want).all()
    chosen = layout & ~forced
    dropped = candidates & ~layout
    low = scores.masked_fill(~chosen, float("inf")).amin(-1)
    high = scores.masked_fill(~dropped, float("-inf")).amax(-1)
    assert (low >= high).all()


def test_sparse_selection_is_real_top_k():
    torch.manual_seed(0)
    m = SparseAttention(64, 4, sparse_ratio=0.25, block_size=16)
    x = _x(s=160)
    q, k, _ = m.project(x)
    layout = m.block_mask(q, k)  # (2, 4, 10, 10)
    assert layout.shape == (2, 4, 10, 10)
    for qb in range(10):
        row = layout[:, :, qb]
        assert row[..., 0].all() and row[..., qb].all(), "first and local blocks are kept"
        assert not row[..., qb + 1 :].any(), "causal: no future blocks"
        n_keep = -(-(qb + 1) // 4)  # ceil(0.25 * candidates)
        forced = 1 if qb == 0 else 2
        assert (row.sum(-1) == max(n_keep, forced)).all()
    # The kept blocks beyond the forced ones are the best-scoring candidates.
    from ds_attention.modules.selection import pooled_block_scores

    scores = pooled_block_scores(q, k, 16)[0, 0, 9]
    free = layout[0, 0, 9].clone()
    free[0] = free[9] = False
    if free.any():
        rest = scores[1:9][~free[1:9]]
        assert scores[free].min() >= rest.max()
    dense = SparseAttention(64, 4, sparse_ratio=1.0, block_size=16)
    dense.load_state_dict(m.state_dict())
    assert not torch.allclose(m(x), dense(x), atol=1e-4), "sparse must drop some blocks"


def test_dynamic_attention_gate_limits():
    torch.manual_seed(0)
    m = DynamicAttention(32, heads=4)
    x = _x(s=9, dim=32)
    with torch.no_grad():
        m.gate[0].weight.zero_()
        m.gate[0].bias.fill_(-1e4)  # sigmoid -> 0: identity
    torch.testing.assert_close(m(x), x)
    with torch.no_grad():
        m.gate[0].bias.fill_(1e4)  # sigmoid -> 1: pure attention
    torch.testing.assert_close(m(x), m.attn(x))


def test_dynamic_window_matches_seed_mask():
    torch.manual_seed(0)
    m = DynamicAttention(32, heads=4, window="dynamic", backend="reference")
    x = _x(b=1, s=12, dim=32)
    q, k, v = m.attn.project(x)
    mask = ds_attention.dynamic_attention_mask(torch.zeros(1, 12, dtype=torch.long), 64)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 8**-0.5
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    attn_out = m.attn.o_proj(torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(2))
    g = m.gate(x)
    torch.testing.assert_close(m(x), g * attn_out + (1 - g) * x, atol=1e-5, rtol=1e-5)


def _decode_equals_full(module, x, prefill):
    full = module(x)
    cache = KVCache(max_length=x.shape[1])
    outs = [module(x[:, :prefill], cache=cache)]
    for t in range(prefill, x.shape[1]):
        outs.append(module(x[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: Attention(32, 4, num_kv_heads=2),
        lambda: Attention(32, 4, window=5),
        lambda: DynamicAttention(32, heads=4),
        lambda: SparseAttention(32, 4, sparse_ratio=1.0, block_size=16),
        lambda: NativeSparseAttention(32, 4, 2, block_size=16, num_selected=64, window=8),
    ],
    ids=["attention", "window", "dynamic", "sparse", "nsa"],
)
def test_kv_cache_decoding_matches_full_forward(factory):
    torch.manual_seed(0)
    with torch.no_grad():
        _decode_equals_full(factory().eval(), _x(b=2, s=37, dim=32), prefill=20)


def test_sparse_decode_uses_selected_blocks():
    torch.manual_seed(0)
    m = SparseAttention(32, 4, sparse_ratio=0.25, block_size=16)
    x = _x(b=1, s=81, dim=32)
    cache = KVCache(128)
    with torch.no_grad():
        m(x[:, :80], cache=cache)
        step = m(x[:, 80:], cache=cache)
        q, _, _ = m.project(x[:, 80:])
        k, v = cache.k[:, :81], cache.v[:, :81]
        layout = m.block_mask(q, k)
        assert 0 < layout.sum() < layout.numel()
        want = ds_attention.attention(
            q, k, v, block_mask=layout, block_size=16, backend="reference"
        )
        torch.testing.assert_close(step, m.o_proj(want.flatten(2)), atol=1e-5, rtol=1e-5)


def test_nsa_trains_and_all_branches_matter():
    torch.manual_seed(0)
    m = NativeSparseAttention(32, 4, 2, block_size=16, num_selected=1, window=8)
    x = _x(b=2, s=53, dim=32).requires_grad_(True)
    out = m(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_cache_overflow_and_bad_module_args():
    cache = KVCache(4)
    m = Attention(16, 2)
    with pytest.raises(ValueError, match="cannot add 5 more"):
        m(_x(b=1, s=5, dim=16), cache=cache)
    with pytest.raises(ValueError, match="sparse_ratio must be in"):
        SparseAttention(16, 2, sparse_ratio=0.0)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="positive divisor of num_heads"):
        Attention(32, 4, num_kv_heads=3)


def test_modules_on_triton_backend_match_sdpa():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    # Triton needs CUDA tensors when CUDA exists (the interpreter runs only without it).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = SparseAttention(32, 2, sparse_ratio=0.5, block_size=16).to(device)
    x = _x(b=1, s=40, dim=32).to(device)
    want = m(x)
    m.backend = "triton"
    torch.testing.assert_close(m(x), want, atol=1e-4, rtol=1e-4)
