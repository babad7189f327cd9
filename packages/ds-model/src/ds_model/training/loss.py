"""Loss functions, each as a sum plus the count it should be divided by, so that
gradient accumulation and data parallelism can normalize by the *global* count
(a mean of per-micro-batch means would weight short batches wrongly)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_model.training.tokenize import IGNORE_INDEX

__all__ = ["causal_lm_loss_sum", "distillation_loss_sums", "dpo_loss", "sequence_logps"]


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (batch, seqlen, vocab), labels (batch, seqlen) -> position t predicts t+1."""
    return logits[:, :-1, :].float(), labels[:, 1:]


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labels != -100, and how many there were."""
    lg, lb = _shift(logits, labels)
    total = F.cross_entropy(
        lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, int((lb != IGNORE_INDEX).sum())


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens: (batch,) float32."""
    lg, lb = _shift(logits, labels)
    mask = lb != IGNORE_INDEX
    logp = torch.log_softmax(lg, dim=-1)
    picked = logp.gather(-1, lb.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023), per pair: ``-log σ(β·((πc − rc) − (πr − rr)))``.

    All inputs are (batch,) summed response log-probs. Returns (per-pair losses, the
    implicit reward margins ``β·((πc − rc) − (πr − rr))``).
    """
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin


def distillation_loss_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum of per-token KL(teacher_T ‖ student_T) · T², sum of hard CE, token count).

    Both logits are (batch, seqlen, vocab); only positions with a label are counted.
    The T² factor keeps the soft-target gradients on the scale of the hard loss
    (Hinton et al. 2015).
    """
    s, lb = _shift(student_logits, labels)
    t = teacher_logits[:, :-1, :].float()
    mask = lb != IGNORE_INDEX
    log_s = torch.log_softmax(s / temperature, dim=-1)
    log_t = torch.log_softmax(t / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    kl_sum = (kl * mask).sum() * temperature**2
    ce = F.cross_entropy(
        s.reshape(-1, s.shape[-1]), lb.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return kl_sum, ce, int(mask.sum())
