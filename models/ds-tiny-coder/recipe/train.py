"""Step 3 of the ds-tiny-coder recipe: train (or resume) with deepseek-train.

    uv run python models/ds-tiny-coder/recipe/train.py --data build/ds-tiny-coder \
        --init build/ds-tiny-coder/init --output build/ds-tiny-coder/run [--resume]

runs ``deepseek-train`` in this process with the hyperparameters of recipe/train.json,
on --threads CPU threads, in bf16 autocast where the CPU multiplies bf16 natively
(avx512_bf16, amx_bf16, Arm bf16) and fp32 elsewhere. ``--resume`` continues exactly
from the newest checkpoint in --output (same batches, optimizer and RNG state).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

RECIPE = Path(__file__).resolve().parent


def deepseek_train_argv(args: argparse.Namespace, hyper: dict, precision: str) -> list[str]:
    argv = [
        "--model", str(args.init),
        "--data", str(args.data / "train.jsonl"),
        "--eval_data", str(args.data / "heldout.jsonl"),
        "--output", str(args.output),
        "--precision", precision,
        "--no_progress",
    ]  # fmt: skip
    for name, value in hyper.items():
        argv += [f"--{name}", str(value)]
    if args.resume:
        argv += ["--resume", str(args.output)]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="prepare.py's --out")
    parser.add_argument("--init", type=Path, required=True, help="init_model.py's --out")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--hyperparameters", type=Path, default=RECIPE / "train.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="continue the run in --output")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch
    from ds_model.training import cli
    from ds_model.training.trainer import cpu_has_bf16

    torch.set_num_threads(args.threads)
    precision = "bf16" if torch.cuda.is_available() or cpu_has_bf16() else "fp32"
    hyper = json.loads(args.hyperparameters.read_text())
    command = deepseek_train_argv(args, hyper, precision)
    print("deepseek-train " + " ".join(command), flush=True)
    return cli.main(command)


if __name__ == "__main__":
    raise SystemExit(main())
