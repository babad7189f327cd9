"""``DPOTrainer``: Direct Preference Optimization with the sigmoid loss.

Data: records with ``prompt``, ``chosen`` and ``rejected`` strings, optionally with
``ref_chosen_logp`` / ``ref_rejected_logp`` (the reference model's summed response
log-probs, precomputed). The reference is, in this order: those precomputed values,
the ``ref_model`` given, the policy with its LoRA adapter disabled (LoRA runs), or a
frozen copy of the policy as it was before training.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ds_model.training.data import DataReport, build_preference_dataset
from ds_model.training.distributed import DistContext, unwrap
from ds_model.training.loss import dpo_loss, sequence_logps
from ds_model.training.trainer import Trainer, forward_logits

__all__ = ["DPOTrainer"]


class DPOTrainer(Trainer):
    """``DPOTrainer(model=..., ref_model=None, beta=0.1, train_dataset=...)``; every other
    argument as for :class:`Trainer`. The loss unit is a preference pair; logged extras
    are the mean reward margin and the fraction of pairs ranked correctly."""

    def __init__(
        self, model: Any = None, *, ref_model: nn.Module | None = None, beta: float = 0.1, **kw
    ):
        if not beta > 0:
            raise ValueError(f"beta={beta!r}: expected > 0")
        kw.setdefault("packing", False)
        super().__init__(model, **kw)
        self.beta = float(beta)
        self.ref_model = ref_model
        self._all_precomputed = True

    data_kinds = ("preference",)

    def build_dataset(self, source: Any, tokenizer: Any) -> tuple[Any, DataReport]:
        dataset, report = build_preference_dataset(
            source,
            tokenizer,
            max_seq_len=self.args.max_seq_len,
            skip_bad_records=self.args.skip_bad_records,
        )
        # Train and eval sets both: a reference model is needed unless every record
        # of every set carries its reference log-probs.
        self._all_precomputed = self._all_precomputed and all(
            "ref_chosen_logp" in it and "ref_rejected_logp" in it for it in dataset.items
        )
        return dataset, report

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["input_ids"].shape[0] // 2)

    def prepare_models(self, ctx: DistContext) -> None:
        needs_model = not self._all_precomputed
        if self.ref_model is None and self.lora_config is None and needs_model:
            # Before wrapping, so the copy is the plain initial policy.
            self.ref_model = copy.deepcopy(unwrap(self.model))
        if self.ref_model is not None:
            self.ref_model.to(ctx.device).eval().requires_grad_(False)

    def _reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with torch.no_grad():
            if self.ref_model is not None:
                logits = forward_logits(self.ref_model, batch["input_ids"])
                return sequence_logps(logits, batch["labels"])
            from ds_lora import disable_adapters

            with disable_adapters(unwrap(model)):
                logits = forward_logits(model, batch["input_ids"])
            return sequence_logps(logits, batch["labels"])

    def compute_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        ref = self._reference_logps(model, batch).float()
        policy = sequence_logps(forward_logits(model, batch["input_ids"]), batch["labels"])
        half = policy.shape[0] // 2
        losses, margins = dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], self.beta)
        margins = margins.detach()
        extras = {
            "reward_margin": float(margins.sum()),
            "reward_accuracy": float((margins > 0).float().sum()),
        }
        return losses.sum(), extras

    def evaluate(self, dataset: Any = None) -> dict[str, float]:
        result = super().evaluate(dataset)
        result.pop("eval_perplexity", None)
        return result
