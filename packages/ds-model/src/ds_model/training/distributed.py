"""torch.distributed plumbing: process groups, device meshes and model wrapping.

Strategies (``TrainingConfig.distributed_strategy``):

* ``none``: one process.
* ``ddp``: ``DistributedDataParallel``; ``compress_gradients=True`` registers ds-optim's
  4-bit all-reduce communication hook.
* ``fsdp``: FSDP2 ``fully_shard`` on every transformer block, then on the root
  (parameters, gradients and optimizer state sharded: ZeRO-3).
* ``3d_parallel``: a 2-D ``(dp, tp)`` device mesh; tensor parallelism with DTensor
  ``parallelize_module`` on the ``tp`` axis, then FSDP2 on the ``dp`` axis.
* ``pipeline``: the model cut into stages run by torch's pipelining schedules
  (``ds_model.training.pipeline``; the Trainer splits the model, so ``wrap_model``
  leaves it whole): one stage per rank, or with ``pp_size`` < world a
  ``(pp, dp)`` mesh of ``world / pp_size`` FSDP2 replicas of a ``pp_size``-stage
  pipeline. ``3d_parallel`` with ``pp_size`` > 1 is the full ``(pp, dp, tp)`` mesh:
  each stage tensor-parallel on ``tp`` and FSDP2-sharded on ``dp``.

Mesh coordinates: ``rank = (pp_rank * dp_size + dp_rank) * tp_size + tp_rank``, so the
ranks of one tensor-parallel group are adjacent. Ranks of one tensor-parallel group, and
the stages of one pipeline, must see the same data, so data is sharded by the
data-parallel rank (``dp_rank`` of ``dp_size``), not by the global rank.

Every collective of the process group is bounded by ``collective_timeout_s``: a rank
that dies or hangs makes the others fail with :class:`CollectiveError` (naming the
rank and the operation) after that long, instead of waiting forever.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ds_model.layout import row_major_weights

__all__ = [
    "CollectiveError",
    "DistContext",
    "default_tp_plan",
    "init_distributed",
    "tensor_parallel",
    "unwrap",
    "wrap_model",
]

_MLP_COLWISE = ("gate_proj", "up_proj", "w1", "w3")
_ROUTED_EXPERT = re.compile(r"(^|\.)experts\.\d+\.")
_MLP_ROWWISE = ("down_proj", "w2")
_CPU = torch.device("cpu")


class CollectiveError(RuntimeError):
    """A collective that did not complete: another rank failed, hung or timed out."""


@contextmanager
def collective(rank: int, operation: str) -> Iterator[None]:
    """Re-raise a failed or timed-out collective as :class:`CollectiveError` that names
    this rank and the operation (torch's message names neither clearly)."""
    try:
        yield
    except CollectiveError:
        raise
    except (RuntimeError, dist.DistError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CollectiveError(
            f"rank {rank}: collective {operation} did not complete (another rank failed, "
            f"hung or exceeded collective_timeout_s): {first}"
        ) from exc


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: global rank/world, its data-parallel coordinates, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    pp_rank: int = 0
    device: torch.device = _CPU
    mesh: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    def group(self, dim: str) -> Any:
        """The process group of mesh dimension ``dim`` (``"pp"``, ``"dp"``, ``"tp"``)
        this rank belongs to; ``None`` (the default group) when there is no mesh, i.e.
        when that dimension spans every rank."""
        if self.mesh is None:
            return None
        return self.mesh[dim].get_group()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum floats over the data-parallel ranks. Values are identical within a
        tensor-parallel group and across pipeline stages, so the sum over all ranks is
        divided by ``tp_size * pp_size``."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        with collective(self.rank, "all_reduce"):
            dist.all_reduce(t)
        return [v / (self.tp_size * self.pp_size) for v in t.tolist()]

    def barrier(self) -> None:
        if self.distributed:
            with collective(self.rank, "barrier"):
                dist.barrier()


def init_distributed(
    strategy: str,
    tp_size: int = 0,
    device: str | None = None,
    pp_size: int = 0,
    timeout_s: float = 600.0,
) -> DistContext:
    """Join the process group torchrun describes in the environment (gloo on CPU,
    NCCL on CUDA) and lay out the mesh; each collective fails after ``timeout_s``
    seconds. Without ``WORLD_SIZE`` > 1 this is a single process, whatever the
    strategy."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world <= 1 or strategy == "none":
        if world > 1:
            raise ValueError(
                f"distributed_strategy='none' but WORLD_SIZE={world}: choose ddp, fsdp, "
                "3d_parallel or pipeline when launching several processes"
            )
        return DistContext(device=dev)
    if strategy == "pipeline":
        pp = pp_size or world
    elif strategy == "3d_parallel":
        pp = max(pp_size, 1)
    else:
        pp = 1
    if world % pp:
        raise ValueError(f"pp_size={pp} does not divide the world size {world}")
    tp = 1
    if strategy == "3d_parallel":
        tp = tp_size or world // pp
        if (world // pp) % tp:
            raise ValueError(f"tp_size={tp} does not divide world size / pp_size = {world} / {pp}")
    dp = world // (pp * tp)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        with collective(rank, "init_process_group"):
            dist.init_process_group(
                "nccl" if dev.type == "cuda" else "gloo",
                timeout=datetime.timedelta(seconds=timeout_s),
            )
    mesh = None
    if strategy == "3d_parallel" or (pp > 1 and dp > 1):
        from torch.distributed.device_mesh import init_device_mesh

        shape, names = ((dp, tp), ("dp", "tp")) if pp == 1 else ((pp, dp, tp), ("pp", "dp", "tp"))
        mesh = init_device_mesh(dev.type, shape, mesh_dim_names=names)
    return DistContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        dp_rank=(rank // tp) % dp,
        dp_size=dp,
        tp_size=tp,
        pp_size=pp,
        pp_rank=rank // (dp * tp),
        device=dev,
        mesh=mesh,
    )


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the largest ``nn.ModuleList`` in the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def default_tp_plan(model: nn.Module) -> dict[str, str]:
    """``{module name: "colwise" | "rowwise"}``. A model may declare its own
    ``tp_plan`` (same format); otherwise the MLP projections (``gate_proj``/``up_proj``
    column-wise, ``down_proj`` row-wise) are sharded, which is valid for any model;
    a MoE's routed experts (``experts.<e>.``) stay replicated.
    Attention projections are sharded only through a model's own plan, since that
    needs attention code that infers the local head count from the sharded width."""
    declared = getattr(model, "tp_plan", None)
    if declared:
        return dict(declared)
    plan = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if _ROUTED_EXPERT.search(name):
            continue  # replicated: a MoE's experts split by expert, not within one
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _MLP_COLWISE:
            plan[name] = "colwise"
        elif leaf in _MLP_ROWWISE:
            plan[name] = "rowwise"
    return plan


def wrap_model(model: nn.Module, strategy: str, ctx: DistContext, config: Any) -> nn.Module:
    """Wrap ``model`` (already on ``ctx.device``) for ``strategy``."""
    # A compiled CPU generate re-lays Linear weights input-major: FSDP2 refuses that
    # layout, and single-process training ran 3.6% slower on it (fwd+bwd, shipped shape).
    row_major_weights(model)
    if not ctx.distributed or strategy == "none" or ctx.pp_size > 1:
        return model  # a pipeline's stages are wrapped by its runner
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # An MoE step can leave experts without tokens (no gradient); DDP must then
        # look for unused parameters or it waits forever for their buckets.
        find_unused = config.ddp_find_unused_parameters
        if find_unused is None:
            find_unused = _has_routed_experts(model)
        ddp = DistributedDataParallel(
            model,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=find_unused,
        )
        if config.compress_gradients:
            _register_int4_hook(ddp)
        return ddp
    from torch.distributed.fsdp import fully_shard

    if strategy == "3d_parallel":
        tensor_parallel(model, ctx.mesh["tp"])
        dp_mesh = ctx.mesh["dp"]
    else:
        dp_mesh = None
    for block in _blocks(model):
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model


def tensor_parallel(model: nn.Module, tp_mesh: Any) -> None:
    """Shard ``model``'s layers named by :func:`default_tp_plan` over ``tp_mesh`` with
    DTensor's ``parallelize_module``. Names the plan declares but the model no longer
    has (another pipeline stage's layers) are skipped."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    if any(hasattr(m, "base_layer") for m in model.modules()):
        raise ValueError(
            "3d_parallel: tensor parallelism with LoRA adapters is not supported (the "
            "plan shards nn.Linear layers, which LoRA wraps); train LoRA with tp_size=1 "
            "under fsdp, pipeline, or 3d_parallel"
        )
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    present = {name for name, _ in model.named_modules()}
    plan = {k: styles[v]() for k, v in default_tp_plan(model).items() if k in present}
    if not plan:
        raise ValueError("3d_parallel: the model has no layer the tensor-parallel plan shards")
    parallelize_module(model, tp_mesh, plan)


def _register_int4_hook(ddp: nn.Module) -> None:
    from ds_optim import QuantizedAllreduceState, int4_allreduce_hook

    ddp.register_comm_hook(QuantizedAllreduceState(bits=4), int4_allreduce_hook)  # type: ignore[operator]


def _has_routed_experts(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "n_routed_experts", None))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model


@contextmanager
def no_grad_sync(model: nn.Module, strategy: str, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches before the last of a step."""
    if not enabled:
        yield
        return
    if strategy == "ddp" and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    if strategy in ("fsdp", "3d_parallel") and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    with nullcontext():
        yield


def is_sharded(strategy: str, ctx: DistContext) -> bool:
    return ctx.distributed and strategy in ("fsdp", "3d_parallel")
