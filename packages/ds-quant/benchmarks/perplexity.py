"""Perplexity of float, INT8, INT4 RTN and INT4 calibrated (AWQ-style) versions of a model
on a held-out text, plus per-layer output SQNR of the trained weights.

Two modes:
  --model PATH --text HELD_OUT.txt [--calib-text CALIB.txt]
      a ds-model checkpoint (``ds_model.from_pretrained`` / ``load_tokenizer``); this is
      the default-model table of docs/benchmarks.md ("Perplexity on the default model").
  --toy [--steps N]
      trains the tiny byte-level ToyLM of ``toy_lm.py`` on the local Python stdlib
      sources and evaluates on held-out stdlib files. Labelled "toy" in the output.

Every ``nn.Linear`` is quantized except the output head (``lm_head``), as AWQ does.
Run: uv run --frozen python packages/ds-quant/benchmarks/perplexity.py --toy
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch
import toy_lm
from common import machine
from ds_quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig, calibrate, quantize_
from torch import nn


def not_head(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and not fqn.endswith("lm_head")


def load_ds_model(path: str, text: str, calib_text: str | None, seq: int):
    import ds_model  # the benchmark, not the library, uses ds-model

    model = ds_model.from_pretrained(path).eval()
    tokenizer = ds_model.load_tokenizer(path)

    def windows(s: str, limit: int) -> list[torch.Tensor]:
        ids = torch.tensor(tokenizer.encode(s), dtype=torch.long)
        n = min(limit, (ids.numel() - 1) // seq)
        return [ids[i * seq : i * seq + seq + 1][None] for i in range(n)]

    def forward(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        out = m(ids)
        return out.logits if hasattr(out, "logits") else out

    held = windows(text, 64)
    calib = windows(calib_text, 16) if calib_text else held[:8]
    return model, held, calib, forward


def perplexity(forward, model, windows) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows:
            logits = forward(model, chunk[:, :-1]).float()
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += chunk[:, 1:].numel()
    return math.exp(total / count)


def layer_sqnr(float_model: nn.Module, config, windows, forward) -> list[float]:
    """Output SQNR (dB) of each quantized linear on the held-out inputs it receives."""
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, n=n: inputs.setdefault(n, []).append(a[0]))
        for n, m in float_model.named_modules()
        if not_head(m, n)
    ]
    with torch.no_grad():
        for chunk in windows[:2]:
            forward(float_model, chunk[:, :-1])
    for h in hooks:
        h.remove()
    result = []
    with torch.no_grad():
        for name, xs in inputs.items():
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
            layer = float_model.get_submodule(name)
            ref = layer(x)
            q = quantize_(layer, config)
            err = (q(x) - ref).pow(2).mean()
            result.append(float(10 * torch.log10(ref.pow(2).mean() / err)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="ds-model checkpoint directory")
    parser.add_argument("--text", help="held-out text file (with --model)")
    parser.add_argument("--calib-text", help="calibration text file (with --model)")
    parser.add_argument("--toy", action="store_true", help="train and use the toy byte LM")
    parser.add_argument("--steps", type=int, default=300, help="toy training steps")
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    if args.toy:
        print("model: TOY byte-level LM (toy_lm.py), trained here on stdlib sources")
        model = toy_lm.train(steps=args.steps, seq=args.seq)
        train, held_data = toy_lm.corpus()
        held = toy_lm.batches(held_data, 8, args.seq, 16, seed=1)
        calib = toy_lm.batches(train, 8, args.seq, 8, seed=2)

        def forward(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
            return m(ids)

    elif args.model and args.text:
        print(f"model: {args.model}")
        calib_text = Path(args.calib_text).read_text() if args.calib_text else None
        model, held, calib, forward = load_ds_model(
            args.model, Path(args.text).read_text(), calib_text, args.seq
        )
    else:
        parser.error("give --toy, or --model PATH with --text HELD_OUT.txt")
    print(f"machine: {machine()}")
    held_tokens = sum(w[:, 1:].numel() for w in held)
    print(f"held-out tokens: {held_tokens}; calibration batches: {len(calib)}\n")

    int4 = Int4WeightOnlyConfig(group_size=128)
    variants = {
        "float": model,
        "INT8 weight-only": quantize_(copy.deepcopy(model), Int8WeightOnlyConfig(), not_head),
        "INT4 g128 RTN": quantize_(copy.deepcopy(model), int4, not_head),
        "INT4 g128 AWQ-style calibrated": calibrate(
            copy.deepcopy(model),
            int4,
            [c[:, :-1] for c in calib],
            not_head,
            forward_fn=lambda m, ids: forward(m, ids),
        ),
    }
    base = None
    print("| variant | perplexity | vs float |")
    print("| --- | ---: | ---: |")
    for label, m in variants.items():
        ppl = perplexity(forward, m, held)
        base = base or ppl
        print(f"| {label} | {ppl:.3f} | {ppl / base:.4f}x |")

    print("\nper-layer output SQNR on held-out activations (dB, min / median / max):\n")
    print("| recipe | min | median | max |")
    print("| --- | ---: | ---: | ---: |")
    for label, config in [("INT8 weight-only", Int8WeightOnlyConfig()), ("INT4 g128 RTN", int4)]:
        values = sorted(layer_sqnr(model, config, held, forward))
        print(f"| {label} | {values[0]:.1f} | {values[len(values) // 2]:.1f} | {values[-1]:.1f} |")


if __name__ == "__main__":
    main()
