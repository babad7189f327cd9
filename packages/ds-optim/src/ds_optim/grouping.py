"""Parameter grouping policies and ``group_parameters(model, policy)``.

A policy is a small frozen config object; named policies live in a registry
(``register_policy`` / ``get_policy``), like torchao's config handlers:

- ``"static"``: no weight decay for biases, 1-D tensors, normalization weights and
  embeddings; per-parameter lr multipliers by name pattern (``fnmatch``, first match
  wins). One group per (decay, multiplier) class.
- ``"sensitivity"``: the static classes, each split into sensitivity tiers whose
  ``lr_scale`` differ; a :class:`ds_optim.SensitivityRegrouper` moves tensors between
  tiers every ``regroup_every`` steps (see ``sensitivity.py``).
- ``"uniform"``: one group, weight decay everywhere (plain AdamW).

Groups are plain dicts for any torch optimizer: ``params``, ``param_names``, ``name``,
``lr_scale`` and, for no-decay groups, ``weight_decay=0.0``. The set of groups is
fixed at construction (dynamic policies move tensors between existing groups, never
add or drop groups) so LR schedulers, which keep one base lr per group, keep working.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "SensitivityPolicy",
    "StaticPolicy",
    "UniformPolicy",
    "get_policy",
    "group_parameters",
    "register_policy",
]


@dataclass(frozen=True)
class StaticPolicy:
    """Rules that depend only on names and module types.

    ``no_decay_patterns``: extra ``fnmatch`` patterns on parameter names that get no
    weight decay (biases, 1-D tensors, ``*Norm*`` modules and embeddings always get
    none unless ``decay_embeddings``). ``lr_multipliers``: ``(pattern, multiplier)``
    pairs; a tensor's ``lr_scale`` is the first matching multiplier, else 1.
    """

    no_decay_patterns: tuple[str, ...] = ()
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    decay_embeddings: bool = False
    name: str = field(default="static", init=False)

    def __post_init__(self) -> None:
        for item in self.lr_multipliers:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"lr_multipliers entries must be (pattern, float), got {item!r}")
            if not (isinstance(item[1], (int, float)) and item[1] > 0 and math.isfinite(item[1])):
                raise ValueError(
                    f"lr multiplier for {item[0]!r} must be a positive float, got {item[1]!r}"
                )

    @property
    def dynamic(self) -> bool:
        return False

    def classify(self, name: str, param: torch.Tensor, module: nn.Module) -> tuple[bool, float]:
        """(decay?, lr multiplier) of one parameter."""
        no_decay = (
            param.ndim < 2
            or name.endswith("bias")
            or "norm" in type(module).__name__.lower()
            or (not self.decay_embeddings and isinstance(module, (nn.Embedding, nn.EmbeddingBag)))
            or any(fnmatch.fnmatchcase(name, pat) for pat in self.no_decay_patterns)
        )
        mult = next(
            (float(m) for pat, m in self.lr_multipliers if fnmatch.fnmatchcase(name, pat)), 1.0
        )
        return not no_decay, mult


@dataclass(frozen=True)
class UniformPolicy(StaticPolicy):
    """One group, weight decay on every tensor: what plain ``AdamW(model.parameters())`` does."""

    name: str = field(default="uniform", init=False)

    def classify(self, name: str, param: torch.Tensor, module: nn.Module) -> tuple[bool, float]:
        return True, 1.0


@dataclass(frozen=True)
class SensitivityPolicy(StaticPolicy):
    """Static classes split into sensitivity tiers (see ``sensitivity.py``).

    ``lr_scales``: one multiplier per tier, from least to most sensitive.
    ``tier_edges``: ascending thresholds on ``log2(sensitivity / median sensitivity)``
    separating the tiers (``len(lr_scales) - 1`` of them); the default puts tensors
    more than 2x less sensitive than the median in tier 0 (lr x1.25) and more than
    2x more sensitive in tier 2 (lr x0.5). ``regroup_every``: steps between regroupings.
    ``ema_beta``: EMA factor of the statistic. ``weight_floor``: added to the
    weight RMS so zero-initialized tensors do not read as infinitely sensitive.
    ``reduce_dtensor_stats``: all-reduce the statistics of sharded (FSDP2) tensors
    so every rank sees the global value.
    """

    lr_scales: tuple[float, ...] = (1.25, 1.0, 0.5)
    tier_edges: tuple[float, ...] = (-1.0, 1.0)
    regroup_every: int = 100
    ema_beta: float = 0.9
    weight_floor: float = 1e-3
    reduce_dtensor_stats: bool = True
    name: str = field(default="sensitivity", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lr_scales or any(not (s > 0 and math.isfinite(s)) for s in self.lr_scales):
            raise ValueError(f"lr_scales must be positive floats, got {self.lr_scales!r}")
        if len(self.tier_edges) != len(self.lr_scales) - 1 or list(self.tier_edges) != sorted(
            self.tier_edges
        ):
            raise ValueError(
                f"tier_edges must be {len(self.lr_scales) - 1} ascending floats (one fewer than "
                f"lr_scales), got {self.tier_edges!r}"
            )
        if (
            isinstance(self.regroup_every, bool)
            or not isinstance(self.regroup_every, int)
            or (self.regroup_every < 1)
        ):
            raise ValueError(f"regroup_every must be a positive int, got {self.regroup_every!r}")
        if not 0.0 <= self.ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {self.ema_beta!r}")
        if not self.weight_floor >= 0.0:
            raise ValueError(f"weight_floor must be >= 0, got {self.weight_floor!r}")

    @property
    def dynamic(self) -> bool:
        return True

    @property
    def num_tiers(self) -> int:
        return len(self.lr_scales)

    @property
    def initial_tier(self) -> int:
        """The tier whose lr scale is closest to 1: where every tensor starts."""
        return min(range(self.num_tiers), key=lambda t: abs(math.log(self.lr_scales[t])))


_POLICIES: dict[str, StaticPolicy] = {
    "static": StaticPolicy(),
    "sensitivity": SensitivityPolicy(),
    "uniform": UniformPolicy(),
}


def register_policy(name: str, policy: StaticPolicy) -> None:
    """Make ``policy`` available as ``group_parameters(model, name)``."""
    if not isinstance(policy, StaticPolicy):
        raise TypeError(f"policy must be a StaticPolicy (or subclass), got {type(policy)!r}")
    _POLICIES[name] = policy


def get_policy(policy: str | StaticPolicy) -> StaticPolicy:
    """Resolve a policy name or object; unknown names raise ``ValueError``."""
    if isinstance(policy, StaticPolicy):
        return policy
    if isinstance(policy, str):
        if policy not in _POLICIES:
            raise ValueError(f"unknown policy {policy!r}; allowed: {sorted(_POLICIES)}")
        return _POLICIES[policy]
    raise TypeError(f"policy must be a name or a StaticPolicy, got {type(policy)!r}")


def _class_name(decay: bool, mult: float) -> str:
    base = "decay" if decay else "no_decay"
    return base if mult == 1.0 else f"{base}@lr_x{mult:g}"


def group_parameters(
    model: nn.Module, policy: str | StaticPolicy = "static"
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into optimizer groups under ``policy``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model)!r}")
    pol = get_policy(policy)
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = module
    classes: dict[tuple[bool, float], list[tuple[str, torch.Tensor]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            classes.setdefault(pol.classify(name, p, owners[name]), []).append((name, p))
    if not classes:
        raise ValueError("model has no trainable parameters")
    groups: list[dict[str, Any]] = []
    for (decay, mult), members in classes.items():
        base = {"lr_scale": mult}
        if not decay:
            base["weight_decay"] = 0.0
        cname = _class_name(decay, mult)
        if not isinstance(pol, SensitivityPolicy):
            groups.append(
                {
                    **base,
                    "name": cname,
                    "params": [p for _, p in members],
                    "param_names": [n for n, _ in members],
                }
            )
            continue
        for tier, scale in enumerate(pol.lr_scales):
            inside = tier == pol.initial_tier
            groups.append(
                {
                    **base,
                    "name": f"{cname}/tier{tier}",
                    "class": cname,
                    "tier": tier,
                    "lr_scale": mult * scale,
                    "params": [p for _, p in members] if inside else [],
                    "param_names": [n for n, _ in members] if inside else [],
                }
            )
    return groups
