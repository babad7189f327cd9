"""Prompt scoring throughput: requests/s of a loglikelihood workload (lm-eval's request
shape: ``echo`` + ``logprobs``, here with ``max_tokens`` 0 and 1) versus the same
prompts as plain one-token completions, through one ds-serve process in the same run.

Every request's prompt is unique (a per-round, per-mode prefix), so no mode profits
from the prefix cache: scoring requests skip it by design (they need every prompt
position's logits), and the comparison measures the extra work of scoring: the
lm_head over every prompt position, the log-softmax and the token texts.

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-serve/benchmarks/bench_loglikelihood.py

Modes run interleaved, ``--repeats`` times; medians and ratios to the plain mode.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import build_checkpoint, free_port, prompts, start_server

MODES = {
    "plain completion (max_tokens 1)": {"max_tokens": 1},
    "score (echo, logprobs 1, max_tokens 0)": {"max_tokens": 0, "echo": True, "logprobs": 1},
    "lm-eval shape (echo, logprobs 1, max_tokens 1)": {
        "max_tokens": 1,
        "echo": True,
        "logprobs": 1,
    },
}


async def run_mode(url: str, prompt_list: list[str], body: dict, clients: int) -> float:
    import httpx

    queue = list(prompt_list)
    async with httpx.AsyncClient(timeout=600) as client:

        async def worker():
            while queue:
                prompt = queue.pop()
                r = await client.post(
                    url + "/v1/completions", json={"prompt": prompt, "temperature": 0, **body}
                )
                r.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return len(prompt_list) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import ds_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v3-tiny"
        build_checkpoint(path)
        tokenizer = ds_model.load_tokenizer(path)
        base = prompts(tokenizer, args.requests, args.prompt_len)
        port = free_port()
        proc = start_server(path, port, args.threads, args.device)
        url = f"http://127.0.0.1:{port}"
        try:
            rates: dict[str, list[float]] = {m: [] for m in MODES}
            # One warm-up round, then interleaved measured rounds.
            for rnd in range(args.repeats + 1):
                order = list(MODES) if rnd % 2 else list(reversed(MODES))
                for mode in order:
                    unique = [f"{rnd}-{list(MODES).index(mode)}: {p}" for p in base]
                    rate = asyncio.run(run_mode(url, unique, MODES[mode], args.clients))
                    if rnd:
                        rates[mode].append(rate)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    plain = statistics.median(rates[next(iter(MODES))])
    print(
        f"# {platform.processor() or platform.machine()}, {args.requests} prompts of "
        f"~{args.prompt_len} tokens, {args.clients} concurrent clients, "
        f"{args.repeats} repeats, threads={args.threads}, device={args.device}"
    )
    print("| mode | requests/s (median) | vs plain |")
    print("|---|---:|---:|")
    for mode, values in rates.items():
        median = statistics.median(values)
        print(f"| {mode} | {median:.1f} | {median / plain:.2f}x |")


if __name__ == "__main__":
    main()
