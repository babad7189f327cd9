"""The batched sampler against plain per-row references."""

from __future__ import annotations

import math

import pytest
import torch
from ds_model.sampling import SamplingParams, sample
from hypothesis import given, settings
from hypothesis import strategies as st


def tokens(logits, params, **kwargs) -> list[int]:
    return sample(logits, params, **kwargs).token_ids.tolist()


@settings(max_examples=60, deadline=None)
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
    assert tokens(logits, params) == logits.argmax(-1).tolist()
    with_logprobs = [SamplingParams(temperature=0.0, logprobs=1)] * len(rows)
    assert tokens(logits, with_logprobs) == logits.argmax(-1).tolist()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), top_k=st.integers(1, 5), vocab=st.integers(6, 40))
def test_top_k_draws_only_among_the_k_largest(seed, top_k, vocab):
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed))
    allowed = set(torch.topk(logits[0], top_k).indices.tolist())
    params = SamplingParams(temperature=1.5, top_k=top_k, seed=seed)
    for step in range(10):
        assert tokens(logits, [params], output_ids=[[0] * step])[0] in allowed


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    top_p=st.floats(0.05, 0.99),
    # A wide flat distribution's nucleus outgrows the top-k candidates (full sort); a
    # peaked one's fits them.
    shape=st.sampled_from([(30, 3.0), (3000, 0.05), (3000, 4.0)]),
    top_k=st.sampled_from([0, 5, 2000]),
)
def test_top_p_draws_only_from_the_nucleus(seed, top_p, shape, top_k):
    # vLLM's rule: a token stays while the mass ranked above it is below top_p, over
    # the top-k renormalised distribution when top_k is set.
    vocab, scale = shape
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    ranked, order = logits[0].sort(descending=True)
    if 0 < top_k < vocab:
        ranked, order = ranked[:top_k], order[:top_k]
    probs = torch.softmax(ranked, -1)
    before = torch.cumsum(probs, -1) - probs
    nucleus = set(order[before < top_p].tolist())
    params = SamplingParams(top_p=top_p, top_k=top_k, seed=seed)
    open_row = SamplingParams(seed=seed + 1)
    for step in range(5):
        got = tokens(logits, [params, open_row], output_ids=[[0] * step] * 2)
        assert got[0] in nucleus


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), min_p=st.floats(0.01, 0.9))
def test_min_p_draws_only_tokens_above_the_floor(seed, min_p):
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(seed)) * 3
    probs = torch.softmax(logits[0], -1)
    kept = set((probs >= min_p * probs.max()).nonzero().flatten().tolist())
    params = SamplingParams(min_p=min_p, seed=seed)
    for step in range(10):
        assert tokens(logits, [params], output_ids=[[0] * step])[0] in kept


def test_a_seed_makes_a_request_reproducible_whatever_shares_its_batch():
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randn(100, generator=gen) for _ in range(20)]
    alone = SamplingParams(temperature=1.0, seed=7, top_p=0.9)
    other = SamplingParams(temperature=0.7, top_k=5)
    greedy = SamplingParams(temperature=0.0)
    solo = [tokens(row[None], [alone], output_ids=[[1] * i])[0] for i, row in enumerate(rows)]
    together = [
        tokens(
            torch.stack([torch.randn(100), row, torch.randn(100)]),
            [other, alone, greedy],
            output_ids=[[], [1] * i, [2] * 3],
        )[1]
        for i, row in enumerate(rows)
    ]
    assert solo == together


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    params = SamplingParams(temperature=1.0, seed=0)
    draws = [tokens(logits, [params], output_ids=[[0] * step])[0] for step in range(2000)]
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert freq == pytest.approx([0.7, 0.2, 0.1], abs=0.04)
    # Unseeded requests draw their own seeds, so they differ.
    firsts = {tokens(logits, [SamplingParams()])[0] for _ in range(60)}
    assert firsts == {0, 1, 2}


def reference_processed(logits, p, output, prompt):
    """Penalties, bias and temperature one token at a time, as vLLM documents them."""
    x = logits.clone().double()
    for token, bias in (p.logit_bias or {}).items():
        x[token] += bias
    if len(output) < p.min_tokens:
        for token in p.stop_token_ids:
            x[token] = -math.inf
    for token in range(x.numel()):
        if token in output or token in prompt:
            if x[token] > 0:
                x[token] /= p.repetition_penalty
            else:
                x[token] *= p.repetition_penalty
        count = output.count(token)
        x[token] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    if p.temperature > 0:
        x /= p.temperature
    return x


penalty_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]),
    presence_penalty=st.floats(-2, 2),
    frequency_penalty=st.floats(-2, 2),
    repetition_penalty=st.floats(0.5, 2.0),
    logit_bias=st.none() | st.dictionaries(st.integers(0, 11), st.floats(-100, 100), max_size=4),
    min_tokens=st.integers(0, 3),
    stop_token_ids=st.lists(st.integers(0, 11), max_size=2).map(tuple),
    logprobs=st.integers(0, 5),
    max_tokens=st.just(8),
    seed=st.integers(0, 2**40),
)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            penalty_params,
            st.lists(st.integers(0, 11), max_size=6),
            st.lists(st.integers(0, 11), min_size=1, max_size=6),
            st.lists(st.floats(-5, 5), min_size=12, max_size=12),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_penalties_bias_and_logprobs_match_a_plain_reference(rows):
    params = [r[0] for r in rows]
    outputs = [r[1] for r in rows]
    prompts = [r[2] for r in rows]
    logits = torch.tensor([r[3] for r in rows])
    got = sample(logits, params, output_ids=outputs, prompt_ids=prompts)
    for i, (p, out, prompt, _) in enumerate(rows):
        expect = reference_processed(logits[i], p, out, prompt).log_softmax(-1).float()
        token = int(got.token_ids[i])
        assert expect[token] > -math.inf
        if p.greedy:
            assert expect[token] == expect.max()
        torch.testing.assert_close(got.logprobs[i], expect[token], atol=1e-4, rtol=0)
        k = p.logprobs
        torch.testing.assert_close(
            got.top_logprobs[i, :k], expect.topk(k).values, atol=1e-4, rtol=0
        )


def test_min_tokens_blocks_stop_tokens_until_reached():
    logits = torch.tensor([[0.0, 10.0, 0.0]])
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(1,), max_tokens=4)
    assert tokens(logits, [p], output_ids=[[]]) != [1]
    assert tokens(logits, [p], output_ids=[[0]]) != [1]
    assert tokens(logits, [p], output_ids=[[0, 0]]) == [1]


def test_allowed_mask_restricts_every_row():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    allowed = torch.zeros(3, 20, dtype=torch.bool)
    allowed[0, [3, 4]] = True
    allowed[1, 7] = True
    allowed[2, :] = True
    params = [SamplingParams(temperature=0.0), SamplingParams(seed=1), SamplingParams(seed=2)]
    got = tokens(logits, params, allowed=allowed)
    assert got[0] == max((3, 4), key=lambda t: logits[0, t]) and got[1] == 7
    allowed[2] = False
    with pytest.raises(ValueError, match=r"allowed rows \[2\]"):
        sample(logits, params, allowed=allowed)
    with pytest.raises(ValueError, match="allowed must be a bool tensor"):
        sample(logits, params, allowed=allowed[:2])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ],
)
def test_bad_params_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_logits_shape_must_match_the_params():
    with pytest.raises(ValueError, match="rows"):
        sample(torch.zeros(2, 5), [SamplingParams()])
