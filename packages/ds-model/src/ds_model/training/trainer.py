"""``Trainer``: full training and LoRA / QLoRA fine-tuning of a causal LM.

One optimizer step = ``gradient_accumulation_steps`` micro-batches of
``per_device_train_batch_size`` sequences on each data-parallel rank. The loss of a
step is the sum of token losses over that whole global batch divided by its number of
trained tokens, exactly as one process with the same global batch would compute it.

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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds_model import lean_backward
from ds_model.config import read_json
from ds_model.training import checkpoint as ckpt
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
    unwrap,
    wrap_model,
)
from ds_model.training.loss import causal_lm_loss_sum
from ds_model.training.modeling import (
    adapter_keys,
    adapter_state,
    apply_lora,
    base_directory,
    build_optimizer,
    load_model,
    quantize_for_qlora,
    resolve_tokenizer,
    write_adapter,
)
from ds_model.training.optimizer import (
    load_optimizer_state,
    optimizer_state,
    save_optimizer_shard,
)
from ds_model.training.pipeline import PipelineRunner
from ds_model.training.plot import write_loss_png
from ds_model.training.schedule import warmup_cosine

__all__ = ["TrainResult", "Trainer"]

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


class Trainer:
    """Train a causal LM whose ``forward(input_ids)`` returns an object with ``.logits``
    of shape (batch, seqlen, vocab).

    Both published call forms work::

        Trainer(model_path="deepseek-7b", config=lora_config).train(data_path="d.json", epochs=3)
        Trainer(model=model, train_dataset=data, lora_config=lora_config,
                per_device_train_batch_size=8, num_train_epochs=3).train()

    ``model`` is an ``nn.Module``, a checkpoint directory or a preset name;
    ``config`` is a ``LoraConfig`` (the published example's meaning) or a :class:`TrainingConfig`;
    any :class:`TrainingConfig` field may also be passed as a keyword. Data is a path
    to a .json/.jsonl file, an iterable of records or strings, or a ready dataset.
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
        if model is not None and model_path is not None:
            raise ValueError("pass either model= or model_path=, not both")
        if model is None and model_path is None:
            raise ValueError("no model: pass model= (a module, path or preset) or model_path=")
        if isinstance(config, TrainingConfig):
            if args is not None:
                raise ValueError("config= is a TrainingConfig and args= is given too")
            args = config
        elif config is not None:
            if lora_config is not None:
                raise ValueError("config= (a LoRA config) and lora_config= are both given")
            lora_config = config
        args = args or TrainingConfig()
        args = args.replace(**options) if options else args
        self.args = _fit_seq_len(args, model if model is not None else model_path)
        self.lora_config = lora_config
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self._model_source = model if model is not None else model_path
        self._base = base_directory(self._model_source)  # adapters name their base
        self._tokenizer = tokenizer
        self._device = device
        self.model: nn.Module | None = model if isinstance(model, nn.Module) else None
        self.log_history: list[dict[str, Any]] = []
        self._pipeline: PipelineRunner | None = None

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
        """Run training; ``resume_from`` is a checkpoint or an output directory (its
        newest checkpoint is used) and continues the run exactly."""
        changes: dict[str, Any] = {}
        if epochs is not None:
            changes["num_train_epochs"] = epochs
        if max_steps is not None:
            changes["max_steps"] = max_steps
        args = self.args.replace(**changes) if changes else self.args
        self.args = args
        source = data_path if data_path is not None else self.train_dataset
        if source is None:
            raise ValueError("no training data: pass train_dataset= or train(data_path=...)")
        if eval_data is not None:
            self.eval_dataset = eval_data
        _check_output_dir(args.output_dir)
        resume_dir = ckpt.find_latest_checkpoint(resume_from) if resume_from else None
        # Bad data is reported before the model loads (minutes, for a large one).
        for data in (source, self.eval_dataset):
            check_data_file(data, self.data_kinds, args.skip_bad_records)

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
                stacklevel=2,
            )
        if pipelined:
            self._check_pipeline_supported()  # before the model is touched
        torch.manual_seed(args.seed)
        model = self._materialize_model()
        lean_backward.enable(model, args.lean_backward)
        tokenizer = resolve_tokenizer(self._tokenizer, self._model_source, model)
        dataset, report = self.build_dataset(source, tokenizer)
        eval_set = None
        if self.eval_dataset is not None:
            eval_set, _ = self.build_dataset(self.eval_dataset, tokenizer)

        # Split first: a rank then moves (and holds on the device) only its own stage.
        self._pipeline = self._pipeline_for(model, ctx) if pipelined else None
        model.to(ctx.device)
        self.prepare_models(ctx)
        wrapped = wrap_model(model, args.distributed_strategy, ctx, args)
        if self._pipeline is not None:
            self._pipeline.parallelize()  # replicas: TP / FSDP2 within each stage
        # Only the training forward is compiled (DDP's compiled form splits graphs at
        # its buckets); evaluation, checkpoints and `trainer.model` stay the eager model.
        forward_model = wrapped
        if args.torch_compile:
            forward_model = torch.compile(wrapped)
        self.model = model
        self._wrapped = wrapped
        self._ctx = ctx
        self._tokenizer = tokenizer
        if self._pipeline is not None:
            # Checked on every rank together: a stage raising alone would hang the rest.
            frozen = [
                sid
                for sid, stage in zip(self._pipeline.stage_ids, self._pipeline.modules, strict=True)
                if not any(p.requires_grad for p in stage.parameters())
            ]
            self._pipeline.agree(
                None
                if not frozen
                else f"stage {frozen[0]} has no trainable parameters (does the "
                "LoRA target_modules pattern reach its layers?)"
            )
        optimizer = build_optimizer(model, args)
        n = len(dataset)
        micro_per_epoch = math.ceil(n / (args.per_device_train_batch_size * ctx.dp_size))
        steps_per_epoch = math.ceil(micro_per_epoch / args.gradient_accumulation_steps)
        total_steps = (
            args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
        )
        scheduler = warmup_cosine(optimizer, args.warmup_steps, total_steps, args.min_lr_ratio)
        scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.precision == "fp16")

        step, epoch, micro, losses, evals = 0, 0, 0, [], []
        if resume_dir is not None:
            state = self._load_checkpoint(resume_dir, wrapped, optimizer, scheduler, scaler, ctx)
            step, epoch, micro = state["global_step"], state["epoch"], state["micro_in_epoch"]
            losses, evals = list(state["losses"]), list(state["eval_history"])
        metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        if ctx.is_main:
            os.makedirs(args.output_dir, exist_ok=True)
            _truncate_metrics(metrics_path, step)
        order = _epoch_order(n, args.seed, epoch, args.shuffle)

        progress = _progress(total_steps, step, ctx.is_main and args.progress_bar)
        started, tokens_seen, last_ckpt = time.perf_counter(), 0, None
        last_save = time.monotonic()
        wrapped.train()
        while step < total_steps:
            if micro >= micro_per_epoch:
                epoch, micro = epoch + 1, 0
                order = _epoch_order(n, args.seed, epoch, args.shuffle)
            count = min(args.gradient_accumulation_steps, micro_per_epoch - micro)
            batches = []
            for m in range(micro, micro + count):
                idx = micro_batch_indices(
                    order, m, args.per_device_train_batch_size, ctx.dp_size, ctx.dp_rank
                )
                batches.append(self._batch(dataset, idx, order, ctx))
            weights = [0.0 if "zero_weight" in b else self.loss_weight(b) for b in batches]
            sums = ctx.all_reduce_sum([sum(weights), float(sum(_tokens(b) for b in batches))])
            global_weight, global_tokens = sums
            if global_weight <= 0:
                raise ValueError(f"step {step + 1}: the global batch has no trained tokens")
            scale = _loss_scale(scaler, ctx.dp_size / global_weight)
            if self._pipeline is not None:
                loss_total = self._pipeline.step(batches, scale)
                extra_total: dict[str, float] = {}
            else:
                loss_total, extra_total = self._accumulate(forward_model, wrapped, batches, scale)
            grad_norm = self._optimizer_step(wrapped, optimizer, scheduler, scaler)
            reduced = ctx.all_reduce_sum([loss_total, *extra_total.values()])
            loss = reduced[0] / global_weight
            micro += count
            step += 1
            tokens_seen += int(global_tokens)
            losses.append(loss)
            elapsed = time.perf_counter() - started
            record = {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
            }
            record.update(
                {k: v / global_weight for k, v in zip(extra_total, reduced[1:], strict=True)}
            )
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % args.logging_steps == 0 or step == total_steps:
                self._log(metrics_path, record, ctx)
            if eval_set is not None and (
                (args.eval_steps and step % args.eval_steps == 0) or step == total_steps
            ):
                result = self.evaluate(eval_set)
                result["step"] = step
                evals.append(result)
                self._log(metrics_path, result, ctx)
                wrapped.train()
            is_save_step = args.save_steps and step % args.save_steps == 0
            if args.save_minutes and not is_save_step:
                due = time.monotonic() - last_save >= args.save_minutes * 60
                is_save_step = ctx.all_reduce_sum([float(due)])[0] > 0  # every rank agrees
            if is_save_step or (step == total_steps and args.save_final):
                last_save = time.monotonic()
                state = {
                    "global_step": step,
                    "epoch": epoch,
                    "micro_in_epoch": micro,
                    "losses": losses,
                    "eval_history": evals,
                }
                last_ckpt = self._save_checkpoint(
                    step, wrapped, optimizer, scheduler, scaler, ctx, state
                )
        progress.close()
        plot_path = None
        if ctx.is_main and args.plot and losses:
            plot_path = os.path.join(args.output_dir, "loss.png")
            write_loss_png(
                plot_path,
                list(enumerate(losses, start=1)),
                [(e["step"], e["eval_loss"]) for e in evals],
            )
        return TrainResult(
            global_step=step,
            losses=losses,
            eval_history=evals,
            checkpoint=last_ckpt,
            metrics_path=metrics_path,
            plot_path=plot_path,
            data_report=report,
        )

    def _accumulate(self, forward_model, wrapped, batches, scale):
        """Forward and backward over a step's micro-batches, back-propagating
        ``scale(loss sum)`` of each; returns the step's loss sum and extra metric sums."""
        args, ctx = self.args, self._ctx
        loss_total, extra_total = 0.0, {}
        for i, batch in enumerate(batches):
            with no_grad_sync(wrapped, args.distributed_strategy, i < len(batches) - 1):
                with _autocast(ctx.device, args.precision):
                    loss_sum, extra = self.compute_loss(forward_model, batch)
                if "zero_weight" in batch:
                    # Same keys on every rank, or the all-reduce below mismatches.
                    loss_sum, extra = loss_sum * 0.0, dict.fromkeys(extra, 0.0)
                scale(loss_sum).backward()
            loss_total += float(loss_sum.detach())
            for k, v in extra.items():
                extra_total[k] = extra_total.get(k, 0.0) + v
        return loss_total, extra_total

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
        if self._pipeline is not None and self._pipeline.lm is model:
            return self._pipeline
        precision = self.args.precision
        return PipelineRunner(
            model, ctx, lambda: _autocast(ctx.device, precision), self.args.pp_virtual_stages
        )

    def _materialize_model(self) -> nn.Module:
        if self.model is not None and getattr(self, "_prepared", False):
            return self.model
        model = self.model if self.model is not None else load_model(self._model_source)
        if self.args.quantization == "int4":
            if self.lora_config is None:
                raise ValueError("quantization='int4' (QLoRA) needs a lora_config")
            quantize_for_qlora(model)
        if self.lora_config is not None:
            model = apply_lora(model, self.lora_config)
        self.model = model
        self._prepared = True
        return model

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

    def _optimizer_step(self, wrapped, optimizer, scheduler, scaler) -> float:
        args = self.args
        scaler.unscale_(optimizer)
        grad_norm = float("nan")
        if args.max_grad_norm is not None:
            params = [p for p in wrapped.parameters() if p.grad is not None]
            # Pipeline stages hold disjoint parameters: the norm sums theirs over `pp`.
            pp = self._pipeline
            grad_norm = clip_grad_norm(
                params, args.max_grad_norm, across_ranks=pp is not None, group=pp and pp.group
            )
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, dataset: Any = None) -> dict[str, float]:
        """Loss (per unit) and perplexity over ``dataset`` (default: the eval set)."""
        if dataset is None:
            if self.eval_dataset is None:
                raise ValueError("no evaluation data: pass eval_dataset= or evaluate(dataset)")
            dataset, _ = self.build_dataset(self.eval_dataset, self._tokenizer)
        model = getattr(self, "_wrapped", None) or self.model
        ctx = getattr(self, "_ctx", DistContext())
        if model is None:
            raise ValueError("evaluate() needs a model: call train() first or pass model=")
        model.eval()
        bs = self.args.per_device_eval_batch_size
        order = list(range(len(dataset)))
        total, weight = 0.0, 0.0
        for m in range(math.ceil(len(order) / (bs * ctx.dp_size))):
            idx = micro_batch_indices(order, m, bs, ctx.dp_size, ctx.dp_rank)
            batch = self._batch(dataset, idx, order, ctx)
            if self._pipeline is not None:
                loss_sum = self._pipeline.loss_sum(batch)  # every rank: the same value
            else:
                with _autocast(ctx.device, self.args.precision):
                    loss_sum, _ = self.compute_loss(model, batch)
            if "zero_weight" not in batch:
                total += float(loss_sum)
                weight += self.loss_weight(batch)
        total, weight = ctx.all_reduce_sum([total, weight])
        loss = total / max(weight, 1e-9)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0))}

    # ----------------------------------------------------------- checkpoints
    def _save_checkpoint(self, step, wrapped, optimizer, scheduler, scaler, ctx, state) -> str:
        args = self.args
        sharded = is_sharded(args.distributed_strategy, ctx)
        if ctx.is_main:
            ckpt.prepare_tmp(args.output_dir, step)
        ctx.barrier()
        tmp = ckpt.tmp_dir_for(args.output_dir, step)
        torch.save(ckpt.capture_rng(), os.path.join(tmp, f"rng_state_{ctx.rank}.pt"))
        save_optimizer_shard(optimizer, tmp, ctx.rank)  # ZeRO-1: every rank its own
        model_state, optim_state = self._gather_states(wrapped, optimizer, sharded, ctx)
        ctx.barrier()
        final = os.path.join(args.output_dir, f"checkpoint-{step}")
        if ctx.is_main:

            def write(tmp_dir: str) -> None:
                if self.lora_config is not None:
                    write_adapter(unwrap(wrapped), tmp_dir, model_state, self._base)
                else:
                    ckpt.save_weights(model_state, os.path.join(tmp_dir, "model.safetensors"))
                    self._write_model_files(tmp_dir)
                torch.save(optim_state, os.path.join(tmp_dir, "optimizer.pt"))
                torch.save(
                    {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
                    os.path.join(tmp_dir, "training_state.pt"),
                )

            full_state = {
                **state,
                "world_size": ctx.world_size,
                "config": args.to_dict(),
                "adapter_only": self.lora_config is not None,
            }
            final = ckpt.write_checkpoint(
                args.output_dir, step, write, full_state, args.save_total_limit, prepare=False
            )
        ctx.barrier()
        return final

    def _write_model_files(self, path: str) -> None:
        """config.json and the tokenizer's files next to a checkpoint's full weights, so
        the checkpoint loads with ``from_pretrained`` and ``transformers.AutoTokenizer``."""
        to_dict = getattr(getattr(self.model, "config", None), "to_hf_dict", None)
        if callable(to_dict):
            with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
                json.dump(to_dict(), f, indent=2)
        save = getattr(self._tokenizer, "save_pretrained", None)
        if callable(save):
            save(path)

    def _gather_states(self, wrapped, optimizer, sharded: bool, ctx: DistContext):
        """Rank 0's (model weights, optimizer state) to checkpoint: full weights, or for
        LoRA the adapter (PEFT keys, :func:`adapter_state`)."""
        pipeline = self._pipeline
        if pipeline is not None:
            # One optimizer state per stage: resumable with the same number of stages.
            stage_state = pipeline.optimizer_state(unwrap(wrapped), optimizer)
            optim_state = {"pipeline_stages": pipeline.gather(stage_state)}
            return self._model_state(wrapped, sharded, ctx), optim_state
        model_state = self._model_state(wrapped, sharded, ctx)
        if sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return model_state, get_optimizer_state_dict(wrapped, optimizer, options=opts)
        return model_state, optimizer_state(optimizer)

    def _model_state(self, wrapped, sharded: bool, ctx: DistContext) -> dict[str, torch.Tensor]:
        """What rank 0 writes (a collective under fsdp / 3d_parallel / pipeline): the full
        weights by name, or for LoRA the adapter by PEFT key; ``{}`` on other ranks
        where the weights are gathered."""
        model = unwrap(wrapped)
        lora = self.lora_config is not None
        if self._pipeline is not None:
            # Every stage sends its part (weights, or adapter) to rank 0.
            if not lora:
                return self._pipeline.merged(self._pipeline.model_state(model)) or {}
            keys = adapter_keys(model)  # {PEFT key: parameter name}
            whole = self._pipeline.model_state(model, set(keys.values()))
            part = None if whole is None else {k: whole[n] for k, n in keys.items()}
            return self._pipeline.merged(part) or {}
        if not sharded:
            if not ctx.is_main:
                return {}
            return adapter_state(model) if lora else model.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(wrapped, options=opts)
        if not ctx.is_main:
            return {}
        return adapter_state(model, state) if lora else state

    def _load_checkpoint(self, path, wrapped, optimizer, scheduler, scaler, ctx) -> dict:
        state = read_json(Path(path) / ckpt.STATE_FILE, ckpt.CheckpointError)
        if not isinstance(state, dict):
            raise ckpt.CheckpointError(f"{path}/{ckpt.STATE_FILE}: expected a JSON object")
        model = unwrap(wrapped)
        if self._pipeline is not None:
            weights = self._stage_weights(path, model, bool(state.get("adapter_only")))
        elif state.get("adapter_only"):
            from ds_model.training.modeling import load_adapter_state

            weights = load_adapter_state(model, path)
        else:
            weights = ckpt.load_weights(os.path.join(path, "model.safetensors"))
        optim_state = ckpt.load_state_file(os.path.join(path, "optimizer.pt"))
        optim_state = self._stage_optimizer_state(path, optim_state, ctx)
        if self._pipeline is not None:
            # The stage's parameters must be the saved stage's (another interleaving,
            # say, gives a rank other layers): checked on every rank together.
            saved = {n for g in optim_state.get("param_groups", []) for n in g["params"]}
            own = {n for n, p in model.named_parameters() if p.requires_grad}
            error = None
            if saved != own:
                diff = sorted(saved ^ own)[:3]
                error = (
                    f"{path}: stage {ctx.pp_rank}'s saved optimizer state is for other "
                    f"parameters (e.g. {diff}); resume with the same pp_size and "
                    "pp_virtual_stages"
                )
            self._pipeline.agree(error, ckpt.CheckpointError)
            self._pipeline.load_state(model, weights, optimizer, optim_state)
        elif is_sharded(self.args.distributed_strategy, ctx):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, strict=not state.get("adapter_only"))
            set_model_state_dict(wrapped, weights, options=opts)
            set_optimizer_state_dict(wrapped, optimizer, optim_state, options=opts)
        else:
            missing, unexpected = model.load_state_dict(weights, strict=False)
            if unexpected:
                raise ckpt.CheckpointError(f"{path}: unexpected weights {unexpected[:5]}")
            if not state.get("adapter_only") and missing:
                raise ckpt.CheckpointError(f"{path}: missing weights {missing[:5]}")
            load_optimizer_state(optimizer, optim_state, path, ctx.rank)
        extra = ckpt.load_state_file(os.path.join(path, "training_state.pt"))
        scheduler.load_state_dict(extra["scheduler"])
        scaler.load_state_dict(extra["scaler"])
        rng_file = os.path.join(path, f"rng_state_{ctx.rank}.pt")
        if os.path.exists(rng_file):
            ckpt.restore_rng(ckpt.load_state_file(rng_file))
        else:
            warnings.warn(f"{path} has no RNG state for rank {ctx.rank}", stacklevel=2)
        return state

    def _stage_weights(self, path: str, model: nn.Module, adapter_only: bool) -> dict:
        """This stage's part of a checkpoint's weights (or adapter). Every stage checks
        its part and the file's keys against all stages' together, and all raise
        ``CheckpointError`` if any finds a problem."""
        from ds_model.training.modeling import load_adapter_state

        assert self._pipeline is not None
        own = list(model.state_dict().keys())
        error, weights = None, {}
        try:
            if adapter_only:
                weights = load_adapter_state(model, path, partial=True)
            else:
                weights = ckpt.load_weights(os.path.join(path, "model.safetensors"))
                missing = [k for k in own if k not in weights]
                if missing:
                    error = f"{path}: missing weights {missing[:5]}"
        except (ValueError, OSError) as e:
            error = str(e)
        every = self._pipeline.stage_keys(own)
        if error is None and not adapter_only:
            unexpected = sorted(set(weights) - set(every))
            if unexpected:
                error = f"{path}: unexpected weights {unexpected[:5]}"
        self._pipeline.agree(error, ckpt.CheckpointError)
        return {k: v for k, v in weights.items() if k in own}

    def _stage_optimizer_state(self, path: str, optim_state: Any, ctx: DistContext) -> Any:
        """This rank's optimizer state: a pipeline checkpoint keeps one per stage, and
        resumes only as a pipeline of as many ranks (each rank's optimizer knows its
        own parameters only)."""
        stages = optim_state.get("pipeline_stages") if isinstance(optim_state, dict) else None
        if self._pipeline is None:
            if stages is not None:
                raise ckpt.CheckpointError(
                    f"{path} holds the optimizer state of a {len(stages)}-rank pipeline "
                    f"run; resume it with pipeline stages (distributed_strategy='pipeline', "
                    f"pp_size={len(stages)})"
                )
            return optim_state
        if stages is None or len(stages) != ctx.pp_size:
            found = "no pipeline" if stages is None else f"a {len(stages)}-rank pipeline"
            raise ckpt.CheckpointError(
                f"{path} holds the optimizer state of {found} run; a pipeline resumes only "
                f"from a pipeline checkpoint of as many ranks per pipeline (pp_size "
                f"{ctx.pp_size} here)"
            )
        stage = stages[ctx.pp_rank]
        if any(isinstance(k, int) for k in stage.get("state", {})):
            raise ckpt.CheckpointError(
                f"{path} holds a pipeline optimizer state keyed by parameter index (an "
                "earlier development format); it cannot be matched to this stage's "
                "parameters"
            )
        return stage

    def save_model(self, path: str) -> None:
        """The trained weights: the adapter (PEFT format) for LoRA, else the model
        through its own ``save_pretrained`` when it has one, else ``model.safetensors``.
        Under FSDP / 3d_parallel / pipeline every rank must call it: the shards or
        stages are gathered into full tensors and rank 0 writes ``model.safetensors``
        (+ ``config.json`` when the model's config has ``to_hf_dict``) or the adapter."""
        if self.model is None:
            raise ValueError("save_model() needs a model: call train() first")
        ctx = getattr(self, "_ctx", DistContext())
        wrapped = getattr(self, "_wrapped", None)
        sharded = wrapped is not None and is_sharded(self.args.distributed_strategy, ctx)
        if sharded or self._pipeline is not None:
            state = self._model_state(wrapped, sharded, ctx)  # a collective
            if ctx.is_main:
                os.makedirs(path, exist_ok=True)
                if self.lora_config is not None:
                    write_adapter(self.model, path, state, self._base)
                else:
                    ckpt.save_weights(state, os.path.join(path, "model.safetensors"))
                    to_dict = getattr(getattr(self.model, "config", None), "to_hf_dict", None)
                    if callable(to_dict):
                        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
                            json.dump(to_dict(), f, indent=2)
            ctx.barrier()
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
