"""Step 1 of the ds-tiny-coder recipe: the corpus and the tokenizer.

    uv run python models/ds-tiny-coder/recipe/prepare.py --out build/ds-tiny-coder

The corpus is the running interpreter's standard library plus the Python files of the
installed distributions whose license metadata is permissive (``sources.py``), read from
local disk. Each file passes, in order: the quality filters (``quality.py``: vendored,
generated, very long lines, mostly data), the evaluation-problem filter
(``eval_problems.py``), the secrets filter (``privacy.py``: files with credentials are
removed, e-mail addresses redacted), exact deduplication and MinHash near-deduplication
(``dedup.py``); the first file of a duplicate group (stdlib first, then packages by name)
stays. Files are split into train and held-out sets by a hash of their corpus path, so
the split is stable across runs and machines. The tokenizer is a SentencePiece BPE model
trained on a deterministic sample of the train split.

Writes under --out: train.jsonl and heldout.jsonl (records {"text", "path", "package"}),
tokenizer.model, manifest.json (per package: version, license, files, bytes, tokens;
what each filter removed) and removed.jsonl (path, filter, reason: never a secret's
value). Deterministic: the same interpreter and installed packages give the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dedup
import eval_problems
import privacy
import quality
import sources

HELDOUT_EVERY = 50  # about 2% of files go to the held-out set


def is_heldout(corpus_path: str, every: int = HELDOUT_EVERY) -> bool:
    digest = hashlib.sha256(corpus_path.encode()).digest()
    return int.from_bytes(digest[:4], "big") % every == 0


def clean(items, log=print) -> tuple[list[sources.Source], list[dict], dict]:
    """The files that pass every filter, the removed ones (path, filter, reason) and the
    counts of what each filter removed or redacted."""
    kept: list[sources.Source] = []
    removed: list[dict] = []
    redacted = Counter()
    hashes: dict[str, str] = {}
    hasher, near = dedup.MinHasher(), dedup.NearDuplicateIndex()
    kept_with_signature: list[str] = []  # index in the LSH -> corpus path, for the report
    started = time.monotonic()

    def drop(item: sources.Source, name: str, reason: str) -> None:
        removed.append({"path": item.path, "filter": name, "reason": reason,
                        "bytes": len(item.text.encode())})  # fmt: skip

    for n, item in enumerate(items, 1):
        if n % 5000 == 0:
            log(f"  {n} files read, {len(kept)} kept ({time.monotonic() - started:.0f} s)")
        rejected = quality.rejection(item.path, item.text)
        if rejected:
            drop(item, *rejected)
            continue
        problem = eval_problems.contaminated(item.text)
        if problem:
            drop(item, "evaluation problem", f"contains the docstring of {problem}()")
            continue
        secret = privacy.credential(item.text)
        if secret:
            drop(item, "secrets", secret)
            continue
        text, emails = privacy.redact_emails(item.text)
        if emails:
            redacted["e-mail addresses"] += emails
            redacted["files with e-mail addresses"] += 1
            item = sources.Source(item.package, item.version, item.license, item.path, text)
        digest = dedup.content_hash(item.text)
        if digest in hashes:
            drop(item, "exact duplicate", f"of {hashes[digest]}")
            continue
        hashes[digest] = item.path
        signature = hasher.signature(item.text)
        if signature is not None:
            other = near.add(signature)
            if other is not None:
                drop(item, "near duplicate", f"of {kept_with_signature[other]}")
                continue
            kept_with_signature.append(item.path)
        kept.append(item)
    return kept, removed, dict(redacted)


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


def jsonl(records: list[sources.Source]) -> bytes:
    lines = (
        json.dumps({"text": r.text, "path": r.path, "package": r.package}, ensure_ascii=False)
        for r in records
    )
    return ("\n".join(lines) + "\n").encode()


def tokenizer_sample(texts: list[str], max_bytes: int) -> list[str]:
    """Every k-th text, k chosen so the sample holds about ``max_bytes``."""
    total = sum(len(t.encode()) for t in texts)
    step = max(1, round(total / max_bytes))
    return texts[::step]


def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
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
        input_sentence_size=0,  # all of them: the sample is already drawn
        shuffle_input_sentence=False,
        bos_id=1,
        eos_id=2,
        pad_id=0,
        unk_id=3,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return model.getvalue()


def manifest(
    train, heldout, token_counts, removed, redacted, distributions, heldout_every, vocab_size
) -> dict:
    packages: dict[str, dict] = {}
    for split, records in (("train", train), ("heldout", heldout)):
        for r in records:
            entry = packages.setdefault(
                r.package,
                {"package": r.package, "version": r.version, "license": r.license,
                 "files": {"train": 0, "heldout": 0}, "bytes": 0, "tokens": 0},
            )  # fmt: skip
            entry["files"][split] += 1
            entry["bytes"] += len(r.text.encode())
            entry["tokens"] += token_counts[r.path]
    by_filter: dict[str, dict] = defaultdict(lambda: {"files": 0, "bytes": 0})
    for r in removed:
        by_filter[r["filter"]]["files"] += 1
        by_filter[r["filter"]]["bytes"] += r["bytes"]
    secrets = Counter(r["reason"] for r in removed if r["filter"] == "secrets")

    def totals(records):
        return {
            "files": len(records),
            "bytes": sum(len(r.text.encode()) for r in records),
            "tokens": sum(token_counts[r.path] for r in records),
        }

    return {
        "source": f"Python {platform.python_version()} standard library and the permissive "
        "installed distributions, from local disk",
        "totals": {"train": totals(train), "heldout": totals(heldout)},
        "packages": sorted(packages.values(), key=lambda p: -p["bytes"]),
        "removed": dict(sorted(by_filter.items())),
        "secrets_removed_by_kind": dict(secrets),
        "redacted": redacted,
        "not_permissive": [
            {
                "package": d.name,
                "version": d.version,
                "license": d.license,
                "python_files": len(d.files),
            }
            for d in distributions
            if not d.permissive and d.files
        ],
        "heldout_rule": f"sha256(path)[:4] % {heldout_every} == 0",
        "tokenizer": {"type": "sentencepiece-bpe", "vocab_size": vocab_size},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/ds-tiny-coder"))
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--heldout-every", type=int, default=HELDOUT_EVERY)
    parser.add_argument(
        "--tokenizer-sample-mb", type=float, default=40.0, help="train text the tokenizer sees"
    )
    parser.add_argument(
        "--stdlib-only", action="store_true", help="the standard library alone (no packages)"
    )
    args = parser.parse_args(argv)
    if args.vocab_size < 300:
        parser.error(
            f"--vocab-size must be >= 300 (256 byte pieces + specials), got {args.vocab_size}"
        )
    if args.heldout_every < 2:
        parser.error(f"--heldout-every must be >= 2, got {args.heldout_every}")

    distributions = [] if args.stdlib_only else sources.installed_distributions()
    items = [*sources.stdlib_sources(), *sources.package_sources(distributions)]
    print(f"{len(items)} readable files; cleaning")
    build(items, args.out, args.vocab_size, args.heldout_every, args.tokenizer_sample_mb,
          distributions)  # fmt: skip


def build(
    items: list[sources.Source],
    out: Path,
    vocab_size: int = 8192,
    heldout_every: int = HELDOUT_EVERY,
    tokenizer_sample_mb: float = 40.0,
    distributions: list[sources.Distribution] = (),
) -> dict:
    """Clean, split, train the tokenizer and write everything under ``out``; returns the
    manifest."""
    kept, removed, redacted = clean(items)
    train = [s for s in kept if not is_heldout(s.path, heldout_every)]
    heldout = [s for s in kept if is_heldout(s.path, heldout_every)]
    if not train or not heldout:
        raise ValueError(
            f"{len(kept)} files passed the filters: {len(train)} train, {len(heldout)} held "
            f"out (heldout_every={heldout_every}); both splits need files"
        )
    write_atomic(out / "train.jsonl", jsonl(train))
    write_atomic(out / "heldout.jsonl", jsonl(heldout))
    removed_lines = "".join(json.dumps(r) + "\n" for r in removed)
    write_atomic(out / "removed.jsonl", removed_lines.encode())

    print(f"training the tokenizer on {tokenizer_sample_mb} MB of {len(train)} files")
    sample = tokenizer_sample([s.text for s in train], int(tokenizer_sample_mb * 1e6))
    model = train_tokenizer(sample, vocab_size)
    write_atomic(out / "tokenizer.model", model)

    sp = spm.SentencePieceProcessor(model_proto=model)
    lengths = sp.encode([s.text for s in kept], num_threads=os.cpu_count() or 1)
    token_counts = {s.path: len(ids) + 1 for s, ids in zip(kept, lengths)}  # + BOS
    result = manifest(
        train, heldout, token_counts, removed, redacted, distributions, heldout_every, vocab_size
    )
    write_atomic(out / "manifest.json", (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps({k: result[k] for k in ("totals", "removed", "redacted")}, indent=2))
    return result


if __name__ == "__main__":
    main()
