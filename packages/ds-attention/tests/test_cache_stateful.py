"""Stateful hypothesis test: any sequence of prefill / decode chunks through a KVCache
gives, at every step, the rows the full forward over everything so far would give."""

import torch
from ds_attention import Attention, DynamicAttention, KVCache
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

MAX_LEN = 40


class CachedDecoding(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.modules = [Attention(16, 4, num_kv_heads=2, window=6).eval(),
                        DynamicAttention(16, heads=2).eval()]  # fmt: skip
        self.caches = [KVCache(MAX_LEN) for _ in self.modules]
        self.inputs = torch.empty(1, 0, 16)
        self.outputs = [torch.empty(1, 0, 16) for _ in self.modules]

    @precondition(lambda self: self.inputs.shape[1] < MAX_LEN)
    @rule(n=st.integers(1, 9), seed=st.integers(0, 1000))
    def feed(self, n, seed):
        n = min(n, MAX_LEN - self.inputs.shape[1])
        x = torch.randn(1, n, 16, generator=torch.Generator().manual_seed(seed))
        self.inputs = torch.cat([self.inputs, x], 1)
        with torch.no_grad():
            for i, (m, c) in enumerate(zip(self.modules, self.caches)):
                self.outputs[i] = torch.cat([self.outputs[i], m(x, cache=c)], 1)

    @rule()
    def overflow_is_refused(self):
        free = MAX_LEN - self.caches[0].length
        x = torch.zeros(1, free + 1, 16)
        try:
            self.modules[0](x, cache=self.caches[0])
        except ValueError as exc:
            assert "cannot add" in str(exc)
        else:
            raise AssertionError("a cache overflow was accepted")

    @invariant()
    def cached_equals_full(self):
        if self.inputs.shape[1] == 0:
            return
        with torch.no_grad():
            for i, m in enumerate(self.modules):
                full = m(self.inputs)
                torch.testing.assert_close(self.outputs[i], full, atol=1e-5, rtol=1e-5)
        assert all(c.length == self.inputs.shape[1] for c in self.caches)


TestCachedDecoding = CachedDecoding.TestCase
TestCachedDecoding.settings = settings(max_examples=15, stateful_step_count=8)
