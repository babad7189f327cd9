"""Step 1 of the ds-tiny-coder recipe: the corpus and the tokenizer.

The corpus is the running interpreter's standard library (every machine with Python
has it; Python Software Foundation License), split by file into train and held-out
sets by a hash of the file's path, so the split is stable across runs and machines.
The tokenizer is a SentencePiece BPE model trained on the train split only.

    uv run python models/ds-tiny-coder/recipe/prepare.py --out build/ds-tiny-coder

writes train.jsonl, heldout.jsonl and manifest.json under --out (records are
{"text": source, "path": path relative to the stdlib}) and tokenizer.model into
models/ds-tiny-coder/. Deterministic: the same interpreter gives the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import sysconfig
import tempfile
from pathlib import Path

import sentencepiece as spm

MODEL_DIR = Path(__file__).resolve().parents[1]
HELDOUT_EVERY = 50  # about 2% of files go to the held-out set


def stdlib_sources(root: Path) -> list[tuple[str, str]]:
    """(relative path, source) of every non-empty UTF-8 .py file of the stdlib, by path."""
    sources = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in path.parts or "__pycache__" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a few test fixtures are deliberately not UTF-8
        if text.strip():  # empty __init__.py files teach nothing
            sources.append((rel, text))
    return sources


def is_heldout(rel_path: str) -> bool:
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:4], "big") % HELDOUT_EVERY == 0


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def jsonl(records: list[tuple[str, str]]) -> bytes:
    lines = (json.dumps({"text": text, "path": rel}, ensure_ascii=False) for rel, text in records)
    return ("\n".join(lines) + "\n").encode()


def train_tokenizer(texts: list[str], vocab_size: int, seed_sentences: int) -> bytes:
    """A byte-fallback BPE model that keeps code exact: identity normalisation, no dummy
    prefix, whitespace runs and newlines as pieces, so decode(encode(s)) == s and
    encode(a) + encode(b) decodes to a + b."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "\t"],
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        max_sentence_length=1 << 22,
        input_sentence_size=seed_sentences,
        shuffle_input_sentence=False,
        bos_id=1,
        eos_id=2,
        pad_id=0,
        unk_id=3,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return model.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/ds-tiny-coder"))
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokenizer-out", type=Path, default=MODEL_DIR / "tokenizer.model")
    args = parser.parse_args(argv)
    if args.vocab_size < 300:
        parser.error(
            f"--vocab-size must be >= 300 (256 byte pieces + specials), got {args.vocab_size}"
        )

    root = Path(sysconfig.get_paths()["stdlib"])
    sources = stdlib_sources(root)
    train = [s for s in sources if not is_heldout(s[0])]
    heldout = [s for s in sources if is_heldout(s[0])]
    write_atomic(args.out / "train.jsonl", jsonl(train))
    write_atomic(args.out / "heldout.jsonl", jsonl(heldout))

    tokenizer = train_tokenizer([text for _, text in train], args.vocab_size, len(train))
    write_atomic(args.tokenizer_out, tokenizer)

    manifest = {
        "source": f"Python {platform.python_version()} standard library ({root})",
        "license": "Python Software Foundation License Version 2",
        "files": {"train": len(train), "heldout": len(heldout)},
        "bytes": {
            "train": sum(len(t.encode()) for _, t in train),
            "heldout": sum(len(t.encode()) for _, t in heldout),
        },
        "heldout_rule": f"sha256(path)[:4] % {HELDOUT_EVERY} == 0",
        "tokenizer": {"type": "sentencepiece-bpe", "vocab_size": args.vocab_size},
    }
    write_atomic(args.out / "manifest.json", json.dumps(manifest, indent=2).encode())
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
