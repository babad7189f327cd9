"""Pipeline parallelism (``distributed_strategy="pipeline"``): ds-model's decoder cut
into consecutive stages, one per rank, run by ``torch.distributed.pipelining``.

- Split (``split_layers``, ``keep_stage``): rank ``r`` of ``n`` keeps a contiguous run
  of decoder layers, as even as possible (earlier stages take one more when ``n`` does
  not divide the layer count); the first stage also keeps the embedding, the last the
  final norm and the LM head. Everything else is dropped from that rank's model in
  place (parameter-free placeholders keep the layer indices), so a rank holds,
  optimizes and checkpoints only its stage's weights, under their full-model names.
- Micro-batches: a step's gradient-accumulation micro-batches are the pipeline's.
  torch's 1F1B schedule runs them when there are at least as many as stages, GPipe
  when fewer; with one micro-batch per step the stages just take turns, so set
  ``gradient_accumulation_steps`` to at least the number of stages.
- Interleaving (``pp_virtual_stages`` = v > 1): the layers are cut into pp * v stages
  and rank r runs stages r, r + pp, ... (Megatron's interleaved order) under torch's
  ``ScheduleInterleaved1F1B``, which idles less; when the step's micro-batch count
  does not split into its rounds (max(1, n // pp) must divide n), under
  ``ScheduleLoopedBFS``.
- Shapes: torch's stages fix their tensor shapes on first use, so a step's
  micro-batches are right-padded to one (batch, length), the length rounded up to a
  multiple of ``PAD_MULTIPLE`` (the largest over data-parallel replicas, which run
  the step together); each distinct shape gets its own stage object. Padded
  rows and positions have label -100, so the loss is that of the unpadded batch.
- Loss: summed over tokens on the last stage, divided by the global batch's trained
  tokens (as under every strategy), and broadcast to every rank for logging.
- Replicas: with ``pp_size`` below the world size, each stage is FSDP2-sharded over
  its data-parallel replicas (and tensor-parallel first under ``3d_parallel``);
  torch's schedules accumulate its gradients over the micro-batches and reduce them
  once per step. Checkpoints hold whole tensors, so a pipeline checkpoint resumes on
  any data- or tensor-parallel width with the same number of stages (and, for the
  same data order, the same global batch).
- LoRA / QLoRA: adapters are split with their layers; each stage trains and
  checkpoints its own part, gathered into one PEFT-format adapter.

Limits (clear errors): ds-model's ``DeepSeekForCausalLM`` with untied embeddings and at
least one layer per stage; the language-model loss of ``Trainer`` (not DPO or
distillation); no torch.compile, no fp16.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ds_model.training.loss import causal_lm_loss_sum

__all__ = ["PAD_MULTIPLE", "PipelineRunner", "keep_stage", "keep_stages", "split_layers"]

PAD_MULTIPLE = 16


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Consecutive layer ranges, one per stage, sizes differing by at most one."""
    if num_stages < 1 or num_layers < num_stages:
        raise ValueError(
            f"pipeline: {num_stages} stages need at least one decoder layer each; the "
            f"model has {num_layers}"
        )
    base, extra = divmod(num_layers, num_stages)
    out, start = [], 0
    for stage in range(num_stages):
        size = base + (stage < extra)
        out.append(range(start, start + size))
        start += size
    return out


class _Elsewhere(nn.Module):
    """Stands where a module owned by another pipeline stage was: no parameters."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.owner_name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.owner_name} lives on another pipeline stage")

    def extra_repr(self) -> str:
        return self.owner_name


def keep_stage(model: nn.Module, stage: int, num_stages: int) -> range:
    """Drop, in place, every part of ``model`` (a ds-model ``DeepSeekForCausalLM``) that
    stage ``stage`` of ``num_stages`` does not run; returns the layers it keeps."""
    return keep_stages(model, [stage], num_stages)[0]


def keep_stages(model: nn.Module, stages: list[int], num_stages: int) -> list[range]:
    """:func:`keep_stage` for a rank running several stages (interleaved schedules):
    keeps the layers of every stage in ``stages``; returns their ranges in order."""
    decoder = getattr(model, "model", None)
    if not (hasattr(decoder, "layers") and hasattr(decoder, "forward_context")) or not hasattr(
        model, "lm_head"
    ):
        raise ValueError(
            "distributed_strategy='pipeline' needs a ds-model DeepSeekForCausalLM (with "
            f"model.layers, model.forward_context and lm_head), got {type(model).__name__}"
        )
    if any(isinstance(m, _Elsewhere) for m in model.modules()):
        raise ValueError(
            "pipeline: this model is already one stage of a split model; split a whole one"
        )
    if _weight(model.lm_head) is _weight(decoder.embed_tokens):
        raise ValueError(
            "distributed_strategy='pipeline' with tie_word_embeddings=True is not "
            "supported: the tied weight would live on the first and the last stage"
        )
    ranges = [split_layers(len(decoder.layers), num_stages)[s] for s in stages]
    kept = {i for r in ranges for i in r}
    for i in range(len(decoder.layers)):
        if i not in kept:
            decoder.layers[i] = _Elsewhere(f"model.layers.{i}")
    if 0 not in stages:
        decoder.embed_tokens = _Elsewhere("model.embed_tokens")
    if num_stages - 1 not in stages:
        decoder.norm = _Elsewhere("model.norm")
        model.lm_head = _Elsewhere("lm_head")
    return ranges


def _weight(module: nn.Module) -> Any:
    """A layer's weight, looking through an adapter wrapper (``base_layer``)."""
    base = getattr(module, "base_layer", module)
    return getattr(base, "weight", base)


class _Stage(nn.Module):
    """One stage's forward: token ids (first stage) or hidden states (batch, seqlen,
    hidden) in; hidden states, or logits (batch, seqlen, vocab) on the last stage, out.
    Right-padded batches under causal attention: positions 0..seqlen-1, no mask.

    It registers only the modules the stage runs (shared with ``model``, which keeps
    its names for checkpoints), so each of a rank's stages owns disjoint parameters."""

    def __init__(
        self,
        model: nn.Module,
        layers: range,
        first: bool,
        last: bool,
        autocast: Callable[[], AbstractContextManager],
    ) -> None:
        super().__init__()
        decoder = model.model
        object.__setattr__(self, "_decoder", decoder)  # not a submodule: not owned
        self.embed_tokens = decoder.embed_tokens if first else None
        self.layers = nn.ModuleList(decoder.layers[i] for i in layers)
        self.norm = decoder.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.first, self.last = first, last
        self._autocast = autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            h = self.embed_tokens(x) if self.first else x
            b, t = h.shape[:2]
            positions = torch.arange(t, device=h.device).expand(b, t)
            ctx = self._decoder.forward_context(positions)
            for layer in self.layers:
                h = layer(h, ctx)
            if self.last:
                h = self.lm_head(self.norm(h))
        return h


class PipelineRunner:
    """This rank's stage of ``model`` (split in place) and the schedules that run it.

    ``ctx`` (a ``DistContext``) places the rank: stage ``ctx.pp_rank`` of
    ``ctx.pp_size``, talking to the other stages over its ``pp`` group. Where the mesh
    has data-parallel replicas or a tensor-parallel axis, :meth:`parallelize` shards
    the stage (TP on ``tp``, then FSDP2 on ``dp``: torch's schedules then accumulate
    gradients over the micro-batches and reduce them once per step).

    ``step(batches, scale)`` runs forward and backward over a step's micro-batches
    (dicts with ``input_ids`` and ``labels``, (batch, seqlen)); every micro-batch's
    loss sum times ``scale(loss)`` is what is back-propagated. Returns the step's loss
    sum (unscaled) on every rank of the pipeline."""

    def __init__(
        self,
        model: nn.Module,
        ctx: Any,
        autocast: Callable[[], AbstractContextManager],
        virtual: int = 1,
    ) -> None:
        self.ctx, self.lm = ctx, model
        self.rank, self.num_stages, self.device = ctx.pp_rank, ctx.pp_size, ctx.device
        self.group = ctx.group("pp")  # None: the default group (every rank a stage)
        self.sharded = ctx.dp_size > 1 or ctx.tp_size > 1
        self.max_len = int(model.config.max_position_embeddings)
        # Interleaved: stage ids rank, rank + pp, ... of pp * virtual (Megatron's order).
        total = self.num_stages * virtual
        self.stage_ids = [self.rank + k * self.num_stages for k in range(virtual)]
        ranges = keep_stages(model, self.stage_ids, total)
        self.layers = [i for r in ranges for i in r]
        self.modules = [
            _Stage(model, r, sid == 0, sid == total - 1, autocast)
            for sid, r in zip(self.stage_ids, ranges, strict=True)
        ]
        self._parallelized = False
        self._schedules: dict[tuple[Any, ...], Any] = {}
        self._scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss
        self._sums: list[torch.Tensor] = []

    def parallelize(self) -> None:
        """Shard the stage over its replicas (after it moved to its device); once."""
        if not self.sharded or self._parallelized:
            return
        from torch.distributed.fsdp import fully_shard

        from ds_model.training.distributed import tensor_parallel

        model, mesh = self.lm, self.ctx.mesh
        if self.ctx.tp_size > 1:
            tensor_parallel(model, mesh["tp"])
        for i in self.layers:
            fully_shard(model.model.layers[i], mesh=mesh["dp"])
        # Each stage is an FSDP root: torch's schedules drive its gradient reduction.
        for module in self.modules:
            fully_shard(module, mesh=mesh["dp"])
        self._parallelized = True

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.num_stages - 1

    def step(
        self, batches: list[dict[str, torch.Tensor]], scale: Callable[[torch.Tensor], torch.Tensor]
    ) -> float:
        return self._run(batches, scale, train=True)

    @torch.no_grad()
    def loss_sum(self, batch: dict[str, torch.Tensor]) -> float:
        """Forward only: the summed token loss of one batch, on every rank."""
        return self._run([batch], lambda loss: loss, train=False)

    def _run(self, batches, scale, train: bool) -> float:
        ids, labels = self._padded(batches)
        schedule = self._schedule(len(ids), tuple(ids[0].shape))
        self._scale, self._sums = scale, []
        kwargs: dict[str, Any] = {}
        if self.is_first:
            kwargs["arg_mbs"] = [(x,) for x in ids]
        if self.is_last:
            kwargs.update(target_mbs=labels, losses=[])
        if train:
            schedule.step(**kwargs, return_outputs=False)
        else:
            schedule.eval(**kwargs)
        if self.sharded:
            # FSDP2 keeps a root's parameters gathered after a forward with no backward
            # (evaluation); reshard, so the module holds the optimizer's sharded ones.
            for stage in self.modules:
                for m in stage.modules():
                    if hasattr(m, "reshard"):
                        m.reshard()
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.is_last:
            # The last n calls: a new stage object's first step also runs the loss once,
            # before the micro-batches, to learn the shapes of its gradients.
            total += sum(float(s) for s in self._sums[-len(ids) :])
        dist.broadcast(total, group=self.group, group_src=self.num_stages - 1)
        return float(total)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total, _ = causal_lm_loss_sum(logits, labels)
        self._sums.append(total.detach())
        return self._scale(total)

    def _schedule(self, n_micro: int, shape: tuple[int, ...]):
        from torch.distributed import pipelining as pp

        key = (n_micro, shape)
        if key not in self._schedules:
            # Shapes are fixed per stage object (its receive buffers), hence one per shape.
            total = self.num_stages * len(self.modules)
            stages = [
                pp.PipelineStage(m, sid, total, self.device, group=self.group)
                for m, sid in zip(self.modules, self.stage_ids, strict=True)
            ]
            # scale_grads=False: the loss is already normalised by the global batch.
            kw = dict(n_microbatches=n_micro, loss_fn=self._loss, scale_grads=False)
            if len(stages) == 1:
                cls = pp.Schedule1F1B if n_micro >= self.num_stages else pp.ScheduleGPipe
                self._schedules[key] = cls(stages[0], **kw)
            else:
                # torch's interleaved 1F1B needs n_micro to split into whole rounds of
                # max(1, n_micro // pp); otherwise (an epoch's short last step) the
                # looped breadth-first order runs the same stages.
                rounds = max(1, n_micro // self.num_stages)
                interleaved = n_micro % rounds == 0
                cls = pp.ScheduleInterleaved1F1B if interleaved else pp.ScheduleLoopedBFS
                self._schedules[key] = cls(stages, **kw)
        return self._schedules[key]

    def _padded(self, batches) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        rows = max(b["input_ids"].shape[0] for b in batches)
        longest = max(b["input_ids"].shape[1] for b in batches)
        if self.ctx.dp_size > 1:
            # Replicas pad to one shape, so they build their stage objects in step: a new
            # one runs an extra forward (torch's shape inference) over sharded weights.
            # (A test with differing shapes also passed without this; kept as cheap.)
            both = torch.tensor([rows, longest], device=self.device)
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.ctx.group("dp"))
            rows, longest = (int(v) for v in both)
        if longest > self.max_len:
            raise ValueError(
                f"sequence length {longest} exceeds the model's context "
                f"max_position_embeddings={self.max_len}"
            )
        length = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, self.max_len)
        ids, labels = [], []
        for b in batches:
            r, t = b["input_ids"].shape
            pad = (0, length - t, 0, rows - r)
            ids.append(F.pad(b["input_ids"], pad, value=0))
            labels.append(F.pad(b["labels"], pad, value=-100))
        return ids, labels

    # ------------------------------------------------------------- checkpoints
    @property
    def sends(self) -> bool:
        """Whether this rank speaks for its stage in checkpoints: the first replica's
        first tensor-parallel rank (the stage's tensors are whole there once gathered)."""
        return self.ctx.dp_rank == 0 and self.ctx.tp_rank == 0

    def gather(self, obj: Any) -> list[Any] | None:
        """``obj`` of every stage, in stage order, on rank 0 (``None`` elsewhere), its
        tensors moved to the CPU first (they travel pickled). With replicas, the
        stages of the pipeline holding rank 0 send theirs (make ``obj`` whole first:
        :meth:`model_state`, :meth:`optimizer_state`); the others send nothing."""
        if not self.sends:
            return None
        out = [None] * self.num_stages if self.ctx.rank == 0 else None
        dist.gather_object(_to_cpu(obj), out, group=self.group, group_dst=0)
        return out

    def merged(self, part: dict[str, Any] | None) -> dict[str, Any] | None:
        """Every stage's ``part`` (disjoint keys) merged into one dict, on rank 0."""
        parts = self.gather(part)
        if parts is None:
            return None
        out: dict[str, Any] = {}
        for p in parts:
            out.update(p)
        return out

    def model_state(
        self, model: nn.Module, names: set[str] | None = None
    ) -> dict[str, torch.Tensor] | None:
        """This stage's weights (those in ``names``, default all) by full-model name,
        whole and on the CPU where :attr:`sends`, ``None`` elsewhere. A collective
        over the stage's replicas when it is sharded."""
        state = model.state_dict()
        if names is not None:
            state = {k: v for k, v in state.items() if k in names}
        return self._whole(state)

    def optimizer_state(self, model: nn.Module, optimizer: Any) -> dict[str, Any] | None:
        """This stage's optimizer state keyed by parameter name, whole, where
        :attr:`sends` (``None`` elsewhere): it loads into a stage of any data- or
        tensor-parallel width (:meth:`load_state`)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return self._whole(get_optimizer_state_dict(model, optimizer))

    def _whole(self, obj: Any) -> Any:
        # Each sharded tensor is gathered then moved to the CPU before the next, so a
        # device holds one whole tensor at a time; ranks that do not send drop them.
        out = _to_cpu(obj, keep=self.sends)
        return out if self.sends else None

    def load_state(self, model: nn.Module, weights: dict, optimizer: Any, optim: dict) -> None:
        """Load whole weights (this stage's, by name; an adapter's alone is fine) and
        :meth:`optimizer_state`'s output into the (possibly sharded) stage."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # strict=False for the optimizer too: a parameter that never had a gradient
        # (a routed expert no token reached) has no saved state, as in torch's own.
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=opts)
        set_optimizer_state_dict(model, optimizer, optim, options=opts)

    def agree(self, error: str | None, exc: type[Exception] = ValueError) -> None:
        """Raise ``exc(first error)`` on every rank if any rank has one, so that a
        problem found on one stage (its checkpoint part, its parameters) stops the
        whole job instead of leaving the others waiting on it."""
        errors: list[str | None] = [None] * self.ctx.world_size
        dist.all_gather_object(errors, error)
        found = [(rank, e) for rank, e in enumerate(errors) if e]
        if found:
            rank, message = found[0]
            raise exc(f"pipeline rank {rank}: {message}")

    def stage_keys(self, keys: list[str]) -> list[str]:
        """The union over all stages of ``keys`` (each stage's own)."""
        parts: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(parts, list(keys))
        return sorted({k for part in parts for k in part})


def _to_cpu(obj: Any, keep: bool = True) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples) whole (DTensors
    gathered: a collective) and moved to the CPU; with ``keep=False`` the tensors are
    gathered and dropped (a rank taking part in the gather for another)."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "full_tensor"):
            obj = obj.full_tensor()
        return obj.detach().cpu() if keep else None
    if isinstance(obj, dict):
        return {k: _to_cpu(v, keep) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v, keep) for v in obj)
    return obj
