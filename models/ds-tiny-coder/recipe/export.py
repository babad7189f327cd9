"""Step 4 of the ds-tiny-coder recipe: turn the last training checkpoint into the
shipped model, and measure it.

    uv run python models/ds-tiny-coder/recipe/export.py \
        --init build/ds-tiny-coder/init --checkpoint build/ds-tiny-coder/run/checkpoint-600

writes bfloat16 weights (the repo budget is 25 MB), config.json and the tokenizer
(tokenizer.model, tokenizer.json, tokenizer_config.json) into models/ds-tiny-coder/, a
held-out sample (heldout-sample.jsonl) that the test suite scores and the corpus manifest
(corpus-manifest.json, from the --heldout file's directory), and prints the held-out loss
of the exported weights on that sample and on the whole held-out split.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import ds_model
import torch
from evaluate_model import heldout_bits_per_byte  # this directory, as the script runs
from safetensors.torch import load_file

MODEL_DIR = Path(__file__).resolve().parents[1]
SAMPLE_FILES = 4  # held-out files shipped for the regression test


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", type=Path, default=Path("build/ds-tiny-coder/init"))
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--heldout", type=Path, default=Path("build/ds-tiny-coder/heldout.jsonl"))
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    args = parser.parse_args(argv)

    model = ds_model.from_pretrained(args.init, dtype=torch.float32)
    model.load_state_dict(load_file(args.checkpoint / "model.safetensors"))
    ds_model.save_pretrained(model.to(torch.bfloat16), args.out)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if (args.init / name).resolve() != (args.out / name).resolve():
            shutil.copyfile(args.init / name, args.out / name)

    manifest = args.heldout.parent / "manifest.json"
    if manifest.is_file():  # the corpus the weights were trained on, per package
        shutil.copyfile(manifest, args.out / "corpus-manifest.json")

    records = [json.loads(line) for line in args.heldout.read_text().splitlines() if line]
    sample = [r for r in records if 4_000 <= len(r["text"]) <= 12_000][:SAMPLE_FILES]
    sample_path = args.out / "heldout-sample.jsonl"
    sample_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample))

    shipped = ds_model.from_pretrained(args.out, dtype=torch.float32)
    tokenizer = ds_model.load_tokenizer(args.out)
    for name, texts in (
        ("sample", [r["text"] for r in sample]),
        ("heldout", [r["text"] for r in records]),
    ):
        loss, bits_per_byte, tokens = heldout_bits_per_byte(shipped, tokenizer, texts)
        print(
            f"{name}: {tokens} tokens, loss {loss:.4f} nats/token, perplexity "
            f"{math.exp(loss):.2f}, {bits_per_byte:.4f} bits/byte"
        )
    for path in args.out.iterdir():
        if path.is_file():
            path.chmod(0o644)  # copies of files written by mkstemp would stay 0600


if __name__ == "__main__":
    main()
