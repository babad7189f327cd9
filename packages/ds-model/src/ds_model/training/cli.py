"""``deepseek-train`` (alias ``ds_train``): the Trainer from the command line.

    deepseek-train --model tiny --data train.jsonl --batch_size 8 --learning_rate 2e-4 \\
        --lora_rank 8 --epochs 3 --output runs/tiny-lora

``--method dpo`` / ``--method distill`` pick the DPO or distillation trainer
(``ds_model.training.methods``).

``--gpus N`` (N > 1) relaunches the same command under ``torch.distributed.run`` with N
local processes (one per GPU; on a machine without CUDA, N CPU processes on gloo). Under
an outer ``torchrun`` the command just joins the process group. The launcher passes
SIGINT and SIGTERM on to torchrun (which stops its ranks) and exits with its status.
``--max_restarts N`` lets torch's elastic agent restart every rank after one fails; with
``--resume auto`` the restarted ranks continue from the newest complete checkpoint, so
the job recovers by itself.

Bad input (a config, data or checkpoint error) prints one line and exits with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from ds_model.training.config import (
    OPTIMIZER_GROUPINGS,
    PRECISIONS,
    QUANTIZATIONS,
    STRATEGIES,
    ZERO_STAGES,
)
from ds_model.training.methods import add_method_arguments, build_trainer, check_method_arguments

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepseek-train",
        description="Train or fine-tune a DeepSeek model (full, LoRA or QLoRA; SFT, DPO or "
        "distillation).",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or preset name")
    p.add_argument(
        "--data", "--dataset", dest="data", required=True, help="training .json/.jsonl file"
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer path, or 'bytes' (UTF-8 bytes); default: the model directory's own",
    )
    p.add_argument("--eval_data", help="evaluation .json/.jsonl file")
    p.add_argument("--output", default="ds-train-output", help="output directory")
    p.add_argument(
        "--resume",
        help="checkpoint or output directory to resume from, or 'auto': the newest complete "
        "checkpoint in --output if there is one, else a fresh start",
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=-1, help="> 0 overrides --epochs")
    p.add_argument(
        "--batch_size", type=int, default=8, help="sequences per process per micro-batch"
    )
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument(
        "--seq_len",
        type=int,
        default=None,
        help="packed sequence length (default: the model's context, at most 512)",
    )
    p.add_argument("--no_packing", action="store_true", help="one example per sequence")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument(
        "--torch_compile",
        action="store_true",
        help="torch.compile the model (first step slower; single process or ddp)",
    )
    p.add_argument("--lora_rank", type=int, default=0, help="0: full training")
    p.add_argument("--lora_alpha", type=float, default=None, help="default: 2 * rank")
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument(
        "--lora_targets", default="all-linear", help="comma-separated module names or all-linear"
    )
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none", help="int4: QLoRA")
    p.add_argument("--gpus", type=int, default=1, help="local processes to launch")
    p.add_argument(
        "--max_restarts",
        type=int,
        default=0,
        help="with --gpus: times torchrun restarts every rank after one fails; with "
        "--resume auto each restart continues from the newest checkpoint",
    )
    p.add_argument("--distributed_strategy", choices=STRATEGIES, default=None)
    p.add_argument("--tp_size", type=int, default=0, help="3d_parallel: tensor-parallel degree")
    p.add_argument(
        "--pp_size",
        type=int,
        default=0,
        help="pipeline stages (pipeline: 0 = all ranks; 3d_parallel: 0 = no pipeline)",
    )
    p.add_argument(
        "--pp_virtual_stages",
        type=int,
        default=1,
        help="stages per pipeline rank; > 1 runs the interleaved 1F1B schedule",
    )
    p.add_argument("--compress_gradients", action="store_true", help="ddp: 4-bit all-reduce")
    p.add_argument("--optimizer", choices=("grouped_adamw", "adamw"), default="grouped_adamw")
    p.add_argument(
        "--optimizer_grouping",
        choices=OPTIMIZER_GROUPINGS,
        default="static",
        help="grouped_adamw's groups: static, or sensitivity (lr tiers, regrouped)",
    )
    p.add_argument(
        "--regroup_every", type=int, default=100, help="sensitivity: steps between regroupings"
    )
    p.add_argument(
        "--zero_stage",
        type=int,
        choices=ZERO_STAGES,
        default=0,
        help="1: ZeRO-1, optimizer state sharded across ddp ranks",
    )
    p.add_argument("--save_steps", type=int, default=0)
    p.add_argument("--save_minutes", type=float, default=0.0, help="also save this often (0: off)")
    p.add_argument("--eval_steps", type=int, default=0)
    p.add_argument("--logging_steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_bad_records", action="store_true")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--collective_timeout",
        type=float,
        default=600.0,
        help="seconds a collective waits for the other ranks before failing",
    )
    add_method_arguments(p)
    p.add_argument("--debug", action="store_true", help="on bad input, show the traceback")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_LAUNCHER_FLAGS = ("--gpus", "--max_restarts")  # the launcher's own, not the ranks'


def _without_launcher_flags(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _LAUNCHER_FLAGS:
            skip = True
            continue
        if arg.split("=")[0] in _LAUNCHER_FLAGS:
            continue
        out.append(arg)
    return out


def _launch(nproc: int, argv: Sequence[str], strategy: str, max_restarts: int = 0) -> int:
    rest = _without_launcher_flags(argv)
    if not any(a.split("=")[0] == "--distributed_strategy" for a in rest):
        rest += ["--distributed_strategy", strategy]
    rendezvous = ["--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    if max_restarts:
        # A restart needs fresh rendezvous keys: with the agent's store shared (the
        # static rendezvous, or c10d's default) the restarted ranks read the dead ranks'
        # gloo addresses and fail to connect. c10d with sharing off gives each round a
        # new store (pytorch/pytorch#135712).
        rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}"]
        rendezvous.append(f"--max-restarts={max_restarts}")
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # read by torchrun's agent
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        *rendezvous,
        "-m",
        "ds_model.training.cli",
        *rest,
    ]
    return run_forwarding_signals(cmd)


def run_forwarding_signals(cmd: list[str]) -> int:
    """Run ``cmd`` and return its exit status (``128 + n`` when signal ``n`` ended it),
    passing SIGINT and SIGTERM on to it. It gets its own session so a terminal's Ctrl-C
    reaches it once, through this forwarding, rather than twice."""
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, _frame: Any) -> None:
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def _lora_config(args: argparse.Namespace) -> Any:
    if args.lora_rank <= 0:
        if args.quantization != "none":
            raise SystemExit("--quantization int4 (QLoRA) needs --lora_rank > 0")
        return None
    from ds_lora import LoraConfig

    targets = args.lora_targets
    target_modules: Any = (
        targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    )
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    return LoraConfig(
        r=args.lora_rank,
        lora_alpha=alpha,
        target_modules=target_modules,
        lora_dropout=args.lora_dropout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _run(args, argv)
    except (ValueError, OSError) as exc:  # config, data, checkpoint and path errors
        if args.debug or isinstance(exc, (BlockingIOError, ConnectionError)):
            raise
        print(f"deepseek-train: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.gpus < 1:
        raise SystemExit(f"--gpus {args.gpus}: expected >= 1")
    check_method_arguments(args)
    under_torchrun = "LOCAL_RANK" in os.environ
    launching = args.gpus > 1 and not under_torchrun
    if args.max_restarts < 0 or (args.max_restarts and not launching):
        raise SystemExit(
            f"--max_restarts {args.max_restarts}: expected >= 0, and only with --gpus > 1 "
            "(under your own torchrun, pass --max-restarts to torchrun)"
        )
    strategy = args.distributed_strategy
    if launching:
        return _launch(args.gpus, argv, strategy or "ddp", args.max_restarts)
    if strategy is None:
        strategy = "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"

    from ds_model.training.config import TrainingConfig

    config = TrainingConfig(
        output_dir=args.output,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
        max_seq_len=args.seq_len,
        packing=not args.no_packing,
        precision=args.precision,
        torch_compile=args.torch_compile,
        quantization=args.quantization,
        distributed_strategy=strategy,
        tp_size=args.tp_size,
        pp_size=args.pp_size,
        pp_virtual_stages=args.pp_virtual_stages,
        compress_gradients=args.compress_gradients,
        optimizer=args.optimizer,
        optimizer_grouping=args.optimizer_grouping,
        regroup_every=args.regroup_every,
        zero_stage=args.zero_stage,
        save_steps=args.save_steps,
        save_minutes=args.save_minutes,
        eval_steps=args.eval_steps,
        logging_steps=args.logging_steps,
        seed=args.seed,
        skip_bad_records=args.skip_bad_records,
        progress_bar=not args.no_progress,
        collective_timeout_s=args.collective_timeout,
    )
    trainer = build_trainer(
        args,
        model_path=args.model,
        args=config,
        lora_config=_lora_config(args),
        tokenizer=args.tokenizer,
    )
    result = trainer.train(data_path=args.data, resume_from=args.resume, eval_data=args.eval_data)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {
            "steps": result.global_step,
            "first_loss": result.losses[0] if result.losses else None,
            "final_loss": result.losses[-1] if result.losses else None,
            "checkpoint": result.checkpoint,
            "metrics": result.metrics_path,
            "plot": result.plot_path,
        }
        if result.eval_history:
            summary.update(result.eval_history[-1])
        print(json.dumps(summary))
    _shutdown()
    return 0


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
