"""Shared test setup for ds-model."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: with 2 threads on a shared, loaded machine each op waits on the
    # other thread being scheduled (up to 100x slower); one thread is what the sizes need.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
