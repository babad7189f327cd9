"""Shared pieces of the ds-serve benchmarks: the random DeepSeek-V3-shaped checkpoint
and its tokenizer, prompts, the ds-serve server subprocess and its streaming clients, the
same engine in this process, and percentiles.

Every served and in-process engine here runs with the same batching limits
(``MAX_NUM_SEQS`` ... ``KV_CACHE_MEMORY``), so that their figures compare.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import sysconfig
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
MAX_NUM_SEQS = 64
MAX_NUM_BATCHED_TOKENS = 2048
MAX_WAITING = 512
KV_CACHE_MEMORY = 256 << 20


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
    path: Path,
    port: int,
    threads: int,
    device: str,
    extra: tuple[str, ...] = (),
    ready_timeout: float | None = None,
) -> subprocess.Popen:
    """``python -m ds_serve.cli`` on ``path`` with this module's batching limits, once its
    /health answers; ``extra`` is appended to the command line. ``ready_timeout`` (s):
    default 120, or 900 with ``--compile`` (compiled decode steps are built before the
    server listens: minutes on a small CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        "-m",
        "ds_serve.cli",
        str(path),
        "--port",
        str(port),
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--max-num-batched-tokens",
        str(MAX_NUM_BATCHED_TOKENS),
        "--max-waiting",
        str(MAX_WAITING),
        "--kv-cache-memory",
        f"{KV_CACHE_MEMORY >> 20}MiB",
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

    if ready_timeout is None:
        ready_timeout = 900 if "--compile" in extra else 120
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("ds-serve did not come up")


def in_process_engine(path: Path, device: str, compiled: bool, **options):
    """The engine ``start_server`` serves, built in this process (no HTTP); ``compiled``:
    decode steps compiled per batch-size bucket. ``options`` go to ``build_engine``."""
    from ds_serve import build_engine

    return build_engine(
        path,
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        max_waiting=MAX_WAITING,
        kv_cache_memory=KV_CACHE_MEMORY,
        dtype="float32",
        device=device,
        decode_steps="compile" if compiled else None,
        **options,
    )


async def stream_all(
    engine, prompts: list[list[int]], max_tokens: int
) -> tuple[list[list[int]], float]:
    """All ``prompts`` submitted to the in-process engine at once, greedy, ``max_tokens``
    tokens each (EOS ignored): each request's tokens, and the wall time (s) from the
    first submission to the last token."""
    from ds_serve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    async def one(request_id: str) -> list[int]:
        tokens: list[int] = []
        async for delta in engine.stream(request_id):
            tokens.extend(delta.token_ids)
        return tokens

    start = time.perf_counter()
    ids = [engine.submit(prompt, params) for prompt in prompts]
    outputs = await asyncio.gather(*(one(i) for i in ids))
    return list(outputs), time.perf_counter() - start


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
