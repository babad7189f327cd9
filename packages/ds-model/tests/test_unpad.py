"""Padded batches run as varlen attention through ds-attention: the unpad/pad helper
round-trips, a padded batch (left or right padding, a KV cache holding padded slots,
GQA and MLA, sliding windows) equals each row run alone, all-padding rows stay finite,
and ds-attention, not a dense-mask SDPA call, does the work."""

from __future__ import annotations

import types

import ds_attention
import ds_model
import ds_model.attend
import pytest
import torch
from ds_model import ModelConfig, StaticKVCache
from ds_model.unpad import Padding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA
    "max_position_embeddings": 64,
}
# MLA (d_v 16 != d_qk 24), dense layers only: the attention is what is under test.
MLA = {"vocab_size": 64, "first_k_dense_replace": 2}

SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _model(arch: str, window: int | None, seed: int = 0) -> ds_model.DeepSeekForCausalLM:
    if arch == "llama":
        config = ModelConfig.from_dict({**LLAMA, "sliding_window": window})
    else:
        config = ModelConfig.from_preset("tiny", **MLA, sliding_window=window)
    return ds_model.from_config(config, seed=seed)


@st.composite
def key_masks(draw):
    batch = draw(st.integers(1, 4))
    seqlen_k = draw(st.integers(1, 8))
    seqlen_q = draw(st.integers(1, seqlen_k))
    bits = draw(st.lists(st.booleans(), min_size=batch * seqlen_k, max_size=batch * seqlen_k))
    return torch.tensor(bits).view(batch, seqlen_k), seqlen_q


@SETTINGS
@given(case=key_masks(), dim=st.integers(1, 5))
def test_unpad_pad_round_trip(case, dim):
    key_valid, seqlen_q = case
    batch, seqlen_k = key_valid.shape
    p = Padding.from_key_valid(key_valid, seqlen_q)
    query_valid = key_valid[:, seqlen_k - seqlen_q :]
    q = torch.randn(batch, seqlen_q, 3, dim)
    k = torch.randn(batch, seqlen_k, 2, dim)
    packed_q, packed_k = p.unpad_q(q), p.unpad_k(k)
    assert packed_q.shape == (1, int(query_valid.sum()), 3, dim) and p.total_q == packed_q.shape[1]
    # Row after row, in slot order: exactly what a loop over rows would pack.
    torch.testing.assert_close(packed_q[0], torch.cat([q[b][query_valid[b]] for b in range(batch)]))
    torch.testing.assert_close(packed_k[0], torch.cat([k[b][key_valid[b]] for b in range(batch)]))
    torch.testing.assert_close(p.pad_q(packed_q), q * query_valid[:, :, None, None])
    assert p.cu_seqlens_q.tolist() == [0, *query_valid.sum(1).cumsum(0).tolist()]
    assert p.cu_seqlens_k.tolist() == [0, *key_valid.sum(1).cumsum(0).tolist()]
    assert p.cu_seqlens_q.dtype == p.cu_seqlens_k.dtype == torch.int32


def test_unpad_reads_a_strided_cache_view_and_rejects_wrong_shapes():
    store = torch.randn(2, 10, 1, 4)  # a static cache with 10 slots, 5 written
    key_valid = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 0, 1, 1]], dtype=torch.bool)
    p = Padding.from_key_valid(key_valid, 2)
    view = store[:, :5]
    torch.testing.assert_close(p.unpad_k(view)[0], view[key_valid])
    with pytest.raises(ValueError, match="key/value tensor must be"):
        p.unpad_k(store)
    with pytest.raises(ValueError, match="key_valid must be a"):
        Padding.from_key_valid(key_valid.long(), 2)
    with pytest.raises(ValueError, match="seqlen_q"):
        Padding.from_key_valid(key_valid, 6)


def _padded(rows: list[list[int]], width: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[b, sl], mask[b, sl] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


def _alone(model, row: list[int]) -> torch.Tensor:
    return model(torch.tensor([row])).logits[0]


arch_and_window = st.tuples(st.sampled_from(["llama", "mla"]), st.sampled_from([None, 2, 3]))


@SETTINGS
@given(
    aw=arch_and_window,
    lengths=st.lists(st.integers(1, 7), min_size=2, max_size=3),
    extra=st.integers(0, 2),
    left=st.booleans(),
    seed=st.integers(0, 50),
)
def test_padded_batch_equals_each_row_alone(aw, lengths, extra, left, seed):
    model = _model(*aw, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in lengths]
    ids, mask = _padded(rows, max(lengths) + extra, left)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for b, r in enumerate(rows):
            torch.testing.assert_close(
                logits[b][mask[b].bool()], _alone(model, r), atol=1e-5, rtol=1e-5
            )


@SETTINGS
@given(
    aw=arch_and_window,
    first=st.lists(st.integers(0, 5), min_size=2, max_size=3),
    second=st.data(),
    left=st.booleans(),
    seed=st.integers(0, 50),
)
def test_padded_batch_with_kv_cache_equals_each_row_alone(aw, first, second, left, seed):
    """Two forward calls through one cache, both padded: the cache holds padded slots
    and the second chunk may itself be padded (a row may have no new token at all, or
    none in the first call)."""
    model = _model(*aw, seed=seed)
    batch = len(first)
    more = second.draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch), "more")
    if sum(first) == 0 or sum(more) == 0 or any(a + b == 0 for a, b in zip(first, more)):
        more = [m + 1 for m in more]  # every row has some token, each call some query
    gen = torch.Generator().manual_seed(seed)
    a_rows = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in first]
    b_rows = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in more]
    ids_a, mask_a = _padded(a_rows, max(max(first), 1), left)
    ids_b, mask_b = _padded(b_rows, max(more), left)
    cache = StaticKVCache(
        model.config, batch, ids_a.shape[1] + ids_b.shape[1] + 2, torch.float32, "cpu"
    )
    with torch.no_grad():
        model(ids_a, attention_mask=mask_a, cache=cache)
        out = model(ids_b, attention_mask=torch.cat((mask_a, mask_b), 1), cache=cache).logits
        for b in range(batch):
            if not more[b]:
                continue
            ref = _alone(model, a_rows[b] + b_rows[b])[len(a_rows[b]) :]
            torch.testing.assert_close(out[b][mask_b[b].bool()], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mla"])
def test_padded_single_token_decode_equals_rows_alone(arch):
    # Left-padded prompts, then single-token steps with a (batch, length) key_valid: the
    # path generate() takes (MLA: the absorbed path, not the unpadded fast decode).
    model = _model(arch, None, seed=3)
    rows = [[5, 6, 7, 8, 9], [10, 11]]
    ids, mask = _padded(rows, 5, left=True)
    steps = torch.tensor([[20, 21, 22], [30, 31, 32]])
    cache = StaticKVCache(model.config, 2, 8, torch.float32, "cpu")
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
        outs = []
        for i in range(3):
            mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1)
            outs.append(model(steps[:, i : i + 1], attention_mask=mask, cache=cache).logits[:, 0])
        for b, r in enumerate(rows):
            ref = _alone(model, r + steps[b].tolist())[len(r) :]
            torch.testing.assert_close(torch.stack(outs)[:, b], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mla"])
def test_all_padding_row_gives_finite_output(arch):
    model = _model(arch, 2)
    ids = torch.tensor([[3, 4, 5, 6], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    cache = StaticKVCache(model.config, 2, 6, torch.float32, "cpu")
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=cache).logits
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[0], _alone(model, [3, 4, 5, 6]), atol=1e-5, rtol=1e-5)
        # Next call: the empty row still has no real token; every query is padding in
        # row 1, and in a call where no row has a real query the output is finite too.
        step = model(
            torch.tensor([[7], [0]]), attention_mask=torch.tensor([[1] * 5, [0] * 5]), cache=cache
        ).logits
        assert torch.isfinite(step).all()
        none = model(
            torch.tensor([[0], [0]]),
            attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0], [0] * 6]),
            cache=cache,
        ).logits
        assert torch.isfinite(none).all()


@pytest.mark.parametrize("arch", ["llama", "mla"])
def test_padded_batches_call_ds_attention_not_masked_sdpa(arch, monkeypatch):
    model = _model(arch, 3)
    calls = []
    real = ds_attention.attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("cu_seqlens"))
        return real(*args, **kwargs)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("attend() ran torch SDPA with a dense mask")

    monkeypatch.setattr(ds_attention, "attention", counting)
    monkeypatch.setattr(
        ds_model.attend, "F", types.SimpleNamespace(scaled_dot_product_attention=no_sdpa)
    )
    ids, mask = _padded([[1, 2, 3, 4], [5, 6]], 4, left=True)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    layers = model.config.num_hidden_layers
    assert len(calls) == layers and all(isinstance(c, tuple) for c in calls)
    calls.clear()
    model.generate([[1, 2, 3, 4], [5, 6]], 3)  # padded prefill and two padded decode steps
    assert len(calls) == 3 * layers and all(isinstance(c, tuple) for c in calls)


def test_padded_training_batch_backpropagates():
    model = _model("mla", 2)
    ids, mask = _padded([[1, 2, 3, 4, 5], [6, 7, 8]], 5, left=False)
    labels = ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_key_valid_excludes_other_layouts():
    model = _model("llama", None)
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="at most one of key_valid, mask and cu_seqlens"):
        model.model(
            ids,
            torch.tensor([[0, 1]]),
            key_valid=torch.ones(1, 2, dtype=torch.bool),
            mask=torch.ones(1, 1, 2, 2, dtype=torch.bool),
        )


def test_explicit_mask_still_runs_and_agrees_with_key_valid():
    # DeepSeekModel.forward(mask=...) keeps an arbitrary visibility mask on torch SDPA;
    # for plain left padding it agrees with the varlen path on the real tokens.
    model = _model("llama", None)
    ids, valid = _padded([[1, 2, 3, 4], [5, 6]], 4, left=True)
    valid = valid.bool()
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    mask = (valid[:, None, None, :] & causal) | torch.eye(4, dtype=torch.bool)
    with torch.no_grad():
        dense = model.model(ids, positions, mask=mask)
        varlen = model.model(ids, positions, key_valid=valid)
    torch.testing.assert_close(dense[valid], varlen[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_padded_cpu_decode_shortcut_equals_varlen_path(kv_heads):
    # attend() answers a window-free single-token padded step on CPU with one key-masked
    # SDPA call; backend="sdpa" forces ds-attention's varlen path for the same inputs.
    from ds_model.attend import attend
    from ds_model.unpad import Padding

    gen = torch.Generator().manual_seed(kv_heads)
    q = torch.randn(4, 1, 4, 8, generator=gen)
    k = torch.randn(4, 6, kv_heads, 8, generator=gen)
    v = torch.randn(4, 6, kv_heads, 5, generator=gen)
    key_valid = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 0, 1],  # padding inside the cache
            [0, 0, 0, 0, 0, 1],  # only its new token
            [1, 1, 1, 0, 0, 0],  # its new token is padding: zeros
        ],
        dtype=torch.bool,
    )
    padding = Padding.from_key_valid(key_valid, 1)
    fast = attend(q, k, v, softmax_scale=0.3, padding=padding)
    varlen = attend(q, k, v, softmax_scale=0.3, padding=padding, backend="sdpa")
    torch.testing.assert_close(fast, varlen, atol=1e-6, rtol=1e-6)
    assert torch.equal(fast[3], torch.zeros_like(fast[3]))
