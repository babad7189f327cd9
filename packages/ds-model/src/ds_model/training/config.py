"""``TrainingConfig``: every knob of a training run in one validated value object.

The field names follow Hugging Face ``TrainingArguments`` where one exists
(``per_device_train_batch_size``, ``num_train_epochs``, ``gradient_accumulation_steps``)
so that the published keyword call form works unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("none", "ddp", "fsdp", "3d_parallel", "pipeline")
QUANTIZATIONS = ("none", "int4")
OPTIMIZERS = ("grouped_adamw", "adamw")
OPTIMIZER_GROUPINGS = ("static", "sensitivity")
ZERO_STAGES = (0, 1)


@dataclass
class TrainingConfig:
    """Hyper-parameters and run settings. Every field is validated in ``__post_init__``.

    Sizes: ``max_seq_len`` is the packed sequence length in tokens (``None``: the
    model's context, at most 512, filled in by the ``Trainer``); the global batch of
    one optimizer step is ``per_device_train_batch_size * gradient_accumulation_steps
    * world_size`` sequences.
    """

    output_dir: str = "ds-train-output"
    num_train_epochs: int = 1
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    precision: str = "fp32"
    max_seq_len: int | None = None
    packing: bool = True
    skip_bad_records: bool = False
    shuffle: bool = True
    seed: int = 0
    logging_steps: int = 1
    eval_steps: int = 0  # 0: evaluate only at the end (when an eval set is given)
    save_steps: int = 0  # 0: save only at the end
    # Also save when this many minutes passed since the last save (0: off): long runs on
    # shared or preemptible machines keep a bounded amount of work at risk.
    save_minutes: float = 0.0
    save_total_limit: int | None = 2
    save_final: bool = True
    distributed_strategy: str = "none"
    compress_gradients: bool = False  # ddp only: ds-optim's 4-bit all-reduce hook
    ddp_find_unused_parameters: bool | None = None  # None: True for MoE models
    tp_size: int = 0  # 3d_parallel: tensor-parallel degree (0: world size / pp_size)
    # Pipeline stages. pipeline: 0 = every rank a stage, else world / pp_size data-parallel
    # (FSDP2) replicas of a pp_size-stage pipeline; 3d_parallel: 0 or 1 = no pipeline.
    pp_size: int = 0
    # Stages per pipeline rank: > 1 runs torch's interleaved 1F1B (fewer idle slots).
    pp_virtual_stages: int = 1
    quantization: str = "none"
    optimizer: str = "grouped_adamw"
    progress_bar: bool = True
    plot: bool = True
    torch_compile: bool = False  # torch.compile the model's forward (none / ddp only)
    # Seconds a collective may wait for the other ranks before it fails (a rank that
    # died or hangs); torch's own default is 30 minutes (NCCL: 10).
    collective_timeout_s: float = 600.0
    # Train RMSNorm, SwiGLU MLPs and routed experts through ds_model.lean_backward's
    # hand-written backward passes (fewer saved activations; docs/benchmarks.md).
    lean_backward: bool = True
    # grouped_adamw's parameter groups: "static" (by name and module type) or
    # "sensitivity" (lr tiers by grad-to-weight ratio, regrouped every regroup_every steps).
    optimizer_grouping: str = "static"
    regroup_every: int = 100
    # 1: ZeRO-1, optimizer state sharded across ddp ranks (a no-op on one process).
    zero_stage: int = 0

    def __post_init__(self) -> None:
        _positive("num_train_epochs", self.num_train_epochs)
        _positive("per_device_train_batch_size", self.per_device_train_batch_size)
        _positive("per_device_eval_batch_size", self.per_device_eval_batch_size)
        _positive("gradient_accumulation_steps", self.gradient_accumulation_steps)
        if self.max_seq_len is not None:
            _positive("max_seq_len", self.max_seq_len)
        _positive("logging_steps", self.logging_steps)
        _positive("pp_virtual_stages", self.pp_virtual_stages)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps={self.max_steps!r}: expected -1 (use epochs) or > 0")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r}: expected > 0")
        for name in ("warmup_steps", "eval_steps", "save_steps", "save_minutes", "tp_size",
                     "pp_size"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected >= 0")
        if not (
            isinstance(self.collective_timeout_s, (int, float))
            and not isinstance(self.collective_timeout_s, bool)
            and self.collective_timeout_s > 0
        ):
            raise ValueError(
                f"collective_timeout_s={self.collective_timeout_s!r}: expected seconds > 0"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r}: expected in [0, 1]")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r}: expected > 0 or None")
        _choice("precision", self.precision, PRECISIONS)
        _choice("distributed_strategy", self.distributed_strategy, STRATEGIES)
        if self.torch_compile and self.distributed_strategy not in ("none", "ddp"):
            raise ValueError(
                f"torch_compile=True with distributed_strategy={self.distributed_strategy!r}: "
                "compiling is supported with 'none' and 'ddp' only"
            )
        if self.pp_size > 1 and self.distributed_strategy not in ("pipeline", "3d_parallel"):
            raise ValueError(
                f"pp_size={self.pp_size} with distributed_strategy="
                f"{self.distributed_strategy!r}: pipeline stages need 'pipeline' or "
                "'3d_parallel'"
            )
        if self.pp_virtual_stages > 1 and not self.pipelined:
            raise ValueError(
                f"pp_virtual_stages={self.pp_virtual_stages} needs pipeline stages: "
                "distributed_strategy='pipeline', or '3d_parallel' with pp_size > 1"
            )
        if self.pp_size == 1 and self.distributed_strategy == "pipeline":
            raise ValueError(
                "pp_size=1 with distributed_strategy='pipeline': one stage is no pipeline; "
                "use pp_size=0 (every rank a stage) or >= 2, or ddp / fsdp"
            )
        if self.precision == "fp16" and self.pipelined:
            raise ValueError(
                f"precision='fp16' with pipeline stages (distributed_strategy="
                f"{self.distributed_strategy!r}, pp_size={self.pp_size}) is not supported: "
                "each stage's loss scaler would skip steps on its own; use bf16 or fp32"
            )
        _choice("quantization", self.quantization, QUANTIZATIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        self._check_optimizer_options()
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit={self.save_total_limit!r}: expected >= 1 or None")
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]

    def _check_optimizer_options(self) -> None:
        _choice("optimizer_grouping", self.optimizer_grouping, OPTIMIZER_GROUPINGS)
        _positive("regroup_every", self.regroup_every)
        if self.zero_stage not in ZERO_STAGES or isinstance(self.zero_stage, bool):
            raise ValueError(f"zero_stage={self.zero_stage!r}: expected one of {list(ZERO_STAGES)}")
        for name, value, off in (
            ("optimizer_grouping", self.optimizer_grouping, "static"),
            ("zero_stage", self.zero_stage, 0),
        ):
            if value != off and self.optimizer != "grouped_adamw":
                raise ValueError(
                    f"{name}={value!r} needs optimizer='grouped_adamw' (ds-optim's), got "
                    f"optimizer={self.optimizer!r}"
                )
        strategy = self.distributed_strategy
        if self.zero_stage == 1 and strategy != "ddp":
            why = (
                "one process has nothing to shard"
                if strategy == "none"
                else "fsdp, 3d_parallel and pipeline already shard optimizer state with "
                "the parameters (FSDP2)"
            )
            raise ValueError(
                f"zero_stage=1 with distributed_strategy={strategy!r}: ZeRO-1 shards the "
                f"optimizer state of ddp ranks; {why}. Use distributed_strategy='ddp' or "
                "zero_stage=0"
            )
        if self.zero_stage == 1 and self.optimizer_grouping == "sensitivity":
            raise ValueError(
                "zero_stage=1 with optimizer_grouping='sensitivity': ZeRO-1 assigns "
                "parameters to ranks once, by group, so groups cannot change; use "
                "optimizer_grouping='static' or zero_stage=0"
            )
        if self.optimizer_grouping == "sensitivity" and strategy not in ("none", "ddp"):
            raise ValueError(
                f"optimizer_grouping='sensitivity' with distributed_strategy={strategy!r}: "
                "sensitivity regrouping runs with 'none' or 'ddp' (every rank sees whole "
                "gradients, so all make the same grouping); use optimizer_grouping='static'"
            )

    @property
    def pipelined(self) -> bool:
        """Whether the model is cut into pipeline stages (when run on several ranks)."""
        return self.distributed_strategy == "pipeline" or (
            self.distributed_strategy == "3d_parallel" and self.pp_size > 1
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> TrainingConfig:
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise TypeError(
                f"unknown training option(s) {unknown}; allowed: {sorted(self.field_names())}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an integer >= 1")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {list(allowed)}")
