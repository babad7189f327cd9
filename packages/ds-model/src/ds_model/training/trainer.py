"""``Trainer``: full training and LoRA / QLoRA fine-tuning of a causal LM.

One optimizer step (:meth:`Trainer.train_step`) = ``gradient_accumulation_steps``
micro-batches of ``per_device_train_batch_size`` sequences on each data-parallel rank.
The loss of a step is the sum of token losses over that whole global batch divided by
its number of trained tokens, exactly as one process with the same global batch would
compute it. ``train()`` builds the run's parts once (:class:`TrainingSetup`), restores a
checkpoint if asked, then loops over ``train_step()``, logging, evaluating and saving
(:class:`~ds_model.training.checkpointer.Checkpointer`) as configured.

Subclasses (``DPOTrainer``, ``DistillationTrainer``) change what a batch is and how its
loss is computed by overriding ``build_dataset``, ``loss_weight`` and ``compute_loss``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ds_model import lean_backward
from ds_model.training import checkpoint as ckpt
from ds_model.training.builders import (
    apply_lora,
    base_directory,
    build_optimizer,
    load_model,
    quantize_for_qlora,
    resolve_tokenizer,
)
from ds_model.training.checkpointer import Checkpointer
from ds_model.training.config import TrainingConfig
from ds_model.training.data import (
    LM_KINDS,
    DataReport,
    build_lm_dataset,
    check_data_file,
    collate_lm,
    micro_batch_indices,
)
from ds_model.training.distributed import (
    DistContext,
    init_distributed,
    is_sharded,
    no_grad_sync,
    wrap_model,
)
from ds_model.training.loss import causal_lm_loss_sum
from ds_model.training.peft_adapter import adapter_state, write_adapter
from ds_model.training.pipeline import PipelineRunner
from ds_model.training.plot import write_loss_png
from ds_model.training.schedule import warmup_cosine

__all__ = ["RunPosition", "StepMetrics", "TrainResult", "Trainer", "TrainingSetup"]

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What a finished ``train()`` returns. ``losses[i]`` is the loss of step ``i + 1``
    (steps before a resume included, from the checkpoint's history)."""

    global_step: int
    losses: list[float]
    eval_history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: str | None = None
    metrics_path: str | None = None
    plot_path: str | None = None
    data_report: DataReport | None = None


@dataclass
class RunPosition:
    """Where a run is: steps done, the data position ``(epoch, micro-batch within the
    epoch)`` and the loss and eval history. What a checkpoint's ``trainer_state.json``
    records, so a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    micro: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    tokens_seen: int = 0  # since this train() call began (for tokens/s), not saved

    def to_state(self) -> dict[str, Any]:
        return {
            "global_step": self.step,
            "epoch": self.epoch,
            "micro_in_epoch": self.micro,
            "losses": self.losses,
            "eval_history": self.evals,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunPosition:
        return cls(
            step=state["global_step"],
            epoch=state["epoch"],
            micro=state["micro_in_epoch"],
            losses=list(state["losses"]),
            evals=list(state["eval_history"]),
        )


@dataclass
class TrainingSetup:
    """Everything ``train()`` builds before its first step: where this process sits,
    the model as loaded and as trained (wrapped, compiled), its pipeline stage, the
    optimizer, schedule and loss scaler, the data, the step count and the checkpointer."""

    ctx: DistContext
    model: nn.Module  # the eager model (LoRA injected, QLoRA quantized); `Trainer.model`
    wrapped: nn.Module  # as trained: DDP / FSDP2 / tensor-parallel, or one pipeline stage
    forward_model: nn.Module  # `wrapped`, or its torch.compile'd form for the forward
    pipeline: PipelineRunner | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    dataset: Any
    eval_set: Any
    report: DataReport
    micro_per_epoch: int
    total_steps: int
    checkpointer: Checkpointer
    position: RunPosition = field(default_factory=RunPosition)
    order: list[int] = field(default_factory=list)  # the current epoch's sample order


@dataclass
class StepMetrics:
    """One optimizer step's numbers (reduced over every rank)."""

    loss: float
    lr: float
    grad_norm: float
    tokens: int
    extras: dict[str, float] = field(default_factory=dict)  # e.g. kl / ce per unit

    def record(self, step: int, epoch: int, tokens_per_s: float) -> dict[str, Any]:
        """The step's line in ``metrics.jsonl``."""
        return {
            "step": step,
            "epoch": epoch,
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "tokens_per_s": tokens_per_s,
            **self.extras,
        }


class Trainer:
    """Train a causal LM whose ``forward(input_ids)`` returns an object with ``.logits``
    of shape (batch, seqlen, vocab).

    The call form::

        Trainer(model, args=TrainingConfig(...), lora_config=lora_config,
                train_dataset=data, eval_dataset=None, tokenizer=None).train()

    ``model`` is an ``nn.Module``, a checkpoint directory or a preset name; ``args`` a
    :class:`TrainingConfig`, and any of its fields may be passed as a keyword instead
    (``per_device_train_batch_size=8, num_train_epochs=3``, as HF's ``Trainer``);
    ``lora_config`` a ``LoraConfig`` (none: full training). Data is a path to a
    .json/.jsonl file, an iterable of records or strings, or a ready dataset.

    DeepSeek's published form also works: ``Trainer(model_path=path,
    config=lora_config).train(data_path="d.json", epochs=3)``, where ``model_path=``
    names the model and ``config=`` is the ``LoraConfig`` (a ``TrainingConfig`` there is
    taken as ``args``).
    """

    def __init__(
        self,
        model: nn.Module | str | None = None,
        *,
        model_path: str | None = None,
        config: Any = None,
        args: TrainingConfig | None = None,
        lora_config: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        tokenizer: Any = None,
        device: str | None = None,
        **options: Any,
    ) -> None:
        source, args, lora_config = _resolve_arguments(
            model, model_path, config, args, lora_config, options
        )
        self.args = _fit_seq_len(args, source)
        self.lora_config = lora_config
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.model: nn.Module | None = source if isinstance(source, nn.Module) else None
        self.log_history: list[dict[str, Any]] = []
        self.setup: TrainingSetup | None = None  # built by train()
        self._model_source = source
        self._base = base_directory(source)  # adapters name their base
        self._tokenizer = tokenizer
        self._device = device
        self._model_ready = False  # quantized / LoRA-injected once, reused by later train()s

    # ----------------------------------------------------------------- hooks
    data_kinds: tuple[str, ...] = LM_KINDS  # the record kinds build_dataset accepts

    def build_dataset(self, source: Any, tokenizer: Any) -> tuple[Any, DataReport]:
        return build_lm_dataset(
            source,
            tokenizer,
            max_seq_len=self.args.max_seq_len,
            packing=self.args.packing,
            skip_bad_records=self.args.skip_bad_records,
        )

    def collate(self, dataset: Any, items: list[Any]) -> dict[str, torch.Tensor]:
        collate = getattr(dataset, "collate", None)
        return collate(items) if callable(collate) else collate_lm(items)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        """How many units (trained tokens here) the batch's loss sum covers."""
        return float((batch["labels"][:, 1:] != -100).sum())

    def compute_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss summed over the batch's units, extra metric sums to log)."""
        logits = forward_logits(model, batch["input_ids"])
        total, _ = causal_lm_loss_sum(logits, batch["labels"])
        return total, {}

    def prepare_models(self, ctx: DistContext) -> None:
        """Move auxiliary models (reference, teacher) to the device; for subclasses."""

    # ------------------------------------------------------------- training
    def train(
        self,
        data_path: Any = None,
        epochs: int | None = None,
        *,
        resume_from: str | None = None,
        max_steps: int | None = None,
        eval_data: Any = None,
    ) -> TrainResult:
        """Run training. ``resume_from`` is a checkpoint or an output directory (its
        newest checkpoint is used), or ``"auto"``: the newest complete checkpoint in
        ``output_dir`` if there is one, else a fresh start; a resumed run continues
        exactly as the uninterrupted one would have."""
        changes: dict[str, Any] = {}
        if epochs is not None:
            changes["num_train_epochs"] = epochs
        if max_steps is not None:
            changes["max_steps"] = max_steps
        args = self.args = self.args.replace(**changes) if changes else self.args
        source = data_path if data_path is not None else self.train_dataset
        if source is None:
            raise ValueError("no training data: pass train_dataset= or train(data_path=...)")
        if eval_data is not None:
            self.eval_dataset = eval_data
        _check_output_dir(args.output_dir)
        resume_dir = ckpt.resume_checkpoint(resume_from, args.output_dir)
        # Bad data is reported before the model loads (minutes, for a large one).
        for data in (source, self.eval_dataset):
            check_data_file(data, self.data_kinds, args.skip_bad_records)

        setup = self.setup = self._build(source)
        ctx = setup.ctx
        if resume_dir is not None:
            setup.position = RunPosition.from_state(setup.checkpointer.load(resume_dir))
        position = setup.position
        metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        if ctx.is_main:
            os.makedirs(args.output_dir, exist_ok=True)
            _truncate_metrics(metrics_path, position.step)
        setup.order = _epoch_order(len(setup.dataset), args.seed, position.epoch, args.shuffle)

        progress = _progress(setup.total_steps, position.step, ctx.is_main and args.progress_bar)
        started, last_checkpoint, last_save = time.perf_counter(), None, time.monotonic()
        setup.wrapped.train()
        while position.step < setup.total_steps:
            metrics = self.train_step()
            step, done = position.step, position.step == setup.total_steps
            tokens_per_s = position.tokens_seen / max(time.perf_counter() - started, 1e-9)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics.loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
            if step % args.logging_steps == 0 or done:
                record = metrics.record(step, position.epoch, tokens_per_s)
                self._log(metrics_path, record, ctx)
            if setup.eval_set is not None and (_every(args.eval_steps, step) or done):
                result = {**self.evaluate(setup.eval_set), "step": step}
                position.evals.append(result)
                self._log(metrics_path, result, ctx)
                setup.wrapped.train()
            due = args.save_minutes and time.monotonic() - last_save >= args.save_minutes * 60
            if _is_save_step(args, step, due, ctx) or (done and args.save_final):
                last_save = time.monotonic()
                last_checkpoint = setup.checkpointer.save(step, position.to_state(), args.to_dict())
        progress.close()
        return TrainResult(
            global_step=position.step,
            losses=position.losses,
            eval_history=position.evals,
            checkpoint=last_checkpoint,
            metrics_path=metrics_path,
            plot_path=self._plot(position),
            data_report=setup.report,
        )

    def train_step(self) -> StepMetrics:
        """One optimizer step over the run's next micro-batches: forward and backward of
        each (the loss sum scaled by the global batch's weight), gradients clipped, the
        optimizer, loss scaler and learning-rate schedule stepped. Advances
        ``setup.position``; every rank calls it."""
        setup = self._require_setup()
        ctx, position = setup.ctx, setup.position
        batches = self._next_batches(setup)
        weights = [0.0 if "zero_weight" in b else self.loss_weight(b) for b in batches]
        sums = ctx.all_reduce_sum([sum(weights), float(sum(_tokens(b) for b in batches))])
        global_weight, global_tokens = sums
        if global_weight <= 0:
            raise ValueError(f"step {position.step + 1}: the global batch has no trained tokens")
        scale = _loss_scale(setup.scaler, ctx.dp_size / global_weight)
        if setup.pipeline is not None:
            loss_total, extra_total = setup.pipeline.step(batches, scale), {}
        else:
            loss_total, extra_total = self._accumulate(setup, batches, scale)
        grad_norm = self._optimizer_step(setup)
        reduced = ctx.all_reduce_sum([loss_total, *extra_total.values()])
        loss = reduced[0] / global_weight
        position.micro += len(batches)
        position.step += 1
        position.tokens_seen += int(global_tokens)
        position.losses.append(loss)
        return StepMetrics(
            loss=loss,
            lr=setup.scheduler.get_last_lr()[0],
            grad_norm=grad_norm,
            tokens=int(global_tokens),
            extras={k: v / global_weight for k, v in zip(extra_total, reduced[1:], strict=True)},
        )

    def _next_batches(self, setup: TrainingSetup) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next step (a new epoch begins when the last
        one is used up; its last step may have fewer micro-batches)."""
        args, ctx, position = self.args, setup.ctx, setup.position
        if position.micro >= setup.micro_per_epoch:
            position.epoch, position.micro = position.epoch + 1, 0
            setup.order = _epoch_order(len(setup.dataset), args.seed, position.epoch, args.shuffle)
        count = min(args.gradient_accumulation_steps, setup.micro_per_epoch - position.micro)
        batches = []
        for m in range(position.micro, position.micro + count):
            idx = micro_batch_indices(
                setup.order, m, args.per_device_train_batch_size, ctx.dp_size, ctx.dp_rank
            )
            batches.append(self._batch(setup.dataset, idx, setup.order, ctx))
        return batches

    def _accumulate(self, setup: TrainingSetup, batches, scale) -> tuple[float, dict[str, float]]:
        """Forward and backward over a step's micro-batches, back-propagating
        ``scale(loss sum)`` of each; returns the step's loss sum and extra metric sums."""
        args = self.args
        loss_total, extra_total = 0.0, {}
        for i, batch in enumerate(batches):
            with no_grad_sync(setup.wrapped, args.distributed_strategy, i < len(batches) - 1):
                with _autocast(setup.ctx.device, args.precision):
                    loss_sum, extra = self.compute_loss(setup.forward_model, batch)
                if "zero_weight" in batch:
                    # Same keys on every rank, or the all-reduce below mismatches.
                    loss_sum, extra = loss_sum * 0.0, dict.fromkeys(extra, 0.0)
                scale(loss_sum).backward()
            loss_total += float(loss_sum.detach())
            for k, v in extra.items():
                extra_total[k] = extra_total.get(k, 0.0) + v
        return loss_total, extra_total

    def _optimizer_step(self, setup: TrainingSetup) -> float:
        """Unscale, clip (returns the norm before clipping), step, update the scaler and
        the schedule, clear the gradients."""
        args, optimizer, scaler = self.args, setup.optimizer, setup.scaler
        scaler.unscale_(optimizer)
        grad_norm = float("nan")
        if args.max_grad_norm is not None:
            params = [p for p in setup.wrapped.parameters() if p.grad is not None]
            # Pipeline stages hold disjoint parameters: the norm sums theirs over `pp`.
            pp = setup.pipeline
            grad_norm = clip_grad_norm(
                params, args.max_grad_norm, across_ranks=pp is not None, group=pp and pp.group
            )
        scaler.step(optimizer)
        scaler.update()
        setup.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ---------------------------------------------------------------- set-up
    def _build(self, source: Any) -> TrainingSetup:
        """The run's parts, in the order exact resume depends on (the seed is set before
        the model is prepared, the optimizer built after wrapping)."""
        args = self.args
        ctx = init_distributed(
            args.distributed_strategy,
            args.tp_size,
            self._device,
            pp_size=args.pp_size,
            timeout_s=args.collective_timeout_s,
        )
        pipelined = ctx.distributed and args.pipelined
        cpu_bf16 = args.precision == "bf16" and ctx.device.type == "cpu"
        if cpu_bf16 and ctx.is_main and cpu_has_bf16() is False:
            warnings.warn(
                "precision='bf16' on a CPU without native bf16 instructions (no avx512_bf16, "
                "amx_bf16 or Arm bf16 in /proc/cpuinfo): bf16 matmuls are emulated there "
                "and ran ~30x slower than fp32 on such a host; precision='fp32' is faster",
                stacklevel=3,
            )
        if pipelined:
            self._check_pipeline_supported()  # before the model is touched
        torch.manual_seed(args.seed)
        model = self._materialize_model()
        lean_backward.enable(model, args.lean_backward)
        tokenizer = self._tokenizer = resolve_tokenizer(self._tokenizer, self._model_source, model)
        dataset, report = self.build_dataset(source, tokenizer)
        eval_set = None
        if self.eval_dataset is not None:
            eval_set, _ = self.build_dataset(self.eval_dataset, tokenizer)

        # Split first: a rank then moves (and holds on the device) only its own stage.
        pipeline = self._pipeline_for(model, ctx) if pipelined else None
        model.to(ctx.device)
        self.prepare_models(ctx)
        wrapped = wrap_model(model, args.distributed_strategy, ctx, args)
        if pipeline is not None:
            pipeline.parallelize()  # replicas: TP / FSDP2 within each stage
            _agree_every_stage_trains(pipeline)
        # Only the training forward is compiled (DDP's compiled form splits graphs at
        # its buckets); evaluation, checkpoints and `trainer.model` stay the eager model.
        forward_model = torch.compile(wrapped) if args.torch_compile else wrapped
        optimizer = build_optimizer(model, args)
        micro_per_epoch = math.ceil(len(dataset) / (args.per_device_train_batch_size * ctx.dp_size))
        steps_per_epoch = math.ceil(micro_per_epoch / args.gradient_accumulation_steps)
        total_steps = (
            args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
        )
        scheduler = warmup_cosine(optimizer, args.warmup_steps, total_steps, args.min_lr_ratio)
        scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.precision == "fp16")
        checkpointer = Checkpointer(
            output_dir=args.output_dir,
            ctx=ctx,
            wrapped=wrapped,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            pipeline=pipeline,
            sharded=is_sharded(args.distributed_strategy, ctx),
            adapter=self.lora_config is not None,
            base=self._base,
            tokenizer=tokenizer,
            save_total_limit=args.save_total_limit,
        )
        return TrainingSetup(
            ctx=ctx,
            model=model,
            wrapped=wrapped,
            forward_model=forward_model,
            pipeline=pipeline,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            dataset=dataset,
            eval_set=eval_set,
            report=report,
            micro_per_epoch=micro_per_epoch,
            total_steps=total_steps,
            checkpointer=checkpointer,
        )

    def _check_pipeline_supported(self) -> None:
        if type(self).compute_loss is not Trainer.compute_loss or (
            type(self).loss_weight is not Trainer.loss_weight
        ):
            raise ValueError(
                f"distributed_strategy={self.args.distributed_strategy!r} with pipeline "
                f"stages (pp_size={self.args.pp_size}) runs the language-model loss only; "
                f"{type(self).__name__} computes its own (use ddp or fsdp)"
            )

    def _pipeline_for(self, model: nn.Module, ctx: DistContext) -> PipelineRunner:
        """This rank's stage of ``model``, split in place (``ds_model.training.pipeline``);
        a later ``train()`` of this trainer reuses the split."""
        previous = self.setup.pipeline if self.setup is not None else None
        if previous is not None and previous.lm is model:
            return previous
        precision = self.args.precision
        return PipelineRunner(
            model, ctx, lambda: _autocast(ctx.device, precision), self.args.pp_virtual_stages
        )

    def _materialize_model(self) -> nn.Module:
        """The model to train: loaded, its base quantized (QLoRA), the adapter injected;
        once per trainer, so a later ``train()`` continues the same model."""
        if self.model is not None and self._model_ready:
            return self.model
        model = self.model if self.model is not None else load_model(self._model_source)
        if self.args.quantization == "int4":
            if self.lora_config is None:
                raise ValueError("quantization='int4' (QLoRA) needs a lora_config")
            quantize_for_qlora(model)
        if self.lora_config is not None:
            model = apply_lora(model, self.lora_config)
        self.model = model
        self._model_ready = True
        return model

    def _require_setup(self) -> TrainingSetup:
        if self.setup is None:
            raise ValueError("train_step() runs inside train(): call train() first")
        return self.setup

    def _batch(
        self, dataset: Any, idx: list[int], order: list[int], ctx: DistContext
    ) -> dict[str, torch.Tensor]:
        if idx:
            batch = self.collate(dataset, [dataset[i] for i in idx])
        else:
            # This rank's share of the epoch's last micro-batch is empty; it still has
            # to join the collectives, so it runs one sample whose loss weight is zero.
            batch = self.collate(dataset, [dataset[order[0]]])
            batch["labels"] = torch.full_like(batch["labels"], -100)
            batch["zero_weight"] = torch.ones(1)
        return {k: v.to(ctx.device) for k, v in batch.items()}

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, dataset: Any = None) -> dict[str, float]:
        """Loss (per unit) and perplexity over ``dataset`` (default: the eval set)."""
        if dataset is None:
            if self.eval_dataset is None:
                raise ValueError("no evaluation data: pass eval_dataset= or evaluate(dataset)")
            dataset, _ = self.build_dataset(self.eval_dataset, self._tokenizer)
        setup = self.setup
        model = setup.wrapped if setup is not None else self.model
        ctx = setup.ctx if setup is not None else DistContext()  # before train(): one process
        pipeline = setup.pipeline if setup is not None else None
        if model is None:
            raise ValueError("evaluate() needs a model: call train() first or pass model=")
        model.eval()
        bs = self.args.per_device_eval_batch_size
        order = list(range(len(dataset)))
        total, weight = 0.0, 0.0
        for m in range(math.ceil(len(order) / (bs * ctx.dp_size))):
            idx = micro_batch_indices(order, m, bs, ctx.dp_size, ctx.dp_rank)
            batch = self._batch(dataset, idx, order, ctx)
            if pipeline is not None:
                loss_sum = pipeline.loss_sum(batch)  # every rank: the same value
            else:
                with _autocast(ctx.device, self.args.precision):
                    loss_sum, _ = self.compute_loss(model, batch)
            if "zero_weight" not in batch:
                total += float(loss_sum)
                weight += self.loss_weight(batch)
        total, weight = ctx.all_reduce_sum([total, weight])
        loss = total / max(weight, 1e-9)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0))}

    # --------------------------------------------------------------- output
    def save_model(self, path: str) -> None:
        """The trained weights: the adapter (PEFT format) for LoRA, else the model
        through its own ``save_pretrained`` when it has one, else ``model.safetensors``.
        Under FSDP / 3d_parallel / pipeline every rank must call it: the shards or
        stages are gathered into full tensors and rank 0 writes ``model.safetensors``
        (+ ``config.json`` when the model's config has ``to_hf_dict``) or the adapter."""
        if self.model is None:
            raise ValueError("save_model() needs a model: call train() first")
        setup = self.setup
        if setup is not None and (setup.checkpointer.sharded or setup.pipeline is not None):
            setup.checkpointer.export(path)  # a collective
            return
        os.makedirs(path, exist_ok=True)
        if self.lora_config is not None:
            write_adapter(self.model, path, adapter_state(self.model), self._base)
        elif hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(path)
        else:
            ckpt.save_weights(self.model.state_dict(), os.path.join(path, "model.safetensors"))

    def _log(self, path: str, record: dict[str, Any], ctx: DistContext) -> None:
        self.log_history.append(record)
        if ctx.is_main:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _plot(self, position: RunPosition) -> str | None:
        """``loss.png`` in the output directory (rank 0): training loss, eval dots."""
        assert self.setup is not None
        if not (self.setup.ctx.is_main and self.args.plot and position.losses):
            return None
        path = os.path.join(self.args.output_dir, "loss.png")
        write_loss_png(
            path,
            list(enumerate(position.losses, start=1)),
            [(e["step"], e["eval_loss"]) for e in position.evals],
        )
        return path


def _resolve_arguments(
    model: Any, model_path: Any, config: Any, args: Any, lora_config: Any, options: dict
) -> tuple[Any, TrainingConfig, Any]:
    """(model source, TrainingConfig, LoRA config) from the constructor's spellings:
    ``model`` or ``model_path``; ``args`` or keyword fields; ``lora_config``, or
    ``config`` holding either a LoRA config or a TrainingConfig."""
    from ds_lora import LoraConfig

    if model is not None and model_path is not None:
        raise ValueError("pass either model= or model_path=, not both")
    if model is None and model_path is None:
        raise ValueError("no model: pass model= (a module, path or preset) or model_path=")
    if isinstance(config, TrainingConfig):
        if args is not None:
            raise ValueError("config= is a TrainingConfig and args= is given too")
        args = config
    elif isinstance(config, LoraConfig):
        if lora_config is not None:
            raise ValueError("config= (a LoRA config) and lora_config= are both given")
        lora_config = config
    elif config is not None:
        raise TypeError(
            f"config= got a {type(config).__name__}: expected a LoraConfig (the adapter "
            "to train) or a TrainingConfig"
        )
    if args is not None and not isinstance(args, TrainingConfig):
        raise TypeError(f"args= got a {type(args).__name__}: expected a TrainingConfig")
    if lora_config is not None and not isinstance(lora_config, LoraConfig):
        raise TypeError(
            f"lora_config must be a ds_model.LoraConfig (ds_lora.LoraConfig), got "
            f"{type(lora_config).__name__}"
        )
    args = args or TrainingConfig()
    return (
        (model if model is not None else model_path),
        (args.replace(**options) if options else args),
        lora_config,
    )


def _agree_every_stage_trains(pipeline: PipelineRunner) -> None:
    """Checked on every rank together: a stage raising alone would hang the rest."""
    frozen = [
        sid
        for sid, stage in zip(pipeline.stage_ids, pipeline.modules, strict=True)
        if not any(p.requires_grad for p in stage.parameters())
    ]
    pipeline.agree(
        None
        if not frozen
        else f"stage {frozen[0]} has no trainable parameters (does the "
        "LoRA target_modules pattern reach its layers?)"
    )


def _every(interval: int, step: int) -> bool:
    return bool(interval) and step % interval == 0


def _is_save_step(args: TrainingConfig, step: int, due: bool, ctx: DistContext) -> bool:
    """Every ``save_steps`` steps, or when ``save_minutes`` passed on any rank (every
    rank agrees through an all-reduce, so all of them save)."""
    if _every(args.save_steps, step):
        return True
    if args.save_minutes:
        return ctx.all_reduce_sum([float(due)])[0] > 0
    return False


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Run the model; batches are right-padded, so under causal attention padding never
    reaches a trained position and no attention mask is needed."""
    out = model(input_ids)
    logits = getattr(out, "logits", out)
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits


def clip_grad_norm(
    params: list[torch.nn.Parameter],
    max_norm: float,
    across_ranks: bool = False,
    group: Any = None,
) -> float:
    """Clip to a global L2 norm and return the norm before clipping.

    Under 3d_parallel some gradients are DTensors on the 2-D mesh and others on the
    data-parallel mesh alone; torch's clip cannot stack those, so the norm is taken per
    mesh and combined. ``across_ranks``: the ranks of ``group`` (default: all) hold
    different parameters (pipeline stages), so the squared norms are summed over it."""
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    squares = []
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        squares.append(float(norm) ** 2)
    square = sum(squares)
    if across_ranks:
        import torch.distributed as dist

        summed = torch.tensor([square], dtype=torch.float64, device=params[0].device)
        dist.all_reduce(summed, group=group)
        square = float(summed)
    total = math.sqrt(square)
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:
            p.grad.mul_(scale)
    return total


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU multiplies bf16 natively (x86 ``avx512_bf16`` / ``amx_bf16``,
    Arm ``bf16``); ``None`` where the flags cannot be read (not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _loss_scale(scaler: torch.amp.GradScaler, factor: float):
    """What a micro-batch back-propagates: its loss sum times ``factor`` (the global
    batch's normalisation), scaled for fp16."""
    return lambda loss_sum: scaler.scale(loss_sum * factor)


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    if "zero_weight" in batch:
        return 0
    return int(batch["attention_mask"].sum())


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST[precision])


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


DEFAULT_MAX_SEQ_LEN = 512


def _model_context(source: Any) -> int | None:
    """The model's context (``max_position_embeddings``) without loading its weights:
    from a module's config, a checkpoint's ``config.json`` or a preset; ``None`` when
    the module does not say."""
    from ds_model.config import PRESETS, ModelConfig

    if isinstance(source, nn.Module):
        context = getattr(getattr(source, "config", None), "max_position_embeddings", None)
        return context if isinstance(context, int) else None
    if isinstance(source, (str, os.PathLike)):
        if os.path.isfile(os.path.join(source, "config.json")):
            return ModelConfig.from_file(source).max_position_embeddings
        if str(source) in PRESETS:
            return ModelConfig.from_preset(str(source)).max_position_embeddings
    return None


def _fit_seq_len(args: TrainingConfig, source: Any) -> TrainingConfig:
    """``max_seq_len=None`` becomes the model's context capped at 512; an explicit value
    past the context is refused now rather than at the first step."""
    context = _model_context(source)
    if args.max_seq_len is None:
        fit = DEFAULT_MAX_SEQ_LEN if context is None else min(DEFAULT_MAX_SEQ_LEN, context)
        return args.replace(max_seq_len=fit)
    if context is not None and args.max_seq_len > context:
        raise ValueError(
            f"max_seq_len={args.max_seq_len} exceeds the model's context "
            f"(max_position_embeddings={context}); use at most {context}, or leave it "
            "unset to follow the model"
        )
    return args


def _check_output_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"output_dir={path!r} exists and is not a directory")


def _truncate_metrics(path: str, step: int) -> None:
    """On resume, drop metric lines a killed run wrote after its last checkpoint."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class _NoBar:
    def update(self, n: int) -> None: ...

    def set_postfix(self, **kw: Any) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
