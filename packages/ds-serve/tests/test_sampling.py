"""The per-request sampler."""

from __future__ import annotations

import pytest
import torch
from ds_serve.sampling import SamplingParams, sample
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=60)
@given(
    rows=st.integers(1, 9).flatmap(
        lambda width: st.lists(
            st.lists(
                st.sampled_from([-1.0, 0.0, 2.0, float("-inf"), float("nan")]),
                min_size=width,
                max_size=width,
            ),
            min_size=1,
            max_size=4,
        )
    )
)
def test_temperature_zero_is_argmax(rows):
    # Few distinct values: ties, -inf and NaN rows are common; argmax takes the first
    # of tied maxima and counts NaN as the largest.
    logits = torch.tensor(rows)
    params = [SamplingParams(temperature=0.0)] * len(rows)
    assert sample(logits, params) == logits.argmax(-1).tolist()


@settings(max_examples=40)
@given(seed=st.integers(0, 2**32), top_k=st.integers(1, 5), vocab=st.integers(6, 40))
def test_top_k_draws_only_among_the_k_largest(seed, top_k, vocab):
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed))
    allowed = set(torch.topk(logits[0], top_k).indices.tolist())
    params = SamplingParams(temperature=1.5, top_k=top_k, seed=seed)
    for _ in range(10):
        assert sample(logits, [params])[0] in allowed


@settings(max_examples=40)
@given(seed=st.integers(0, 2**32), top_p=st.floats(0.05, 0.99))
def test_top_p_draws_only_from_the_nucleus(seed, top_p):
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(seed)) * 3
    probs, order = torch.softmax(logits[0], -1).sort(descending=True)
    before = torch.cumsum(probs, -1) - probs
    nucleus = set(order[before < top_p].tolist())
    params = SamplingParams(temperature=1.0, top_p=top_p, seed=seed)
    for _ in range(10):
        assert sample(logits, [params])[0] in nucleus


def test_a_seed_makes_a_request_reproducible_whatever_shares_its_batch():
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randn(100, generator=gen) for _ in range(20)]
    alone = SamplingParams(temperature=1.0, seed=7)
    batched = SamplingParams(temperature=1.0, seed=7)
    other = SamplingParams(temperature=1.0)
    solo = [sample(row[None], [alone])[0] for row in rows]
    together = [sample(torch.stack([torch.randn(100), row]), [other, batched])[1] for row in rows]
    assert solo == together


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    params = SamplingParams(temperature=1.0, seed=0)
    draws = [sample(logits, [params])[0] for _ in range(2000)]
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert freq == pytest.approx([0.7, 0.2, 0.1], abs=0.04)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_params_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_logits_shape_must_match_the_params():
    with pytest.raises(ValueError, match="num_seqs"):
        sample(torch.zeros(2, 5), [SamplingParams()])
