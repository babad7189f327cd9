"""The fused LoRA branch under torch.autocast (CPU, bf16 and fp16): a training step runs,
and its gradients match the unfused composition (nn.Dropout + two matmuls) under the same
autocast, within a tolerance fit for the low-precision dtype."""

import ds_lora
import pytest
import torch
from ds_lora.lora_fn import keep_mask, lora_delta, lora_delta_reference
from torch import nn


def _cpu_autocast_supports(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
    except (RuntimeError, ValueError):
        return False


DTYPES = [
    torch.bfloat16,
    pytest.param(
        torch.float16,
        marks=pytest.mark.skipif(
            not _cpu_autocast_supports(torch.float16), reason="no fp16 autocast on this CPU"
        ),
    ),
]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    # bf16 keeps 8 significant bits, fp16 11; the sums over the batch round differently.
    rel = 3e-2 if dtype == torch.bfloat16 else 5e-3
    scale = want.abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, "autocast"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fused_branch_matches_composition_under_autocast(dtype, x_dtype, p):
    # x_dtype "autocast": the activation arrives in the low dtype (it came out of an
    # autocast matmul) while the adapter weights are float32, the case that used to fail.
    gen = torch.Generator().manual_seed(0)
    x_dtype = dtype if x_dtype == "autocast" else x_dtype
    x = torch.randn(3, 5, 32, generator=gen).to(x_dtype)
    a = torch.randn(4, 32, generator=gen) * 0.2
    b = torch.randn(24, 4, generator=gen) * 0.2
    grad_out = torch.randn(3, 5, 24, generator=gen)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    dropout = nn.Dropout(p) if p > 0 else nn.Identity()
    with torch.autocast("cpu", dtype=dtype):
        torch.manual_seed(1)
        got = lora_delta(*leaves, 2.0, dropout)
        torch.manual_seed(1)
        keep = keep_mask(x, p) if p > 0 else None
        want = lora_delta_reference(*ref_leaves, 2.0, keep, p)
    assert got.dtype == want.dtype == dtype
    _close(got, want, dtype)
    got.backward(grad_out.to(dtype))
    want.backward(grad_out.to(dtype))
    for mine, ref in zip(leaves, ref_leaves):
        assert mine.grad.dtype == mine.dtype  # gradients come back in each input's dtype
        _close(mine.grad, ref.grad, dtype)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(32, 32)
        self.v_proj = nn.Linear(32, 16)

    def forward(self, x):
        return self.v_proj(torch.nn.functional.silu(self.q_proj(x)))


def _unfused_loss(model: _Block, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The same model computed with plain ops (base + s·B(A(x)))."""

    def adapted(layer: ds_lora.LoraLinear, h: torch.Tensor) -> torch.Tensor:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        delta = nn.functional.linear(nn.functional.linear(h, a), b) * layer.scaling["default"]
        return layer.base_layer(h) + delta

    hidden = torch.nn.functional.silu(adapted(model.q_proj, x))
    return nn.functional.mse_loss(adapted(model.v_proj, hidden).float(), target)


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_step_under_autocast_matches_unfused(dtype):
    torch.manual_seed(0)
    model = _Block()
    ds_lora.inject(model, ds_lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0), "default")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    x = torch.randn(4, 6, 32)
    target = torch.randn(4, 6, 16)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(p.dtype == torch.float32 for _, p in trainable)

    with torch.autocast("cpu", dtype=dtype):
        ref_loss = _unfused_loss(model, x, target)
    ref_grads = torch.autograd.grad(ref_loss, [p for _, p in trainable])

    optimizer = torch.optim.SGD([p for _, p in trainable], lr=0.5)
    with torch.autocast("cpu", dtype=dtype):
        loss = nn.functional.mse_loss(model(x).float(), target)
    loss.backward()
    _close(loss.detach(), ref_loss.detach(), dtype)
    for (name, param), ref in zip(trainable, ref_grads):
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        _close(param.grad, ref, dtype)
    before = [p.detach().clone() for _, p in trainable]
    optimizer.step()
    assert all(not torch.equal(b, p) for b, (_, p) in zip(before, trainable))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        assert nn.functional.mse_loss(model(x).float(), target) < loss.detach()


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dora_training_step_under_bf16_autocast(p):
    torch.manual_seed(0)
    model = _Block()
    config = ds_lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, use_dora=True)
    ds_lora.inject(model, config, "default")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 6, 32))
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    trainable = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    assert {n.split(".")[1] for n, _ in trainable} == {
        "lora_A",
        "lora_B",
        "lora_magnitude_vector",
    }
    for name, param in trainable:
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name
