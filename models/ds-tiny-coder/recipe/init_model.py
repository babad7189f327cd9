"""Step 2 of the ds-tiny-coder recipe: the randomly initialised starting checkpoint.

    uv run python models/ds-tiny-coder/recipe/init_model.py --out build/ds-tiny-coder/init

writes config.json (recipe/config.json), seeded random weights, the tokenizer from
step 1 and its tokenizer_config.json, as a checkpoint directory deepseek-train starts from.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import ds_model

RECIPE = Path(__file__).resolve().parent
MODEL_DIR = RECIPE.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/ds-tiny-coder/init"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = json.loads((RECIPE / "config.json").read_text())
    model = ds_model.from_config(config, seed=args.seed)
    ds_model.save_pretrained(model, args.out)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(MODEL_DIR / name, args.out / name)
    total, active = ds_model.parameter_counts(model)
    print(f"{args.out}: {total:,} parameters, {active:,} active per token")


if __name__ == "__main__":
    main()
