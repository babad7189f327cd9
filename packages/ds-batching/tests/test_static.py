"""DynamicBatchScheduler: flush before a request that would break a limit."""

from __future__ import annotations

import array

import hypothesis.strategies as st
import pytest
from ds_batching import Batch, DynamicBatchScheduler
from hypothesis import given, settings


class FakeTensor:
    """Stands in for a torch tensor: only numel() gives the token count."""

    def __init__(self, n: int) -> None:
        self.n = n

    def numel(self) -> int:
        return self.n


class FakeArray:
    """Stands in for a (1, n) numpy array: len() is 1, .size is the element count."""

    def __init__(self, n: int) -> None:
        self.size = n

    def __len__(self) -> int:
        return 1


def test_flushes_when_batch_size_is_reached():
    sched = DynamicBatchScheduler(max_batch_size=2, max_tokens=100)
    assert sched.add_request([1]) is None
    assert sched.add_request([2]) is None
    batch = sched.add_request([3])  # the batch already holds 2: flush first
    assert batch.requests == [[1], [2]] and batch.num_tokens == 2 and batch.index == 0
    assert sched.current_batch == [[3]]
    assert sched.flush().requests == [[3]]
    assert sched.flush() is None


def test_flushes_before_a_request_that_would_exceed_max_tokens():
    seen = []
    sched = DynamicBatchScheduler(max_batch_size=32, max_tokens=10, on_batch=seen.append)
    sched.add_request([0] * 6)
    sched.add_request((0,) * 4)  # exactly 10: no flush
    assert seen == []
    flushed = sched.add_request([0])  # 11 > 10
    assert seen == [flushed] and flushed.num_tokens == 10 and len(flushed) == 2
    assert sched.current_tokens == 1


def test_accepts_numel_size_and_len():
    sched = DynamicBatchScheduler(max_batch_size=8, max_tokens=10)
    sched.add_request(FakeTensor(4))
    sched.add_request(FakeArray(3))
    sched.add_request(array.array("l", [1, 2, 3]))
    assert sched.current_tokens == 10


def test_rejects_a_request_longer_than_max_tokens():
    sched = DynamicBatchScheduler(max_batch_size=4, max_tokens=8)
    sched.add_request([1, 2])
    with pytest.raises(ValueError, match="max_tokens=8"):
        sched.add_request(list(range(9)))
    assert sched.current_batch == [[1, 2]]  # nothing was dropped or flushed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"on_batch": 3}, "on_batch"),
    ],
)
def test_bad_limits(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DynamicBatchScheduler(**kwargs)


@pytest.mark.parametrize("bad", ["hello", 5, object()])
def test_bad_requests(bad):
    with pytest.raises(TypeError, match="input_ids"):
        DynamicBatchScheduler().add_request(bad)
    with pytest.raises(ValueError, match="empty"):
        DynamicBatchScheduler().add_request([])


@settings(max_examples=100)
@given(
    lengths=st.lists(st.integers(1, 20), max_size=40),
    max_batch_size=st.integers(1, 6),
    max_tokens=st.integers(20, 60),
)
def test_batches_respect_limits_and_keep_every_request_in_order(
    lengths, max_batch_size, max_tokens
):
    batches: list[Batch] = []
    sched = DynamicBatchScheduler(max_batch_size, max_tokens, on_batch=batches.append)
    requests = [[i] * n for i, n in enumerate(lengths)]
    for request in requests:
        sched.add_request(request)
    sched.flush()
    assert [r for b in batches for r in b.requests] == requests
    assert [b.index for b in batches] == list(range(len(batches)))
    for k, batch in enumerate(batches):
        assert 1 <= len(batch) <= max_batch_size
        assert batch.num_tokens == sum(len(r) for r in batch.requests) <= max_tokens
        if k + 1 < len(batches):  # a batch was flushed only because the next request did not fit
            nxt = len(batches[k + 1].requests[0])
            assert len(batch) == max_batch_size or batch.num_tokens + nxt > max_tokens
