"""The optimizer a :class:`TrainingConfig` names, and how its state is checkpointed.

``optimizer="grouped_adamw"`` is ds-optim's ``GroupedAdamW`` over the groups of
``optimizer_grouping``:

- ``"static"``: no weight decay on biases, norms and embeddings (ds-optim's static
  policy); the groups never change.
- ``"sensitivity"``: the static classes split into lr tiers, and every
  ``regroup_every`` optimizer steps each tensor moves to the tier of its
  grad-to-weight ratio (ds-optim's ``SensitivityPolicy`` and ``SensitivityRegrouper``).
  The tier membership and the statistic are part of the optimizer's state, so a
  resumed run regroups exactly as an uninterrupted one.

``zero_stage=1`` (ddp only) wraps it in ds-optim's ZeRO-1 (``zero_grouped_adamw``, torch's
``ZeroRedundancyOptimizer``): each data-parallel rank keeps the moments of its share
of the parameters, steps them and broadcasts the result. With one process there is
nothing to shard and the optimizer is the plain ``GroupedAdamW``.

Checkpoints of a ZeRO-1 run: every rank writes its own shard (``optimizer_shard_<rank>.pt``,
the local ``GroupedAdamW``'s state) and ``optimizer.pt`` holds only a header (stage,
world size, the group hyperparameters the LR schedule drives). Nothing is gathered
on one rank; a ZeRO-1 checkpoint resumes with ``zero_stage=1`` on as many ranks.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ds_model.training.checkpoint import CheckpointError, load_state_file

__all__ = [
    "build_optimizer",
    "load_optimizer_state",
    "optimizer_state",
    "save_optimizer_shard",
]

ZERO_FORMAT = "ds-zero-1"


def build_optimizer(model: nn.Module, args: Any) -> torch.optim.Optimizer:
    """The optimizer ``args`` (a ``TrainingConfig``) names over ``model``'s trainable
    parameters; ``model`` is the unwrapped module (DDP shares its tensors)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    kwargs = {
        "lr": args.learning_rate,
        "betas": tuple(args.adam_betas),
        "eps": args.adam_eps,
        "weight_decay": args.weight_decay,
    }
    if args.optimizer == "adamw":
        decay = [p for _, p in trainable if p.ndim >= 2]
        no_decay = [p for _, p in trainable if p.ndim < 2]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], **kwargs)

    from ds_optim import GroupedAdamW, SensitivityPolicy, group_parameters, zero_grouped_adamw

    if args.zero_stage == 1 and _world_size() > 1:
        # TrainingConfig allows ZeRO-1 with static groups only (ZeroRedundancyOptimizer
        # assigns parameters to ranks once, by group).
        return zero_grouped_adamw(group_parameters(model, "static"), **kwargs)
    policy: Any = "static"
    if args.optimizer_grouping == "sensitivity":
        policy = SensitivityPolicy(regroup_every=args.regroup_every)
    return GroupedAdamW.from_model(model, policy, **kwargs)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_zero(optimizer: Any) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def _shard_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"optimizer_shard_{rank}.pt")


def save_optimizer_shard(optimizer: Any, directory: str, rank: int) -> None:
    """Under ZeRO-1, write this rank's optimizer shard into ``directory`` (every rank
    calls it); otherwise nothing (``optimizer.pt`` holds the whole state)."""
    if _is_zero(optimizer):
        torch.save(optimizer.optim.state_dict(), _shard_file(directory, rank))


def optimizer_state(optimizer: Any) -> dict[str, Any]:
    """What ``optimizer.pt`` holds: the optimizer's state dict, or under ZeRO-1 a header
    (the shards are in ``optimizer_shard_<rank>.pt``)."""
    if not _is_zero(optimizer):
        return optimizer.state_dict()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"format": ZERO_FORMAT, "world_size": optimizer.world_size, "param_groups": groups}


def load_optimizer_state(optimizer: Any, state: Any, directory: str, rank: int) -> None:
    """Restore what :func:`optimizer_state` and :func:`save_optimizer_shard` wrote from
    checkpoint ``directory``; a ZeRO-1 checkpoint and a whole-state one do not mix
    (``CheckpointError`` saying how to resume)."""
    saved_zero = isinstance(state, dict) and state.get("format") == ZERO_FORMAT
    if not _is_zero(optimizer):
        if saved_zero:
            raise CheckpointError(
                f"{directory} holds ZeRO-1 optimizer shards of {state.get('world_size')} ranks; "
                f"resume it with zero_stage=1 and distributed_strategy='ddp' on "
                f"{state.get('world_size')} ranks"
            )
        optimizer.load_state_dict(state)
        return
    if not saved_zero:
        raise CheckpointError(
            f"{directory} holds a whole optimizer state (a zero_stage=0 or one-process run); "
            "resume it with zero_stage=0"
        )
    if state["world_size"] != optimizer.world_size:
        raise CheckpointError(
            f"{directory} holds ZeRO-1 optimizer shards of {state['world_size']} ranks; this "
            f"run has {optimizer.world_size}: resume on {state['world_size']} ranks"
        )
    groups = state["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{directory}: the saved optimizer has {len(groups)} parameter groups, this one "
            f"{len(optimizer.param_groups)} (another model or LoRA target set?)"
        )
    try:
        optimizer.optim.load_state_dict(load_state_file(_shard_file(directory, rank)))
    except (KeyError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(
            f"{_shard_file(directory, rank)} does not fit this rank's optimizer shard: {exc}"
        ) from None
    # The group hyperparameters (lr as the schedule left it, ...) live on the outer
    # optimizer; ZeroRedundancyOptimizer copies them into the shard at every step.
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
