"""Paged decode: the Triton kernel and the torch reference against dense attention."""

import ds_attention
import pytest
import torch
from ds_attention.decode import paged_decode_attention
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def paged_problem(lens, heads, kv_heads, d_qk, d_v, page, dtype, seed=0, device=DEVICE):
    """Scatter each sequence's K/V into shuffled pages; return the dense K/V as well."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(-(-n // page) for n in lens))
    num_blocks = len(lens) * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)
    k_cache = torch.randn(num_blocks, page, kv_heads, d_qk, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, page, kv_heads, d_v, generator=g).to(dtype)
    table = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    for b in range(len(lens)):
        table[b] = perm[b * max_blocks : (b + 1) * max_blocks]
    q = torch.randn(len(lens), heads, d_qk, generator=g).to(dtype)
    to = lambda t: t.to(device)  # noqa: E731
    dense = []  # on device too: the dense comparison must not mix devices
    for b, n in enumerate(lens):
        blocks = table[b].long()
        k, v = k_cache[blocks].flatten(0, 1)[:n], v_cache[blocks].flatten(0, 1)[:n]
        dense.append((to(k), to(v)))
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return to(q), to(k_cache), to(v_cache), to(table), to(lens_t), dense


@settings(max_examples=8)
@given(
    lens=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    kv_heads=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 3]),
    dims=st.sampled_from([(16, 16), (24, 8)]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
def test_paged_decode_matches_dense(lens, kv_heads, groups, dims, dtype):
    heads = kv_heads * groups
    q, kc, vc, table, lens_t, dense = paged_problem(lens, heads, kv_heads, *dims, 16, dtype)
    got = paged_decode_attention(q, kc, vc, table, lens_t, backend="triton").float()
    ref = paged_decode_attention(q, kc, vc, table, lens_t, backend="reference").float()
    cpu = paged_decode_attention(q, kc, vc, table, lens_t, backend="torch").float()
    for b, (k, v) in enumerate(dense):
        if k.shape[0] == 0:
            assert torch.all(got[b] == 0) and torch.all(ref[b] == 0) and torch.all(cpu[b] == 0)
            continue
        want = ds_attention.attention(
            q[b, None, None].float(), k[None].float(), v[None].float(), causal=False,
            backend="reference",
        )[0, 0]  # fmt: skip
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[b], want, atol=tol, rtol=0)
        torch.testing.assert_close(ref[b], want, atol=tol, rtol=0)
        torch.testing.assert_close(cpu[b], want, atol=tol, rtol=0)


def test_paged_decode_bf16_and_other_page_size_reference():
    q, kc, vc, table, lens_t, _ = paged_problem([5, 33], 4, 2, 16, 16, 32, torch.bfloat16)
    got = paged_decode_attention(q, kc, vc, table, lens_t, backend="triton").float()
    ref = paged_decode_attention(q, kc, vc, table, lens_t, backend="reference").float()
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)
    q, kc, vc, table, lens_t, _ = paged_problem([5, 13], 2, 1, 8, 8, 5, torch.float32)
    out = paged_decode_attention(q, kc, vc, table, lens_t)  # default: torch for this page size
    ref = paged_decode_attention(q, kc, vc, table, lens_t, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="power-of-two block_size"):
        paged_decode_attention(q, kc, vc, table, lens_t, backend="triton")


def test_default_backend_falls_back_to_torch_for_pages_triton_cannot_take(monkeypatch):
    from ds_attention import decode

    monkeypatch.setattr(decode, "triton_available", lambda: True)
    assert decode._auto_backend(True, 16) == "triton"
    assert decode._auto_backend(True, 128) == "triton"
    for page in (5, 8, 24):  # not a power of two, or below tl.dot's 16
        assert decode._auto_backend(True, page) == "torch"
    assert decode._auto_backend(False, 16) == "torch"
    # On this device, the default takes any page size; an explicit "triton" says why not.
    q, kc, vc, table, lens_t, _ = paged_problem([3, 20], 4, 2, 16, 16, 8, torch.float32)
    out = paged_decode_attention(q, kc, vc, table, lens_t)
    ref = paged_decode_attention(q, kc, vc, table, lens_t, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="power-of-two block_size >= 16, got 8"):
        paged_decode_attention(q, kc, vc, table, lens_t, backend="triton")


def test_paged_decode_bad_input():
    q, kc, vc, table, lens_t, _ = paged_problem([5, 20], 4, 2, 16, 16, 16, torch.float32)
    with pytest.raises(ValueError, match=r"context_lens must lie in 0\.\.max_blocks"):
        paged_decode_attention(q, kc, vc, table, lens_t * 10)
    with pytest.raises(ValueError, match="must be a multiple of cache kv_heads"):
        paged_decode_attention(q[:, :3], kc, vc, table, lens_t)
    with pytest.raises(ValueError, match="block_table must be an int32 tensor"):
        paged_decode_attention(q, kc, vc, table[:1], lens_t)
    with pytest.raises(ValueError, match="k_cache must be"):
        paged_decode_attention(q, kc[0], vc, table, lens_t)


@pytest.mark.gpu
def test_paged_decode_large_gpu():
    lens = [4096] * 8 + [1, 77]
    q, kc, vc, table, lens_t, _ = paged_problem(lens, 32, 8, 128, 128, 16, torch.bfloat16)
    got = paged_decode_attention(q, kc, vc, table, lens_t, backend="triton").float()
    ref = paged_decode_attention(q, kc, vc, table, lens_t, backend="reference").float()
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)


def shared_latent_problem(lens, heads, latent, rope, page, dtype, seed=0):
    """MLA's paged cache: one kv head of (latent + rope) per token; values = the latent.
    Also returns a table with one spare column past every sequence's pages."""
    q, kc, _, table, lens_t, dense = paged_problem(
        lens, heads, 1, latent + rope, latent, page, dtype, seed
    )
    spare = torch.full((table.shape[0], 1), kc.shape[0] - 1, dtype=table.dtype, device=table.device)
    return q, kc, torch.cat((table, spare), dim=1), lens_t, dense


@settings(max_examples=12, deadline=None)
@given(
    lens=st.lists(st.integers(0, 50), min_size=1, max_size=4),
    heads=st.sampled_from([1, 4, 6]),
    dims=st.sampled_from([(16, 16), (32, 8)]),
    page=st.sampled_from([16, 32]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_shared_latent_decode_matches_dense(lens, heads, dims, page, dtype, seed):
    """v_cache=None: values are the keys' leading v_head_dim channels (MLA's absorbed
    decode); every backend reads the pool in place and equals dense attention over the
    gathered context, whatever the block order, page size and mix of lengths."""
    latent, rope = dims
    q, kc, table, lens_t, dense = shared_latent_problem(
        lens, heads, latent, rope, page, dtype, seed
    )
    outs = {
        backend: paged_decode_attention(
            q, kc, None, table, lens_t, v_head_dim=latent, softmax_scale=0.3, backend=backend
        ).float()
        for backend in ("torch", "reference", "triton")
    }
    for b, (k, _) in enumerate(dense):
        if k.shape[0] == 0:
            for out in outs.values():
                assert torch.all(out[b] == 0)
            continue
        k = k.float()
        want = ds_attention.attention(
            q[b, None, None].float(), k[None], k[None, ..., :latent], causal=False,
            softmax_scale=0.3, backend="reference",
        )[0, 0]  # fmt: skip
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for backend, out in outs.items():
            torch.testing.assert_close(out[b], want, atol=tol, rtol=0, msg=backend)


def test_shared_latent_bad_input():
    q, kc, table, lens_t, _ = shared_latent_problem([5, 20], 4, 16, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="needs v_head_dim"):
        paged_decode_attention(q, kc, None, table, lens_t)
    with pytest.raises(ValueError, match=r"v_head_dim=40 must lie in 1\.\.32"):
        paged_decode_attention(q, kc, None, table, lens_t, v_head_dim=40)
    with pytest.raises(ValueError, match="only for v_cache=None"):
        paged_decode_attention(q, kc, kc, table, lens_t, v_head_dim=16)


@settings(max_examples=15, deadline=None)
@given(
    lens=st.lists(st.integers(0, 50), min_size=1, max_size=5),
    kv_heads=st.sampled_from([1, 2, 4]),
    groups=st.sampled_from([1, 3]),
    page=st.sampled_from([4, 16]),
    seed=st.integers(0, 2**16),
)
def test_float32_grouped_decode_on_cpu_matches_the_reference(lens, kv_heads, groups, page, seed):
    """The CPU default for float32 MHA/GQA (one SDPA call over the gathered pages, query
    heads grouped over their kv head) equals the one-sequence-at-a-time reference, for
    batches mixing empty, partial-page and full-page contexts."""
    q, kc, vc, table, lens_t, _ = paged_problem(
        lens, kv_heads * groups, kv_heads, 16, 16, page, torch.float32, seed=seed, device="cpu"
    )
    got = paged_decode_attention(q, kc, vc, table, lens_t, softmax_scale=0.3)
    want = paged_decode_attention(q, kc, vc, table, lens_t, softmax_scale=0.3, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.all(got[lens_t == 0] == 0)


def cpu_problem(lens, shared: bool, page: int, dtype, seed: int):
    """On the CPU: (q, k_cache, v_cache, block_table, context_lens) and the extra keyword
    arguments, for 4 query heads over MLA's shared latent (latent 16 + rope 8) or over 2
    kv heads of 16 channels."""
    if shared:
        q, kc, table, lens_t, _ = shared_latent_problem(lens, 4, 16, 8, page, dtype, seed)
        vc, extra = None, {"v_head_dim": 16}
    else:
        q, kc, vc, table, lens_t, _ = paged_problem(
            lens, 4, 2, 16, 16, page, dtype, seed=seed, device="cpu"
        )
        extra = {}
    vc = None if vc is None else vc.cpu()
    return (q.cpu(), kc.cpu(), vc, table.cpu(), lens_t.cpu()), extra


@settings(max_examples=15, deadline=None)
@given(
    lens=st.lists(st.integers(0, 50), min_size=1, max_size=4),
    equal=st.booleans(),
    shared=st.booleans(),
    page=st.sampled_from([4, 16]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_host_context_range_gives_the_same_attention(lens, equal, shared, page, dtype, seed):
    """``context_range`` (the lengths' bounds from the caller, no read of context_lens)
    gives what reading ``context_lens`` gives, equal to the reference, for batches of
    equal contexts (no key mask) and mixed ones, GQA and MLA's shared latent."""
    if equal:
        lens = [lens[0]] * len(lens)
    args, extra = cpu_problem(lens, shared, page, dtype, seed)
    read = paged_decode_attention(*args, softmax_scale=0.3, backend="torch", **extra)
    ranged = paged_decode_attention(
        *args, softmax_scale=0.3, backend="torch", context_range=(min(lens), max(lens)), **extra
    )
    want = paged_decode_attention(*args, softmax_scale=0.3, backend="reference", **extra)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ranged, read, atol=0, rtol=0)
    torch.testing.assert_close(ranged.float(), want.float(), atol=tol, rtol=0)


def test_context_range_bad_input():
    q, kc, vc, table, lens_t, _ = paged_problem([5, 20], 4, 2, 16, 16, 16, torch.float32)
    for bad in [(5,), (5.0, 20), (20, 5), (-1, 20), (5, 33), [5, 20], (True, 20)]:
        with pytest.raises(ValueError, match=r"context_range must be a tuple of two ints"):
            paged_decode_attention(q, kc, vc, table, lens_t, context_range=bad)


@settings(max_examples=12, deadline=None)
@given(
    lens=st.lists(st.integers(0, 50), min_size=1, max_size=4),
    shared=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    page=st.sampled_from([4, 16]),
    seed=st.integers(0, 2**16),
)
def test_cpu_16bit_decode_is_the_float32_decode_rounded_once(lens, shared, dtype, page, seed):
    """On the CPU, 16-bit q and pages give exactly the float32 path's attention over the
    same (upcast) values, rounded once to the input dtype: no 16-bit products."""
    (q, kc, vc, table, lens_t), extra = cpu_problem(lens, shared, page, dtype, seed)
    got = paged_decode_attention(q, kc, vc, table, lens_t, softmax_scale=0.3, **extra)
    upcast = (q.float(), kc.float(), None if vc is None else vc.float())
    # the float32 reference of the batched-matmul path: the float32 MHA/GQA default
    # is one SDPA call, so the shared-latent form (always batched matmuls) is compared
    # exactly and the grouped form to the reference within float32 rounding
    want = paged_decode_attention(*upcast, table, lens_t, softmax_scale=0.3, **extra)
    assert got.dtype == dtype
    if shared:
        assert torch.equal(got, want.to(dtype))
    else:
        torch.testing.assert_close(got, want.to(dtype), atol=0, rtol=2**-7)
