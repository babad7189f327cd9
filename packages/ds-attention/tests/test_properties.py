"""Hypothesis: random shapes, windows and block layouts through the Triton kernels.

Invariants: the kernel equals the fp32 reference (forward and backward); a query never
attends to a masked key (perturbing keys masked for a row leaves that row bit-identical);
a row that sees no key is zeros, not NaN; packing with cu_seqlens equals padding.
"""

import ds_attention
import pytest
import torch
from attn_testutils import attn, check_close, rand_qkv, reference
from ds_attention.masks import dense_mask
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 16

side = st.one_of(st.none(), st.integers(0, 40))


@st.composite
def problems(draw):
    b = draw(st.integers(1, 2))
    sq = draw(st.sampled_from([1, 5, 16, 17, 33]))
    sk = draw(st.sampled_from([1, 7, 16, 31, 40]))
    h_kv, groups = draw(st.sampled_from([(1, 1), (1, 3), (2, 2)]))
    d_qk = draw(st.sampled_from([8, 16, 24]))
    d_v = draw(st.sampled_from([8, 16]))
    kw = {"causal": draw(st.booleans())}
    window = draw(st.one_of(st.none(), st.integers(0, 20), st.tuples(side, side)))
    if window is not None:
        kw["window"] = window
    if draw(st.booleans()):
        nq, nk = -(-sq // BLOCK), -(-sk // BLOCK)
        heads = draw(st.sampled_from([1, h_kv * groups]))
        bits = draw(
            st.lists(st.booleans(), min_size=b * heads * nq * nk, max_size=b * heads * nq * nk)
        )
        kw["block_mask"] = torch.tensor(bits).view(b, heads, nq, nk).to(DEVICE)
        kw["block_size"] = BLOCK
    seed = draw(st.integers(0, 2**16))
    return (b, sq, sk, h_kv * groups, h_kv, d_qk, d_v), kw, seed


@settings(max_examples=12)
@given(problems())
def test_kernel_equals_reference_forward_and_backward(problem):
    shape, kw, seed = problem
    q, k, v = rand_qkv(*shape, torch.float32, device=DEVICE, seed=seed)
    check_close(attn("triton", **kw), q, k, v, kw, torch.float32)


def _full_mask(shape, kw):
    b, sq, sk, h = shape[:4]
    m = dense_mask(
        sq, sk, causal=kw["causal"], window=ds_attention.validate.normalize_window(kw.get("window")),
        block_mask=kw.get("block_mask"), block_size=kw.get("block_size", BLOCK), device=DEVICE,
    )  # fmt: skip
    if m is None:
        return torch.ones(b, h, sq, sk, dtype=torch.bool, device=DEVICE)
    return m.expand(b, h, sq, sk)


@settings(max_examples=12)
@given(problems(), st.data())
def test_masked_keys_do_not_matter_and_empty_rows_are_zero(problem, data):
    shape, kw, seed = problem
    q, k, v = rand_qkv(*shape, torch.float32, device=DEVICE, seed=seed)
    out = ds_attention.attention(q, k, v, backend="triton", **kw)
    assert torch.isfinite(out).all()
    mask = _full_mask(shape, kw)
    empty = ~mask.any(-1)  # (b, h, sq)
    assert torch.all(out.transpose(1, 2)[empty] == 0)
    row = data.draw(st.integers(0, shape[1] - 1))
    h_kv = shape[4]
    groups = shape[3] // h_kv
    seen = mask[:, :, row].view(shape[0], h_kv, groups, shape[2]).any(2)  # (b, h_kv, sk)
    hidden = (~seen).transpose(1, 2)[..., None]  # (b, sk, h_kv, 1)
    k2 = torch.where(hidden, k + 100 * torch.randn_like(k), k)
    v2 = torch.where(hidden, v - 100 * torch.randn_like(v), v)
    out2 = ds_attention.attention(q, k2, v2, backend="triton", **kw)
    assert torch.equal(out2[:, row], out[:, row])


@settings(max_examples=10)
@given(
    lens=st.lists(st.integers(1, 35), min_size=1, max_size=3),
    window=st.one_of(st.none(), st.integers(0, 12)),
    gqa=st.sampled_from([(2, 1), (2, 2)]),
    seed=st.integers(0, 2**16),
)
def test_packed_equals_padded(lens, window, gqa, seed):
    h, h_kv = gqa
    total, longest = sum(lens), max(lens)
    q, k, v = rand_qkv(1, total, total, h, h_kv, 16, 16, torch.float32, device=DEVICE, seed=seed)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    packed = ds_attention.attention(
        q, k, v, causal=True, window=window, cu_seqlens=cu.to(DEVICE), backend="triton"
    )

    def pad(t):
        out = t.new_zeros(len(lens), longest, *t.shape[2:])
        for i, n in enumerate(lens):
            out[i, :n] = t[0, cu[i] : cu[i] + n]
        return out

    # Right padding with causal masking: real queries never see the padded tail.
    padded = ds_attention.attention(pad(q), pad(k), pad(v), causal=True, window=window,
                                    backend="triton")  # fmt: skip
    for i, n in enumerate(lens):
        torch.testing.assert_close(packed[0, cu[i] : cu[i] + n], padded[i, :n], atol=1e-5, rtol=0)
    ref = reference(q, k, v, causal=True, window=window, cu_seqlens=cu)[0]
    torch.testing.assert_close(packed, ref, atol=1e-4, rtol=0)
