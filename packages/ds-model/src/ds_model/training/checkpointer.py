"""``Checkpointer``: saves and restores a whole training run, for every layout of it.

One ``save`` and one ``load`` cover the three layouts a run can have:

- **plain** (one process, or DDP): rank 0 writes the live model's and optimizer's
  state dicts;
- **sharded** (FSDP2, FSDP2 + tensor parallel): the shards are gathered into full tensors
  (``torch.distributed.checkpoint.state_dict``, ``full_state_dict=True``) and rank 0
  writes them; on load the full tensors are sharded again, so the checkpoint does not
  depend on the world size it was written with;
- **pipeline**: every stage sends its weights to rank 0, which writes them merged; the
  optimizer state is kept one per stage (``{"pipeline_stages": [...]}``), so it resumes
  only as a pipeline of as many ranks.

The files and the atomic write are ``ds_model.training.checkpoint``'s. A LoRA run saves
its adapter in PEFT's format instead of the weights.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds_model.config import read_json
from ds_model.training import checkpoint as ckpt
from ds_model.training.distributed import DistContext, unwrap
from ds_model.training.optimizer import (
    load_optimizer_state,
    optimizer_state,
    save_optimizer_shard,
)
from ds_model.training.peft_adapter import (
    adapter_keys,
    adapter_state,
    load_adapter_state,
    write_adapter,
)
from ds_model.training.pipeline import PipelineRunner

__all__ = ["Checkpointer"]


@dataclass
class Checkpointer:
    """Checkpoints of one run under ``output_dir``.

    ``wrapped`` is the model as trained (DDP / FSDP2 / tensor-parallel wrapped, or one
    pipeline stage), ``sharded`` whether its parameters are sharded, ``adapter`` whether
    only the LoRA adapter is saved (``base``: the base model's directory, recorded in the
    adapter's config), ``tokenizer`` is saved beside full weights. ``save`` and ``load``
    are collectives: every rank calls them."""

    output_dir: str
    ctx: DistContext
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    pipeline: PipelineRunner | None = None
    sharded: bool = False
    adapter: bool = False
    base: str | None = None
    tokenizer: Any = None
    save_total_limit: int | None = 2

    @property
    def model(self) -> nn.Module:
        return unwrap(self.wrapped)

    # ------------------------------------------------------------------ save
    def save(self, step: int, trainer_state: dict[str, Any], config: dict[str, Any]) -> str:
        """Write ``checkpoint-<step>/`` atomically and return its path. Every rank writes
        its RNG state into the temporary directory; rank 0 writes the rest."""
        ctx = self.ctx
        if ctx.is_main:
            ckpt.prepare_tmp(self.output_dir, step)
        ctx.barrier()
        tmp = ckpt.tmp_dir_for(self.output_dir, step)
        torch.save(ckpt.capture_rng(), os.path.join(tmp, f"rng_state_{ctx.rank}.pt"))
        save_optimizer_shard(self.optimizer, tmp, ctx.rank)  # ZeRO-1: every rank its own
        model_state = self.model_state()  # a collective under sharding and pipelines
        optim_state = self._optimizer_state()
        ctx.barrier()
        final = os.path.join(self.output_dir, f"checkpoint-{step}")
        if ctx.is_main:

            def write(tmp_dir: str) -> None:
                if self.adapter:
                    write_adapter(self.model, tmp_dir, model_state, self.base)
                else:
                    ckpt.save_weights(model_state, os.path.join(tmp_dir, "model.safetensors"))
                    self.write_model_files(tmp_dir, tokenizer=True)
                torch.save(optim_state, os.path.join(tmp_dir, "optimizer.pt"))
                torch.save(
                    {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()},
                    os.path.join(tmp_dir, "training_state.pt"),
                )

            full_state = {
                **trainer_state,
                "world_size": ctx.world_size,
                "config": config,
                "adapter_only": self.adapter,
            }
            final = ckpt.write_checkpoint(
                self.output_dir, step, write, full_state, self.save_total_limit, prepare=False
            )
        ctx.barrier()
        return final

    def model_state(self) -> dict[str, torch.Tensor]:
        """What rank 0 writes (a collective under sharding and pipelines): the full weights
        by name, or for LoRA the adapter by PEFT key; ``{}`` on the other ranks."""
        model, pipeline = self.model, self.pipeline
        if pipeline is not None:  # every stage sends its part to rank 0
            if not self.adapter:
                return pipeline.merged(pipeline.model_state(model)) or {}
            keys = adapter_keys(model)  # {PEFT key: parameter name}
            whole = pipeline.model_state(model, set(keys.values()))
            part = None if whole is None else {k: whole[n] for k, n in keys.items()}
            return pipeline.merged(part) or {}
        if not self.sharded:
            if not self.ctx.is_main:
                return {}
            return adapter_state(model) if self.adapter else model.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.wrapped, options=opts)
        if not self.ctx.is_main:
            return {}
        return adapter_state(model, state) if self.adapter else state

    def _optimizer_state(self) -> Any:
        if self.pipeline is not None:
            # One optimizer state per stage: resumable with the same number of stages.
            stage_state = self.pipeline.optimizer_state(self.model, self.optimizer)
            return {"pipeline_stages": self.pipeline.gather(stage_state)}
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.wrapped, self.optimizer, options=opts)
        return optimizer_state(self.optimizer)

    def write_model_files(self, path: str, tokenizer: bool) -> None:
        """config.json (and with ``tokenizer`` the tokenizer's files) next to full weights,
        so the directory loads with ``from_pretrained`` and ``transformers.AutoTokenizer``."""
        to_dict = getattr(getattr(self.model, "config", None), "to_hf_dict", None)
        if callable(to_dict):
            with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
                json.dump(to_dict(), f, indent=2)
        save = getattr(self.tokenizer, "save_pretrained", None)
        if tokenizer and callable(save):
            save(path)

    def export(self, path: str) -> None:
        """The trained weights (or the adapter) gathered to rank 0 and written to ``path``:
        ``model.safetensors`` + ``config.json``, or the PEFT adapter. A collective."""
        state = self.model_state()
        if self.ctx.is_main:
            os.makedirs(path, exist_ok=True)
            if self.adapter:
                write_adapter(self.model, path, state, self.base)
            else:
                ckpt.save_weights(state, os.path.join(path, "model.safetensors"))
                self.write_model_files(path, tokenizer=False)
        self.ctx.barrier()

    # ------------------------------------------------------------------ load
    def load(self, path: str) -> dict[str, Any]:
        """Restore weights, optimizer, scheduler, scaler and this rank's RNG from the
        checkpoint ``path``; returns its ``trainer_state.json``."""
        state = read_json(Path(path) / ckpt.STATE_FILE, ckpt.CheckpointError)
        if not isinstance(state, dict):
            raise ckpt.CheckpointError(f"{path}/{ckpt.STATE_FILE}: expected a JSON object")
        adapter_only = bool(state.get("adapter_only"))
        model = self.model
        if self.pipeline is not None:
            weights = self._stage_weights(path, adapter_only)
        elif adapter_only:
            weights = load_adapter_state(model, path)
        else:
            weights = ckpt.load_weights(os.path.join(path, "model.safetensors"))
        optim_state = self._saved_optimizer_state(path)
        if self.pipeline is not None:
            self._check_stage_parameters(path, optim_state)
            self.pipeline.load_state(model, weights, self.optimizer, optim_state)
        elif self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, strict=not adapter_only)
            set_model_state_dict(self.wrapped, weights, options=opts)
            set_optimizer_state_dict(self.wrapped, self.optimizer, optim_state, options=opts)
        else:
            missing, unexpected = model.load_state_dict(weights, strict=False)
            if unexpected:
                raise ckpt.CheckpointError(f"{path}: unexpected weights {unexpected[:5]}")
            if not adapter_only and missing:
                raise ckpt.CheckpointError(f"{path}: missing weights {missing[:5]}")
            load_optimizer_state(self.optimizer, optim_state, path, self.ctx.rank)
        extra = ckpt.load_state_file(os.path.join(path, "training_state.pt"))
        self.scheduler.load_state_dict(extra["scheduler"])
        self.scaler.load_state_dict(extra["scaler"])
        rng_file = os.path.join(path, f"rng_state_{self.ctx.rank}.pt")
        if os.path.exists(rng_file):
            ckpt.restore_rng(ckpt.load_state_file(rng_file))
        else:
            warnings.warn(f"{path} has no RNG state for rank {self.ctx.rank}", stacklevel=2)
        return state

    def _saved_optimizer_state(self, path: str) -> Any:
        """This rank's optimizer state: a pipeline checkpoint keeps one per stage, and
        resumes only as a pipeline of as many ranks (each rank's optimizer knows its
        own parameters only)."""
        optim_state = ckpt.load_state_file(os.path.join(path, "optimizer.pt"))
        stages = optim_state.get("pipeline_stages") if isinstance(optim_state, dict) else None
        if self.pipeline is None:
            if stages is not None:
                raise ckpt.CheckpointError(
                    f"{path} holds the optimizer state of a {len(stages)}-rank pipeline "
                    f"run; resume it with pipeline stages (distributed_strategy='pipeline', "
                    f"pp_size={len(stages)})"
                )
            return optim_state
        pp_size = self.ctx.pp_size
        if stages is None or len(stages) != pp_size:
            found = "no pipeline" if stages is None else f"a {len(stages)}-rank pipeline"
            raise ckpt.CheckpointError(
                f"{path} holds the optimizer state of {found} run; a pipeline resumes only "
                f"from a pipeline checkpoint of as many ranks per pipeline (pp_size "
                f"{pp_size} here)"
            )
        stage = stages[self.ctx.pp_rank]
        if any(isinstance(k, int) for k in stage.get("state", {})):
            raise ckpt.CheckpointError(
                f"{path} holds a pipeline optimizer state keyed by parameter index (an "
                "earlier development format); it cannot be matched to this stage's "
                "parameters"
            )
        return stage

    def _stage_weights(self, path: str, adapter_only: bool) -> dict[str, torch.Tensor]:
        """This stage's part of a checkpoint's weights (or adapter). Every stage checks
        its part and the file's keys against all stages' together, and all raise
        ``CheckpointError`` if any finds a problem."""
        assert self.pipeline is not None
        model = self.model
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
        every = self.pipeline.stage_keys(own)
        if error is None and not adapter_only:
            unexpected = sorted(set(weights) - set(every))
            if unexpected:
                error = f"{path}: unexpected weights {unexpected[:5]}"
        self.pipeline.agree(error, ckpt.CheckpointError)
        return {k: v for k, v in weights.items() if k in own}

    def _check_stage_parameters(self, path: str, optim_state: Any) -> None:
        """The stage's parameters must be the saved stage's (another interleaving, say,
        gives a rank other layers): checked on every rank together."""
        assert self.pipeline is not None
        saved = {n for g in optim_state.get("param_groups", []) for n in g["params"]}
        own = {n for n, p in self.model.named_parameters() if p.requires_grad}
        error = None
        if saved != own:
            diff = sorted(saved ^ own)[:3]
            error = (
                f"{path}: stage {self.ctx.pp_rank}'s saved optimizer state is for other "
                f"parameters (e.g. {diff}); resume with the same pp_size and "
                "pp_virtual_stages"
            )
        self.pipeline.agree(error, ckpt.CheckpointError)
