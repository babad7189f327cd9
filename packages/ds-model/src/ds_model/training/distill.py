"""``DistillationTrainer``: a student learns from a teacher's temperature-softened
distribution (KL, scaled by T²) mixed with the ordinary next-token loss.

``loss = alpha * T² * KL(teacher_T ‖ student_T) + (1 - alpha) * CE(student, labels)``
per trained token. The teacher must share the student's tokenizer (same vocabulary).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ds_model.training.distributed import DistContext
from ds_model.training.loss import distillation_loss_sums
from ds_model.training.trainer import Trainer, forward_logits

__all__ = ["DistillationTrainer"]


class DistillationTrainer(Trainer):
    """``DistillationTrainer(model=student, teacher=teacher, temperature=2.0, alpha=0.5, ...)``;
    other arguments as for :class:`Trainer`. Logs ``kl`` and ``ce`` per token."""

    def __init__(
        self,
        model: Any = None,
        *,
        teacher: nn.Module,
        temperature: float = 2.0,
        alpha: float = 0.5,
        **kw: Any,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: expected > 0")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r}: expected in [0, 1]")
        super().__init__(model, **kw)
        self.teacher, self.temperature, self.alpha = teacher, float(temperature), float(alpha)

    def prepare_models(self, ctx: DistContext) -> None:
        self.teacher.to(ctx.device).eval().requires_grad_(False)

    def compute_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            teacher_logits = forward_logits(self.teacher, batch["input_ids"])
        student_logits = forward_logits(model, batch["input_ids"])
        if teacher_logits.shape[-1] != student_logits.shape[-1]:
            raise ValueError(
                f"teacher vocabulary {teacher_logits.shape[-1]} != student vocabulary "
                f"{student_logits.shape[-1]}: distillation needs a shared tokenizer"
            )
        kl, ce, _ = distillation_loss_sums(
            student_logits, teacher_logits, batch["labels"], self.temperature
        )
        loss = self.alpha * kl + (1.0 - self.alpha) * ce
        return loss, {"kl": float(kl.detach()), "ce": float(ce.detach())}
