"""CUDA paths (skipped without a GPU): the same results as on CPU."""

from __future__ import annotations

import pytest
import torch
from ds_optim import GroupedAdamW, Int4GradientCompressor, quantize_blockwise

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_deterministic_quantization_matches_cpu():
    x = torch.randn(10_000) * 3
    cpu = quantize_blockwise(x, bits=4, block_size=128)
    gpu = quantize_blockwise(x.cuda(), bits=4, block_size=128)
    assert torch.equal(cpu.codes, gpu.codes.cpu())
    assert torch.equal(cpu.scales, gpu.scales.cpu())


def test_compressor_error_feedback_on_cuda():
    comp = Int4GradientCompressor(block_size=64)
    g = torch.randn(4096, device="cuda")
    total = torch.zeros_like(g)
    for _ in range(10):
        total += comp.decompress(comp.compress(g, key=0))
    step = g.abs().max() / 7
    assert (total - 10 * g).abs().max() <= step * 1.01


def test_grouped_adamw_matches_torch_on_cuda():
    torch.manual_seed(0)
    a = torch.nn.Linear(64, 64).cuda()
    b = torch.nn.Linear(64, 64).cuda()
    b.load_state_dict(a.state_dict())
    ours = GroupedAdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    for _ in range(10):
        x = torch.randn(8, 64, device="cuda")
        for m, o in ((a, ours), (b, ref)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
