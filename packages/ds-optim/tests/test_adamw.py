"""GroupedAdamW against torch.optim.AdamW, checkpoints, BF16 moments, bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from ds_optim import GroupedAdamW, group_parameters
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(8, 4, generator=torch.Generator().manual_seed(99))
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        y = torch.tanh(x @ teacher)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_torch_adamw_for_20_steps(foreach):
    ours_model, ref_model = mlp(), mlp()
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours = GroupedAdamW(ours_model.parameters(), foreach=foreach, **kw)
    ref = torch.optim.AdamW(ref_model.parameters(), foreach=True, **kw)
    train(ours_model, ours, 20)
    train(ref_model, ref, 20)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(
            ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], atol=1e-6, rtol=0
        )


def test_grouped_lr_scale_and_no_decay_match_torch_groups():
    model, ref_model = mlp(), mlp()
    groups = group_parameters(model, "static")
    assert {g["name"] for g in groups} == {"decay", "no_decay"}
    ours = GroupedAdamW(groups, lr=1e-2, weight_decay=0.1)
    ref_groups = [
        {"params": [p for n, p in ref_model.named_parameters() if p.ndim >= 2]},
        {"params": [p for n, p in ref_model.named_parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    ref = torch.optim.AdamW(ref_groups, lr=1e-2, weight_decay=0.1, foreach=True)
    train(model, ours, 10)
    train(ref_model, ref, 10)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_lr_scale_multiplies_the_step():
    a, b = mlp(), mlp()
    opt_a = GroupedAdamW([{"params": a.parameters(), "lr_scale": 0.5}], lr=1e-2, weight_decay=0.1)
    opt_b = GroupedAdamW(b.parameters(), lr=5e-3, weight_decay=0.1)
    train(a, opt_a, 5)
    train(b, opt_b, 5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_state_dict_round_trip_resumes_bit_exactly(state_dtype):
    model = mlp()
    opt = GroupedAdamW(group_parameters(model, "static"), lr=1e-2, state_dtype=state_dtype)
    train(model, opt, 5)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = _roundtrip(opt.state_dict())
    train(model, opt, 5, seed=7)

    resumed = mlp(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = GroupedAdamW(group_parameters(resumed, "static"), lr=1e-2, state_dtype=state_dtype)
    opt2.load_state_dict(saved_opt)
    for p in resumed.parameters():
        want = state_dtype or torch.float32
        assert opt2.state[p]["exp_avg"].dtype == want
        assert opt2.state[p]["exp_avg_sq"].dtype == want
    train(resumed, opt2, 5, seed=7)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_fp32_moments_of_bf16_params_survive_loading():
    model = mlp().to(torch.bfloat16)
    opt = GroupedAdamW(model.parameters(), lr=1e-2, state_dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=gen).bfloat16()).float().pow(2).mean().backward()
        opt.step()
    sd = opt.state_dict()
    opt2 = GroupedAdamW(model.parameters(), lr=1e-2, state_dtype=torch.float32)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        assert opt2.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_bf16_moments_track_fp32_moments():
    fp32_model, bf16_model = mlp(), mlp()
    fp32 = GroupedAdamW(fp32_model.parameters(), lr=3e-3)
    bf16 = GroupedAdamW(bf16_model.parameters(), lr=3e-3, state_dtype=torch.bfloat16)
    a = train(fp32_model, fp32, 40)
    b = train(bf16_model, bf16, 40)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in bf16.state.values())
    assert abs(a[-1] - b[-1]) < 0.02 * a[0]
    assert b[-1] < 0.5 * b[0]


def test_bf16_stochastic_rounding_keeps_second_moment_moving():
    # v starts at 1 and sees g^2 = 1.5: each update is 0.05% of v, far below bf16's
    # half-ulp (0.2%). Round-to-nearest freezes v; stochastic rounding follows fp32.
    results = {}
    for rounding in ("nearest", "stochastic"):
        p = nn.Parameter(torch.zeros(2048))
        opt = GroupedAdamW([p], lr=0.0, state_dtype=torch.bfloat16, bf16_rounding=rounding)
        p.grad = torch.ones(2048)
        opt.step()
        opt.state[p]["exp_avg_sq"].fill_(1.0)
        p.grad = torch.full((2048,), 1.5**0.5)
        for _ in range(100):
            opt.step()
        results[rounding] = opt.state[p]["exp_avg_sq"].float().mean().item()
    exact = 1.5 - 0.5 * 0.999**100
    assert results["nearest"] == 1.0
    assert abs(results["stochastic"] - exact) < 0.01


@settings(max_examples=6)
@given(
    lr=st.floats(1e-4, 1e-1),
    wd=st.floats(0.0, 0.5),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    steps=st.integers(1, 6),
)
def test_matches_torch_adamw_for_any_hyperparameters(lr, wd, beta1, beta2, steps):
    a, b = mlp(), mlp()
    kw = dict(lr=lr, betas=(beta1, beta2), weight_decay=wd)
    train(a, GroupedAdamW(a.parameters(), **kw), steps)
    train(b, torch.optim.AdamW(b.parameters(), foreach=True, **kw), steps)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_bad_input_is_rejected_clearly():
    model = mlp()
    with pytest.raises(ValueError, match="lr"):
        GroupedAdamW(model.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        GroupedAdamW(model.parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="state_dtype"):
        GroupedAdamW(model.parameters(), state_dtype=torch.float16)
    with pytest.raises(ValueError, match="bf16_rounding"):
        GroupedAdamW(model.parameters(), bf16_rounding="up")
    w = model[0].weight
    with pytest.raises(ValueError, match=r"two groups.*'a'.*0\.weight.*'b'"):
        GroupedAdamW(
            [
                {"name": "a", "params": [("0.weight", w)]},
                {"name": "b", "params": [("again", w)]},
            ]
        )
    opt = GroupedAdamW(model.parameters())
    with pytest.raises(ValueError, match="two groups"):
        opt.add_param_group({"params": [w]})


def test_cpu_default_is_torch_fused_kernel_and_flags_are_checked():
    ours_model, ref_model = mlp(), mlp()
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours = GroupedAdamW(ours_model.parameters(), **kw)
    ref = torch.optim.AdamW(ref_model.parameters(), fused=True, **kw)
    train(ours_model, ours, 20)
    train(ref_model, ref, 20)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)  # the same kernel: bit for bit
        assert torch.equal(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"])
    with pytest.raises(ValueError, match="exclusive"):
        GroupedAdamW(mlp().parameters(), fused=True, foreach=True)
    with pytest.raises(ValueError, match="fused='yes'"):
        GroupedAdamW(mlp().parameters(), fused="yes")
    model = mlp()
    opt = GroupedAdamW(model.parameters(), fused=True, state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fused=True: torch's fused AdamW"):
        train(model, opt, 1)
