"""Grouping policies, the sensitivity statistic, regrouping and name-based checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from ds_optim import (
    GroupedAdamW,
    SensitivityPolicy,
    SensitivityRegrouper,
    StaticPolicy,
    get_policy,
    group_parameters,
)
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn


class MyRMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Tiny(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = MyRMSNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(torch.relu(self.proj(self.embed(ids)))))


def run(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        ids = torch.randint(0, 11, (4, 6), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
    return loss.item()


def names_by_group(groups):
    return {g["name"]: set(g["param_names"]) for g in groups}


def test_static_rules():
    policy = StaticPolicy(lr_multipliers=(("lm_head.*", 0.5),))
    groups = names_by_group(group_parameters(Tiny(), policy))
    assert groups == {
        "no_decay": {"embed.weight", "proj.bias", "norm.weight"},
        "decay": {"proj.weight"},
        "decay@lr_x0.5": {"lm_head.weight"},
    }
    lr_scales = {g["name"]: g["lr_scale"] for g in group_parameters(Tiny(), policy)}
    assert lr_scales["decay@lr_x0.5"] == 0.5
    wd = {g["name"]: g.get("weight_decay") for g in group_parameters(Tiny(), policy)}
    assert wd == {"no_decay": 0.0, "decay": None, "decay@lr_x0.5": None}
    assert names_by_group(group_parameters(Tiny(), StaticPolicy(decay_embeddings=True)))[
        "decay"
    ] == {"embed.weight", "proj.weight", "lm_head.weight"}
    assert len(group_parameters(Tiny(), "uniform")) == 1


def test_bad_policy_input():
    with pytest.raises(ValueError, match=r"unknown policy 'fastest'.*allowed.*sensitivity"):
        group_parameters(Tiny(), "fastest")
    with pytest.raises(ValueError, match=r"unknown policy"):
        GroupedAdamW.from_model(Tiny(), policy="nope")
    with pytest.raises(TypeError, match="policy"):
        get_policy(3)
    with pytest.raises(ValueError, match="tier_edges"):
        SensitivityPolicy(lr_scales=(1.0, 0.5), tier_edges=(0.0, 1.0))
    with pytest.raises(ValueError, match="regroup_every"):
        SensitivityPolicy(regroup_every=0)
    with pytest.raises(ValueError, match="multiplier"):
        StaticPolicy(lr_multipliers=(("x", -1.0),))
    with pytest.raises(ValueError, match="sensitivity policy"):
        SensitivityRegrouper("static")


def test_sensitivity_statistic_is_the_documented_ema():
    model = Tiny()
    policy = SensitivityPolicy(regroup_every=1000, ema_beta=0.8, weight_floor=1e-3)
    opt = GroupedAdamW.from_model(model, policy, lr=1e-2)
    w = model.proj.weight
    expected = None
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        ids = torch.randint(0, 11, (4, 6), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(
            model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()
        ).backward()
        rms = lambda t: t.detach().pow(2).mean().sqrt().item()  # noqa: E731
        ratio = rms(w.grad) / (rms(w) + 1e-3)
        expected = ratio if expected is None else 0.8 * expected + 0.2 * ratio
        opt.step()
    assert opt.state[w]["sensitivity"] == pytest.approx(expected, rel=1e-5)


def test_regrouping_moves_tensors_keeps_state_and_applies_tier_lr():
    model = Tiny()
    policy = SensitivityPolicy(regroup_every=3, lr_scales=(2.0, 1.0, 0.25), tier_edges=(-0.5, 0.5))
    opt = GroupedAdamW.from_model(model, policy, lr=1e-2)
    names = [g["name"] for g in opt.param_groups]
    assert all(g["params"] == [] for g in opt.param_groups if not g["name"].endswith("tier1"))
    run(model, opt, 2)
    before = {
        p: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
        for p in model.parameters()
        if p.requires_grad
    }
    run(model, opt, 1, seed=5)  # third step: observe, update, then regroup
    assert opt.regrouper.regroups == 1
    assert [g["name"] for g in opt.param_groups] == names  # the set of groups never changes
    flat = [p for g in opt.param_groups for p in g["params"]]
    assert len(flat) == len(set(flat)) == len(before)
    moved = [g["name"] for g in opt.param_groups if g["params"] and not g["name"].endswith("tier1")]
    assert moved, "with edges at +-0.5 octave some tensors must leave the middle tier"
    # Each tensor sits in the tier its statistic says.
    sens = {
        n: opt.state[p]["sensitivity"]
        for g in opt.param_groups
        for n, p in zip(g["param_names"], g["params"])
    }
    values = sorted(sens.values())
    median = (
        values[len(values) // 2]
        if len(values) % 2
        else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    )
    for g in opt.param_groups:
        for n in g["param_names"]:
            pos = math.log2(sens[n] / median)
            assert g["tier"] == (pos > -0.5) + (pos > 0.5), n
    # State kept (one more step happened; the step counters say nothing was reset).
    for p in before:
        assert opt.state[p]["step"].item() == 3
    # The tier's lr scale is what moves the tensor.
    g = next(g for g in opt.param_groups if g["params"] and g["tier"] == 0)
    p = g["params"][0]
    old = p.detach().clone()
    opt.zero_grad()
    p.grad = torch.ones_like(p)
    st = opt.state[p]
    m = st["exp_avg"] * 0.9 + 0.1
    v = st["exp_avg_sq"] * 0.999 + 0.001
    t = st["step"].item() + 1
    lr = 1e-2 * g["lr_scale"]
    wd = g["weight_decay"]
    want = old * (1 - lr * wd) - lr / (1 - 0.9**t) * m / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
    opt.step()
    torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=0)
    assert g["lr_scale"] == pytest.approx(2.0)  # tier 0's scale; no name multipliers here


def test_checkpoint_after_regrouping_loads_and_resumes_exactly():
    model = Tiny()
    policy = SensitivityPolicy(regroup_every=2, tier_edges=(-0.3, 0.3))
    opt = GroupedAdamW.from_model(model, policy, lr=1e-2)
    run(model, opt, 4)
    sd = copy.deepcopy(opt.state_dict())  # state_dict() holds live references
    model_sd = {k: v.clone() for k, v in model.state_dict().items()}
    membership = names_by_group(opt.param_groups)
    run(model, opt, 5, seed=9)

    fresh = Tiny(seed=1)
    fresh.load_state_dict(model_sd)
    opt2 = GroupedAdamW.from_model(fresh, policy, lr=1e-2)
    assert names_by_group(opt2.param_groups) != membership  # fresh: all in the middle tier
    opt2.load_state_dict(sd)
    assert names_by_group(opt2.param_groups) == membership
    assert opt2.regrouper.steps == 4
    run(fresh, opt2, 5, seed=9)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_loads_into_a_different_grouping_by_name():
    model = Tiny()
    opt = GroupedAdamW.from_model(model, "sensitivity", lr=1e-2)
    run(model, opt, 3)
    static = GroupedAdamW.from_model(model, "static", lr=1e-2)
    static.load_state_dict(opt.state_dict())
    assert [g["name"] for g in static.param_groups] == ["no_decay", "decay"]
    for p in model.parameters():
        if p.requires_grad:
            assert torch.equal(static.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_mismatched_checkpoints_are_rejected():
    model = Tiny()
    opt = GroupedAdamW(model.parameters(), lr=1e-2)
    run(model, opt, 1)
    other = GroupedAdamW(list(model.parameters())[:2], lr=1e-2)
    with pytest.raises(ValueError, match="sizes"):
        other.load_state_dict(opt.state_dict())
    named = GroupedAdamW.from_model(model, "static")
    run(model, named, 1)
    smaller = GroupedAdamW([{"name": "decay", "params": [("proj.weight", model.proj.weight)]}])
    with pytest.raises(KeyError, match=r"missing.*unexpected"):
        smaller.load_state_dict(named.state_dict())


class RegroupingMachine(RuleBasedStateMachine):
    """Steps, regroupings and checkpoint reloads in any order never lose, duplicate or
    reassign a tensor's state."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Tiny()
        self.policy = SensitivityPolicy(regroup_every=1000, tier_edges=(-0.2, 0.2))
        self.opt = GroupedAdamW.from_model(self.model, self.policy, lr=1e-2)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.steps = 0
        self.seed = 0

    @rule(n=st.integers(1, 3))
    def step(self, n):
        self.seed += 1
        run(self.model, self.opt, n, seed=self.seed)
        self.steps += n

    @precondition(lambda self: self.steps > 0)
    @rule()
    def regroup(self):
        self.opt.regrouper.regroup(self.opt)

    @rule()
    def reload(self):
        sd = self.opt.state_dict()
        fresh = GroupedAdamW.from_model(self.model, self.policy, lr=1e-2)
        fresh.load_state_dict(sd)
        for p in self.trainable:
            if p in self.opt.state:
                assert torch.equal(fresh.state[p]["exp_avg_sq"], self.opt.state[p]["exp_avg_sq"])
        assert names_by_group(fresh.param_groups) == names_by_group(self.opt.param_groups)
        self.opt = fresh

    @invariant()
    def every_tensor_in_exactly_one_group(self):
        flat = [p for g in self.opt.param_groups for p in g["params"]]
        assert len(flat) == len(set(flat)) == len(self.trainable)
        for g in self.opt.param_groups:
            assert len(g["params"]) == len(g["param_names"])
            for n, p in zip(g["param_names"], g["params"]):
                assert self.model.get_parameter(n) is p

    @invariant()
    def every_state_has_all_steps(self):
        for p in self.trainable:
            if self.steps:
                assert self.opt.state[p]["step"].item() == self.steps


TestRegroupingMachine = RegroupingMachine.TestCase
TestRegroupingMachine.settings = settings(max_examples=8, stateful_step_count=6)


def test_lr_scheduler_keeps_working_across_regroupings():
    model = Tiny()
    opt = GroupedAdamW.from_model(model, SensitivityPolicy(regroup_every=2), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for _ in range(5):
        run(model, opt, 1)
        sched.step()
    assert opt.regrouper.regroups == 2
    assert all(g["lr"] == pytest.approx(1e-2 * 0.5**5) for g in opt.param_groups)
