"""ZeRO-1: optimizer state sharded across data-parallel ranks.

ds-optim composes with torch's ``ZeroRedundancyOptimizer`` rather than
re-implementing it: each rank keeps a ``GroupedAdamW`` over its shard of the
parameters (so moments, in fp32 or bf16, cost 1/W of the memory), steps it, and
broadcasts the updated parameters. Gradients still arrive complete on every rank
(DDP with or without the 4-bit hook), which is what ZeRO stage 1 means.

Grouping is static under ZeRO-1: ``ZeroRedundancyOptimizer`` assigns parameters to
ranks by group at construction, so a dynamic policy's regrouping is not supported
and :func:`zero_grouped_adamw` refuses a ``regrouper``.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.optim import ZeroRedundancyOptimizer

from ds_optim.adamw import GroupedAdamW

__all__ = ["zero_grouped_adamw"]


def zero_grouped_adamw(
    params: Any, process_group: Any = None, **adamw_kwargs: Any
) -> ZeroRedundancyOptimizer:
    """``ZeroRedundancyOptimizer`` over ``GroupedAdamW`` shards.

    ``params``: tensors or group dicts (e.g. from ``group_parameters(model, "static")``);
    group keys such as ``weight_decay`` and ``lr_scale`` are kept per group.
    ``param_names`` are dropped: ZeroRedundancyOptimizer re-partitions groups itself.
    """
    if adamw_kwargs.get("regrouper") is not None:
        raise ValueError(
            "regrouper is not supported under ZeRO-1 (ZeroRedundancyOptimizer partitions "
            "parameters by group once); use a static policy"
        )
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [
            {k: v for k, v in g.items() if k != "param_names"} for g in params if len(g["params"])
        ]
    return ZeroRedundancyOptimizer(
        params, optimizer_class=GroupedAdamW, process_group=process_group, **adamw_kwargs
    )
