"""Training for ds-model: ``Trainer`` (full, LoRA, QLoRA), ``DPOTrainer``,
``DistillationTrainer``, the data pipeline, atomic checkpoints and the
``deepseek-train`` command line. Runs in one process or under ``torchrun``
(DDP, FSDP2, FSDP2 + tensor parallel)."""

from ds_model.training.checkpoint import CheckpointError, find_latest_checkpoint
from ds_model.training.config import TrainingConfig
from ds_model.training.data import DataReport, build_lm_dataset, build_preference_dataset
from ds_model.training.distill import DistillationTrainer
from ds_model.training.dpo import DPOTrainer
from ds_model.training.loss import causal_lm_loss_sum, distillation_loss_sums, dpo_loss
from ds_model.training.records import BadRecordError
from ds_model.training.tokenize import ByteTokenizer
from ds_model.training.trainer import Trainer, TrainResult

__all__ = [
    "BadRecordError",
    "ByteTokenizer",
    "CheckpointError",
    "DPOTrainer",
    "DataReport",
    "DistillationTrainer",
    "TrainResult",
    "Trainer",
    "TrainingConfig",
    "build_lm_dataset",
    "build_preference_dataset",
    "causal_lm_loss_sum",
    "distillation_loss_sums",
    "dpo_loss",
    "find_latest_checkpoint",
]
