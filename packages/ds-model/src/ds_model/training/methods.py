"""``deepseek-train --method {sft,dpo,distill}``: which trainer the command line builds.

- ``sft`` (default): :class:`Trainer`, next-token loss on text, prompt/completion or
  chat records.
- ``dpo``: :class:`DPOTrainer` on preference records, one JSON object per line::

      {"prompt": "...", "chosen": "...", "rejected": "..."}

  optionally with ``ref_chosen_logp`` / ``ref_rejected_logp`` (the reference model's
  summed response log-probs; then no reference model runs). ``--beta`` (default 0.1);
  ``--ref_model PATH`` names the reference, else it is the policy as it was before
  training (LoRA: the policy with its adapter disabled).
- ``distill``: :class:`DistillationTrainer`; ``--teacher PATH`` (a checkpoint
  directory or preset sharing the student's tokenizer) is required, ``--temperature``
  (default 2.0) and ``--alpha`` (default 0.5, the KL term's weight) as the Python API
  names them.

A flag that belongs to another method is an error naming it, rather than ignored.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["METHODS", "add_method_arguments", "build_trainer", "check_method_arguments"]

METHODS = ("sft", "dpo", "distill")
# flag (argparse dest) -> the method it belongs to
_METHOD_FLAGS = {
    "beta": "dpo",
    "ref_model": "dpo",
    "teacher": "distill",
    "temperature": "distill",
    "alpha": "distill",
}


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, default="sft", help="sft (default), dpo or distill")
    p.add_argument("--beta", type=float, default=None, help="dpo: KL strength (default 0.1)")
    p.add_argument(
        "--ref_model",
        default=None,
        help="dpo: reference model path (default: the policy before training)",
    )
    p.add_argument("--teacher", default=None, help="distill: teacher checkpoint or preset")
    p.add_argument(
        "--temperature", type=float, default=None, help="distill: softening (default 2.0)"
    )
    p.add_argument(
        "--alpha", type=float, default=None, help="distill: weight of the KL term (default 0.5)"
    )


def check_method_arguments(args: argparse.Namespace) -> None:
    """ValueError naming the flag: one of another method's flags, or a missing one."""
    for dest, method in _METHOD_FLAGS.items():
        if getattr(args, dest) is not None and args.method != method:
            raise ValueError(
                f"--{dest} applies to --method {method} only (the method here is {args.method!r})"
            )
    if args.method == "distill" and args.teacher is None:
        raise ValueError("--method distill needs --teacher PATH (a checkpoint or preset)")


def _load(flag: str, path: str) -> Any:
    import torch

    import ds_model

    try:
        return ds_model.from_pretrained(os.fspath(path), dtype=torch.float32)
    except (ValueError, OSError) as exc:
        raise ValueError(f"--{flag} {path!r}: {exc}") from None


def build_trainer(flags: argparse.Namespace, **trainer_kwargs: Any) -> Any:
    """The trainer ``flags.method`` names (``flags``: the parsed command line), built
    with ``trainer_kwargs`` (model, ``args``, LoRA, tokenizer) plus the method's flags."""
    from ds_model.training.distill import DistillationTrainer
    from ds_model.training.dpo import DPOTrainer
    from ds_model.training.trainer import Trainer

    check_method_arguments(flags)
    if flags.method == "dpo":
        extra: dict[str, Any] = {}
        if flags.beta is not None:
            extra["beta"] = flags.beta
        if flags.ref_model is not None:
            extra["ref_model"] = _load("ref_model", flags.ref_model)
        return DPOTrainer(**trainer_kwargs, **extra)
    if flags.method == "distill":
        extra = {"teacher": _load("teacher", flags.teacher)}
        if flags.temperature is not None:
            extra["temperature"] = flags.temperature
        if flags.alpha is not None:
            extra["alpha"] = flags.alpha
        return DistillationTrainer(**trainer_kwargs, **extra)
    return Trainer(**trainer_kwargs)
