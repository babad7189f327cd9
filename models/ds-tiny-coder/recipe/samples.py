"""Step 5 of the ds-tiny-coder recipe: the sample completions shown in the model card
and the root README, regenerated from the shipped weights (greedy, so deterministic).

    uv run python models/ds-tiny-coder/recipe/samples.py

Each sample is what ``uv run ds-model generate PROMPT --max-new-tokens 48`` prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ds_model
import torch

MODEL_DIR = Path(__file__).resolve().parents[1]
PROMPTS = [
    "def fibonacci(n):",
    "def is_prime(n):",
    "class Stack:\n    def __init__(self):",
    "import os\n\ndef list_python_files(path):",
    'def read_json(path):\n    """Read a JSON file and return its content."""',
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    model = ds_model.from_pretrained(args.model, dtype=torch.float32)
    for prompt in PROMPTS:
        completion = model.generate(prompt, args.max_new_tokens, temperature=0.0)
        print("```python")
        print(prompt + completion)
        print("```\n")


if __name__ == "__main__":
    main()
