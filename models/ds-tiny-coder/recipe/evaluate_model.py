"""Step 6 of the ds-tiny-coder recipe: the figures in the model card.

    uv run python models/ds-tiny-coder/recipe/evaluate_model.py [--model DIR] [--heldout FILE]

- held-out loss (nats/token) and bits per byte on Python files the model never trained on
  (``--heldout``: JSON lines with a ``text`` field; default the shipped held-out sample;
  with ``--packages-only``, the files of installed packages between 2,000 and 12,000
  characters: the first edition trained on the standard library alone, so on the
  held-out split of ``prepare.py`` these are unseen by both editions).
  Bits per byte divide the summed loss by the texts' UTF-8 bytes, so models with
  different tokenizers compare on the same scale.
- pass@1 on the function-completion problems of ``eval_problems.py``: greedy completions
  requested from ``ds-serve`` (started here on a free local port) through its OpenAI
  completions API, each run with the problem's asserts in a separate, isolated Python
  process with a time limit (model output is untrusted code).

``--json PATH`` writes the per-problem results; ``--skip-serve`` computes the loss only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ds_model
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_problems import PROBLEMS

MODEL_DIR = Path(__file__).resolve().parents[1]
# Where a completion of one function ends: the next top-level statement.
STOP = ["\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\nassert "]
MAX_TOKENS = 96
RUN_TIMEOUT_S = 10
CONCURRENT_REQUESTS = 8


@torch.inference_mode()
def heldout_bits_per_byte(model, tokenizer, texts: list[str], seq_len: int = 256):
    """(nats per token, bits per byte, tokens): every token after BOS is scored once, in
    non-overlapping windows of seq_len as training saw them."""
    nats, tokens, size = 0.0, 0, 0
    for text in texts:
        ids = tokenizer.encode(text)
        size += len(text.encode("utf-8"))
        for start in range(0, len(ids) - 1, seq_len):
            window = torch.tensor([ids[start : start + seq_len + 1]])
            if window.shape[1] < 2:
                continue
            logits = model(window[:, :-1]).logits.float()
            nats += torch.nn.functional.cross_entropy(
                logits[0], window[0, 1:], reduction="sum"
            ).item()
            tokens += window.shape[1] - 1
    return nats / tokens, nats / math.log(2) / size, tokens


def passes(program: str) -> bool:
    """Whether the program exits cleanly within the time limit, run by `python -I` in an
    empty temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidate.py"
        path.write_text(program)
        try:
            done = subprocess.run(
                [sys.executable, "-I", str(path)],
                cwd=tmp,
                capture_output=True,
                timeout=RUN_TIMEOUT_S,
                env={"PATH": os.environ.get("PATH", "")},
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def running_server(args: list[str], **popen_options) -> Iterator[str]:
    """`ds-serve ARGS` on a free local port: yields its base URL once /health answers and
    stops it on exit (SIGTERM, then SIGKILL after 30 s). ``popen_options`` (``cwd``,
    ``env``) go to ``subprocess.Popen``."""
    port = _free_port()
    command = [str(Path(sys.executable).parent / "ds-serve"), *args, "--port", str(port)]
    # The server's log goes to a file: an unread pipe would fill and stall the server.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=log, text=True, **popen_options
        )
        try:
            yield _wait_healthy(proc, f"http://127.0.0.1:{port}", log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_healthy(proc: subprocess.Popen, base: str, log) -> str:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"ds-serve exited with {proc.returncode}: {log.read()}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return base
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise RuntimeError("ds-serve did not become healthy within 180 s")


def pass_at_1(model: Path) -> list[dict]:
    """One greedy completion per problem through ds-serve, scored by its asserts."""
    with running_server([str(model)]) as base:
        [served] = _get(f"{base}/v1/models")["data"]

        def complete(problem: dict) -> dict:
            body = {
                "model": served["id"],
                "prompt": problem["prompt"],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "stop": STOP,
            }
            completion = _post(f"{base}/v1/completions", body)["choices"][0]["text"]
            program = problem["prompt"] + completion + "\n\n" + problem["tests"] + "\n"
            return {"name": problem["name"], "completion": completion, "passed": passes(program)}

        # Concurrent requests: the server batches them; greedy decoding makes each
        # completion independent of what it is batched with.
        with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
            return list(pool.map(complete, PROBLEMS))


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--heldout", type=Path, default=MODEL_DIR / "heldout-sample.jsonl")
    parser.add_argument(
        "--packages-only", action="store_true", help="score held-out files of packages only"
    )
    parser.add_argument("--json", type=Path, help="write per-problem results here")
    parser.add_argument("--skip-serve", action="store_true", help="held-out figures only")
    args = parser.parse_args(argv)

    model = ds_model.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = ds_model.load_tokenizer(args.model)
    lines = args.heldout.read_text().splitlines()
    records = [json.loads(line) for line in lines if line]
    if args.packages_only:
        records = [r for r in records if r.get("package") != "python-stdlib"]
        records = [r for r in records if 2_000 <= len(r["text"]) <= 12_000]
    texts = [r["text"] for r in records]
    loss, bpb, tokens = heldout_bits_per_byte(model, tokenizer, texts)
    print(
        f"held-out: {len(texts)} files, {tokens} tokens, {loss:.4f} nats/token, {bpb:.4f} bits/byte"
    )
    report = {"heldout_loss": loss, "bits_per_byte": bpb, "heldout_tokens": tokens}
    if not args.skip_serve:
        results = pass_at_1(args.model)
        solved = [r["name"] for r in results if r["passed"]]
        print(f"pass@1 (greedy, through ds-serve): {len(solved)}/{len(results)}")
        print("solved:", ", ".join(solved) or "none")
        report["pass_at_1"] = len(solved) / len(results)
        report["problems"] = results
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
