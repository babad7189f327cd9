"""Step 2b of the ds-tiny-coder recipe: a second-stage corpus of short documented functions.

    uv run python models/ds-tiny-coder/recipe/functions.py --data build/ds-tiny-coder \
        --out build/ds-tiny-coder/functions [--file-share 0.5]

Library files teach a small model what Python looks like, but a function whose docstring
says what it returns and whose body does it in a line or two is rare inside them, and it
is what a user prompts with. This step takes every such function from the training split
(prepare.py's ``train.jsonl``; the held-out split and the evaluation problems stay out),
as a function on its own, dedented: a docstring and at most ``MAX_BODY_LINES`` lines of
body, no decorators, the whole within ``MAX_CHARS``. Exact copies are dropped. Ordinary
training files, drawn at random until they are ``--file-share`` of the characters, are
mixed in, so the second stage keeps seeing whole files. Writes ``train.jsonl``
(shuffled, seeded), ``heldout.jsonl`` (a copy of the first stage's) and
``tokenizer.model`` into ``--out``, the layout ``train.py --data`` reads, and prints the
counts. The model card records what a second stage on it measured.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

from eval_problems import contaminated

MAX_BODY_LINES = 3
MAX_CHARS = 600


def short_functions(source: str) -> Iterator[str]:
    """The short documented functions of one file's text, each dedented to column 0."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.decorator_list:
            continue
        if ast.get_docstring(node) is None or len(node.body) < 2:
            continue
        body = node.body[1:]
        first, last = body[0].lineno, body[-1].end_lineno or body[-1].lineno
        if last - first + 1 > MAX_BODY_LINES:
            continue
        text = textwrap.dedent("\n".join(lines[node.lineno - 1 : last])) + "\n"
        if len(text) <= MAX_CHARS and contaminated(text) is None:
            yield text


def build(data: Path, out: Path, file_share: float, seed: int = 0) -> dict[str, int]:
    files = [json.loads(line)["text"] for line in (data / "train.jsonl").open()]
    seen: set[bytes] = set()
    functions = []
    for text in files:
        for function in short_functions(text):
            digest = hashlib.sha256(function.encode()).digest()
            if digest not in seen:
                seen.add(digest)
                functions.append(function)
    rng = random.Random(seed)
    budget = file_share / (1 - file_share) * sum(map(len, functions))
    mixed = []
    for text in rng.sample(files, len(files)):
        if budget <= 0:
            break
        mixed.append(text)
        budget -= len(text)
    records = [*functions, *mixed]
    rng.shuffle(records)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "train.jsonl").open("w") as f:
        for text in records:
            f.write(json.dumps({"text": text}) + "\n")
    for name in ("heldout.jsonl", "tokenizer.model"):
        shutil.copyfile(data / name, out / name)
    return {"functions": len(functions), "files": len(mixed), "records": len(records)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="prepare.py's --out")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--file-share", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 <= args.file_share < 1:
        parser.error(f"--file-share must be in [0, 1), got {args.file_share}")
    print(json.dumps(build(args.data, args.out, args.file_share, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
