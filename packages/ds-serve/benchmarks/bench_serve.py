"""Serving throughput and latency: ds-serve at 1/8/32/64 concurrent streaming clients,
versus sequential ``ds_model.generate`` and transformers ``generate`` one request at a
time, on the same random DeepSeek-V3-shaped checkpoint in the same run.

The server runs as a subprocess (``python -m ds_serve.cli``) so that clients and engine
do not share a GIL; clients are asyncio + httpx streams. Per level: output tokens/s
(completion tokens from ``usage`` over wall time), time to first token p50/p99 and
inter-token latency p50/p99 (gaps between streamed chunks). Greedy decoding everywhere,
so every mode does the same work. Each figure is the median of ``--repeats`` runs.

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-serve/benchmarks/bench_serve.py

``--compile`` serves with compiled decode steps and adds ``generate(compile=True)`` to
the sequential baselines; ``--in-process`` also drives the same engine in this process
without HTTP after each server run (the HTTP/SSE overhead column);
``--no-transformers`` skips that baseline; ``--stream-interval k`` is passed to the server
(k tokens per streamed event; the ITL columns then measure gaps between events).

Every process uses ``--threads`` torch threads (default 1: on a shared 2-core machine,
more threads per process spin against each other).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

SHAPE = {  # ~6M parameters, V3-shaped (MLA + DeepSeekMoE)
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "q_lora_rank": 128,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 16,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
}


def build_checkpoint(path: Path) -> None:
    """Random V3 weights via transformers, saved; a SentencePiece BPE trained on local
    standard-library source (nothing downloaded)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        **SHAPE, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2
    )
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    model.save_pretrained(path)
    write_stdlib_tokenizer(path, SHAPE["vocab_size"])


def write_stdlib_tokenizer(path: Path, vocab_size: int) -> None:
    """A SentencePiece BPE of ``vocab_size`` pieces trained on local standard-library
    source (nothing downloaded), written beside a checkpoint."""
    import sentencepiece as spm

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = []
    for name in ["argparse.py", "json/decoder.py", "textwrap.py", "difflib.py", "ast.py"]:
        lines += (stdlib / name).read_text().splitlines()
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    (path / "tokenizer.model").write_bytes(buffer.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))


def prompts(tokenizer, count: int, length: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    words = stdlib.read_text().split()
    out = []
    for i in range(count):
        text = " ".join(words[i * 7 : i * 7 + length])
        ids = tokenizer.encode(text)[:length]
        out.append(tokenizer.decode(ids))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    path: Path, port: int, threads: int, device: str, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        "-m",
        "ds_serve.cli",
        str(path),
        "--port",
        str(port),
        "--max-num-seqs",
        "64",
        "--max-num-batched-tokens",
        "2048",
        "--max-waiting",
        "512",
        "--kv-cache-memory",
        "256MiB",
        "--dtype",
        "float32",
        "--device",
        device,
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(cmd, env=env)
    import httpx

    # Compiled decode steps are built before the server listens: minutes on a small CPU.
    deadline = time.monotonic() + (900 if "--compile" in extra else 120)
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("ds-serve did not come up")


async def one_request(client, url, prompt, max_tokens, stats, model=None):
    body = {
        **({"model": model} if model else {}),
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk["choices"] and chunk["choices"][0]["text"]:
                if last is None:
                    stats["ttft"].append(now - start)
                else:
                    stats["itl"].append(now - last)
                last = now
            if chunk.get("usage"):
                stats["tokens"] += chunk["usage"]["completion_tokens"]


async def run_level(url, prompt_list, clients, per_client, max_tokens, models=(None,)):
    """Output tokens/s, TTFTs and ITLs of ``clients`` concurrent streams, each sending
    ``per_client`` requests; request ``k`` goes to ``models[k % len(models)]``."""
    import httpx

    stats = {"ttft": [], "itl": [], "tokens": 0}
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker(c):
            for r in range(per_client):
                k = c * per_client + r
                prompt = prompt_list[k % len(prompt_list)]
                await one_request(client, url, prompt, max_tokens, stats, models[k % len(models)])

        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - start
    return stats["tokens"] / wall, stats["ttft"], stats["itl"]


async def engine_level(engine, prompt_ids, clients, per_client, max_tokens):
    """Output tokens/s of the in-process engine (no HTTP) under the same load as
    ``run_level``: ``clients`` concurrent streams, ``per_client`` requests each."""
    from ds_serve import SamplingParams

    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, stop_token_ids=engine.eos_token_ids
    )
    tokens = 0

    async def worker(c):
        nonlocal tokens
        for r in range(per_client):
            k = c * per_client + r
            request_id = engine.submit(prompt_ids[k % len(prompt_ids)], params)
            async for delta in engine.stream(request_id):
                tokens += len(delta.token_ids)

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in range(clients)))
    return tokens / (time.perf_counter() - start)


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def sequential_ds_model(path, prompt_list, max_tokens, device, compile=False):
    import ds_model

    model = ds_model.from_pretrained(path, dtype="float32", device=device)
    ids = [model.tokenizer.encode(p) for p in prompt_list]
    ds_model.generate(model, ids[0], max_new_tokens=4, compile=compile)  # warm-up
    start, tokens = time.perf_counter(), 0
    for row in ids:
        tokens += len(ds_model.generate(model, row, max_new_tokens=max_tokens, compile=compile))
    return tokens / (time.perf_counter() - start)


def sequential_transformers(path, prompt_list, max_tokens, tokenizer, device):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = model.to(device).eval()
    ids = [torch.tensor([tokenizer.encode(p)], device=device) for p in prompt_list]
    with torch.inference_mode():
        model.generate(ids[0], max_new_tokens=4, do_sample=False)
        start, tokens = time.perf_counter(), 0
        for row in ids:
            out = model.generate(
                row, max_new_tokens=max_tokens, do_sample=False, attention_mask=torch.ones_like(row)
            )
            tokens += out.shape[1] - row.shape[1]
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="1,8,32,64")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-requests", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for every mode")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="serve with --compile (and run the in-process engine so); the sequential "
        "baselines add generate(compile=True)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="also the same engine in this process without HTTP, alternating with the "
        "server at each level: the HTTP/SSE overhead",
    )
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument(
        "--stream-interval", type=int, default=1, help="the server's --stream-interval"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]

    import ds_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-v3"
        build_checkpoint(path)
        tokenizer = ds_model.Tokenizer.from_dir(path)
        prompt_list = prompts(tokenizer, 128, args.prompt_len)
        prompt_ids = [tokenizer.encode(p) for p in prompt_list]
        base = prompt_list[: args.baseline_requests]
        ds_tps = statistics.median(
            sequential_ds_model(path, base, args.max_tokens, args.device)
            for _ in range(args.repeats)
        )
        compiled_tps = None
        if args.compile:
            compiled_tps = statistics.median(
                sequential_ds_model(path, base, args.max_tokens, args.device, compile=True)
                for _ in range(args.repeats)
            )
        hf_tps = None
        if not args.no_transformers:
            hf_tps = statistics.median(
                sequential_transformers(path, base, args.max_tokens, tokenizer, args.device)
                for _ in range(args.repeats)
            )
        engine = None
        if args.in_process:
            from ds_serve import build_engine

            engine = build_engine(
                path,
                max_num_seqs=64,
                max_num_batched_tokens=2048,
                max_waiting=512,
                kv_cache_memory=256 << 20,
                dtype="float32",
                device=args.device,
                decode_steps="compile" if args.compile else None,
            )
        port = free_port()
        extra = ("--compile",) if args.compile else ()
        extra += ("--stream-interval", str(args.stream_interval))
        server = start_server(path, port, args.threads, args.device, extra)
        url = f"http://127.0.0.1:{port}"
        try:
            rows = asyncio.run(measure(args, levels, url, prompt_list, prompt_ids, engine))
        finally:
            server.terminate()
            server.wait(timeout=60)
            if engine is not None:
                engine.shutdown()

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} thread(s) per process, {device_name}"
    )
    print(
        f"model: random DeepSeek-V3-shaped ({SHAPE['hidden_size']} hidden, "
        f"{SHAPE['num_hidden_layers']} layers, {SHAPE['n_routed_experts']} experts), fp32; "
        f"prompts ~{args.prompt_len} tokens, {args.max_tokens} output tokens, greedy; "
        f"decode steps {'compiled' if args.compile else 'eager'}; median of {args.repeats}\n"
    )
    print(f"sequential ds_model.generate: {ds_tps:.1f} output tokens/s")
    if compiled_tps is not None:
        print(f"sequential ds_model.generate(compile=True): {compiled_tps:.1f} output tokens/s")
    if hf_tps is not None:
        print(f"sequential transformers generate: {hf_tps:.1f} output tokens/s")
    print(
        "\n| clients | output tok/s | vs ds-model seq | vs generate(compile=True) seq "
        "| vs transformers seq | in-process engine tok/s | HTTP overhead | TTFT p50 (ms) "
        "| TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for clients, tps, inproc, t50, t99, i50, i99 in rows:
        vs_compiled = f"{tps / compiled_tps:.2f}x" if compiled_tps else ""
        vs_hf = f"{tps / hf_tps:.2f}x" if hf_tps else ""
        engine_tps = f"{inproc:.1f}" if inproc else ""
        overhead = f"{1 - tps / inproc:.0%}" if inproc else ""
        print(
            f"| {clients} | {tps:.1f} | {tps / ds_tps:.2f}x | {vs_compiled} | {vs_hf} | "
            f"{engine_tps} | {overhead} | {t50 * 1e3:.0f} | {t99 * 1e3:.0f} | "
            f"{i50 * 1e3:.1f} | {i99 * 1e3:.1f} |"
        )


async def measure(args, levels, url, prompt_list, prompt_ids, engine):
    """Per level: the server's runs, each followed by the in-process engine's (if any)."""
    await run_level(url, prompt_list, 2, 1, 8)  # warm-up
    if engine is not None:
        engine.start(asyncio.get_running_loop())
        await engine_level(engine, prompt_ids, 2, 1, 8)
    rows = []
    for clients in levels:
        per_client = max(1, 8 // clients) if clients < 8 else 2
        runs, inproc = [], []
        for _ in range(args.repeats):
            runs.append(await run_level(url, prompt_list, clients, per_client, args.max_tokens))
            if engine is not None:
                inproc.append(
                    await engine_level(engine, prompt_ids, clients, per_client, args.max_tokens)
                )
        tps = statistics.median(r[0] for r in runs)
        ttft = [t for r in runs for t in r[1]]
        itl = [t for r in runs for t in r[2]]
        engine_tps = statistics.median(inproc) if inproc else None
        rows.append(
            (clients, tps, engine_tps, pct(ttft, 50), pct(ttft, 99), pct(itl, 50), pct(itl, 99))
        )
    return rows


if __name__ == "__main__":
    main()
