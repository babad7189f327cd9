"""Step 2 of the ds-tiny-coder recipe: the randomly initialised starting checkpoint.

    uv run python models/ds-tiny-coder/recipe/init_model.py --out build/ds-tiny-coder/init

writes config.json (--config, default recipe/config.json), seeded random weights and the
tokenizer from step 1 (--tokenizer: tokenizer.model, with tokenizer.json and
tokenizer_config.json for transformers), as a checkpoint directory deepseek-train starts
from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ds_model

RECIPE = Path(__file__).resolve().parent
MODEL_DIR = RECIPE.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/ds-tiny-coder/init"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer", type=Path, default=MODEL_DIR / "tokenizer.model", help="SentencePiece model"
    )
    parser.add_argument("--config", type=Path, default=RECIPE / "config.json")
    args = parser.parse_args(argv)

    config = json.loads(args.config.read_text())
    model = ds_model.from_config(config, seed=args.seed)
    ds_model.save_pretrained(model, args.out)
    # The chat template and special tokens stay the shipped model's; the SentencePiece
    # model is the one prepare.py trained. save_pretrained also writes tokenizer.json.
    template = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    template = {k: v for k, v in template.items() if k != "tokenizer_class"}
    ds_model.Tokenizer.from_sentencepiece(args.tokenizer, template).save_pretrained(args.out)
    total, active = ds_model.parameter_counts(model)
    print(f"{args.out}: {total:,} parameters, {active:,} active per token")


if __name__ == "__main__":
    main()
