"""Sensitivity statistics and dynamic regrouping.

The statistic. For each parameter tensor W with gradient G, at every optimizer step
(before the update, on the gradient the optimizer sees, i.e. after DDP averaging):

    ratio_t = rms(G) / (rms(W) + weight_floor)
    sensitivity_t = ema_beta * sensitivity_{t-1} + (1 - ema_beta) * ratio_t

(the first observation initializes the EMA). It is the grad-to-weight norm ratio,
dimensionless, so tensors of different sizes and layers compare: a tensor whose
gradient is large relative to its own weights moves a large relative distance per
step, is the one most likely to destabilize training, and gets a smaller lr.

Regrouping. Every ``regroup_every`` optimizer steps each tensor is assigned the tier
``searchsorted(tier_edges, log2(sensitivity / median))`` where the median is over all
tensors that have a statistic, and moves to the group ``<class>/tier<k>`` of its
static class (decay / no-decay / lr-multiplier). Tensors keep their optimizer state
(moments, step, statistic): state is keyed by the tensor, and a move only edits the
groups' ``params`` lists. Tensors that never had a gradient stay where they are.

FSDP2. A DTensor parameter's gradient is a shard; a statistic of the local shard
would differ per rank and from the unsharded model. With ``reduce_dtensor_stats``
(default) the sums of squares of each shard are all-reduced over every sharded mesh
dimension (one collective per mesh and placement, not per tensor), so each rank
computes the global rms of the whole tensor and all ranks make the same grouping.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ds_optim.grouping import SensitivityPolicy, get_policy

__all__ = ["SensitivityRegrouper", "mean_squares"]

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def _is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def mean_squares(tensors: list[torch.Tensor], *, reduce_dtensors: bool = True) -> list[float]:
    """``mean(t**2)`` of each tensor, over the whole (global) tensor for DTensors when
    ``reduce_dtensors`` else over the local shard."""
    out: list[float | None] = [None] * len(tensors)
    plain = [i for i, t in enumerate(tensors) if not _is_dtensor(t)]
    if plain:
        norms = torch.stack(torch._foreach_norm([tensors[i].detach().float() for i in plain]))
        for i, n in zip(plain, norms.tolist()):
            out[i] = n**2 / max(tensors[i].numel(), 1)
    batches: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        if _is_dtensor(t):
            batches.setdefault((id(t.device_mesh), t.placements), []).append(i)
    for idx in batches.values():
        first = tensors[idx[0]]
        local = torch.stack([tensors[i].to_local().detach().float().pow(2).sum() for i in idx])
        if reduce_dtensors:
            for dim, placement in enumerate(first.placements):
                if placement.is_shard() or placement.is_partial():
                    dist.all_reduce(local, group=first.device_mesh.get_group(dim))
            counts = [tensors[i].numel() for i in idx]
        else:
            counts = [tensors[i].to_local().numel() for i in idx]
        for i, s, c in zip(idx, local.tolist(), counts):
            out[i] = s / max(c, 1)
    return out  # type: ignore[return-value]


class SensitivityRegrouper:
    """Tracks the sensitivity statistic and moves tensors between tier groups.

    Pass it to ``GroupedAdamW(groups, regrouper=...)`` with groups from
    ``group_parameters(model, policy)`` (or use ``GroupedAdamW.from_model``). The
    statistic lives in the optimizer state (``state[p]["sensitivity"]``) and the step
    counter in ``optimizer.state_dict()["regrouper"]``, so both checkpoint.
    """

    def __init__(self, policy: str | SensitivityPolicy = "sensitivity") -> None:
        pol = get_policy(policy)
        if not isinstance(pol, SensitivityPolicy):
            raise ValueError(f"SensitivityRegrouper needs a sensitivity policy, got {pol.name!r}")
        self.policy = pol
        self.steps = 0
        self.regroups = 0

    def observe(self, optimizer: torch.optim.Optimizer) -> None:
        """Update each tensor's EMA from its current gradient."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        red = self.policy.reduce_dtensor_stats
        g2 = mean_squares([p.grad for p in params], reduce_dtensors=red)
        w2 = mean_squares(params, reduce_dtensors=red)
        beta = self.policy.ema_beta
        for p, gs, ws in zip(params, g2, w2):
            ratio = math.sqrt(gs) / (math.sqrt(ws) + self.policy.weight_floor)
            st = optimizer.state[p]
            old = st.get("sensitivity")
            value = ratio if old is None else beta * float(old) + (1 - beta) * ratio
            # A Python float: checkpoints keep it exactly (torch casts state tensors).
            st["sensitivity"] = value

    def maybe_regroup(self, optimizer: torch.optim.Optimizer) -> bool:
        """Count a step; regroup when the count reaches a multiple of ``regroup_every``."""
        self.steps += 1
        if self.steps % self.policy.regroup_every:
            return False
        self.regroup(optimizer)
        return True

    def tier_of(self, sensitivity: float, median: float) -> int:
        if not (sensitivity > 0 and median > 0) or not math.isfinite(sensitivity):
            return (
                self.policy.initial_tier
                if not math.isinf(sensitivity)
                else self.policy.num_tiers - 1
            )
        position = math.log2(sensitivity / median)
        return sum(position > edge for edge in self.policy.tier_edges)

    def regroup(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Move every tensor with a statistic to its tier now; returns name -> tier."""
        groups = optimizer.param_groups
        by_name = {g.get("name"): g for g in groups}
        if any("tier" not in g or "class" not in g for g in groups):
            raise ValueError(
                "regrouping needs groups from group_parameters(model, <sensitivity policy>); "
                "a group without 'class' and 'tier' keys was found"
            )
        values = [
            float(optimizer.state[p]["sensitivity"])
            for g in groups
            for p in g["params"]
            if "sensitivity" in optimizer.state.get(p, {})
        ]
        finite = sorted(v for v in values if math.isfinite(v))
        if not finite:
            return {}
        median = (
            finite[len(finite) // 2]
            if len(finite) % 2
            else 0.5 * (finite[len(finite) // 2 - 1] + finite[len(finite) // 2])
        )
        moves: list[tuple[str, torch.Tensor, str, int]] = []
        for g in groups:
            names = g.get("param_names") or [None] * len(g["params"])
            for name, p in zip(names, g["params"]):
                st = optimizer.state.get(p, {})
                tier = (
                    g["tier"]
                    if "sensitivity" not in st
                    else self.tier_of(float(st["sensitivity"]), median)
                )
                moves.append((name, p, g["class"], tier))
        new_members: dict[str, list[tuple[Any, torch.Tensor]]] = {name: [] for name in by_name}
        for name, p, cls, tier in moves:
            target = f"{cls}/tier{tier}"
            if target not in by_name:
                raise KeyError(f"no group named {target!r} for tier {tier} of class {cls!r}")
            new_members[target].append((name, p))
        assignment = {}
        for gname, members in new_members.items():
            g = by_name[gname]
            g["params"] = [p for _, p in members]
            if "param_names" in g:
                g["param_names"] = [n for n, _ in members]
            for n, _ in members:
                assignment[n] = g["tier"]
        self.regroups += 1
        return assignment

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "regroups": self.regroups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.regroups = int(state["regroups"])
