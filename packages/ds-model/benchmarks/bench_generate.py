"""Decode and prefill throughput: ds-model vs transformers ``generate``, same weights, same run.

For each model shape, a random DeepSeek-V3-shaped transformers model is built, saved,
and loaded by ds-model; both then generate greedily from the same prompts:

- decode tokens/s at batch 1 and 8: (generate N tokens - generate 1 token) time,
  so the prefill is subtracted out; ``batch x (N - 1)`` tokens over that time.
- prefill tokens/s: a prompt of ``--prefill-len`` tokens with ``max_new_tokens=1``.

``--model PATH`` adds a real checkpoint (e.g. the shipped ``models/ds-tiny-coder``),
loaded by both libraries in float32; neither stops at EOS (transformers through
``min_new_tokens``, ds-model with its EOS ids cleared), so both generate every token.

Each figure is the median of ``--repeats`` runs. Also prints KV-cache bytes per token
of MLA against multi-head attention of the same size. Run:

    uv run --frozen python packages/ds-model/benchmarks/bench_generate.py [--threads 1] \
        [--model models/ds-tiny-coder] [--compile]

``--compile`` adds decode rows where ds-model runs ``generate(compile=True)``: its
fixed-shape decode step through torch.compile (the compile is in the untimed warm-up).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch

SHAPES = {
    # ~14M parameters: the default model's scale.
    "v3-14M": {
        "vocab_size": 16384,
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
    },
    # ~100M parameters.
    "v3-100M": {
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "q_lora_rank": 192,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "n_routed_experts": 24,
        "num_experts_per_tok": 4,
        "n_shared_experts": 1,
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 1,
    },
}


def build(shape: str, path: str):
    import ds_model
    import transformers

    config = transformers.DeepseekV3Config(
        **SHAPES[shape],
        max_position_embeddings=2048,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(path)
    ours = ds_model.from_pretrained(path, dtype=torch.float32)
    return hf, ours


def load(path: str):
    """A checkpoint directory in both libraries, float32, ds-model without EOS stops."""
    import dataclasses

    import ds_model
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = ds_model.from_pretrained(path, dtype=torch.float32)
    ours.config = dataclasses.replace(ours.config, eos_token_id=None)
    ours.tokenizer = None  # ids in, ids out; its EOS id would stop generation early
    return hf, ours


def timed_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Median seconds of two functions, run alternately so load drift hits both alike."""
    fn_a()
    fn_b()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((fn_a, a), (fn_b, b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def hf_generate(hf, ids, n):
    with torch.inference_mode():
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )


def ours_generate(model, ids, n, compile=False):
    model.generate(ids, n, compile=compile)


def measure(hf, ours, args) -> list[tuple[str, float, float]]:
    vocab = ours.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch, compile in ((1, False), (8, False), *(((1, True), (8, True)) * args.compile)):
        ids = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen)
        n = args.new_tokens
        # The first (warm-up) call of a compiled run compiles; the timed ones reuse it.
        hf_full, ours_full = timed_pair(
            lambda ids=ids, n=n: hf_generate(hf, ids, n),
            lambda ids=ids, n=n, c=compile: ours_generate(ours, ids, n, c),
            args.repeats,
        )
        hf_one, ours_one = timed_pair(
            lambda ids=ids: hf_generate(hf, ids, 1),
            lambda ids=ids, c=compile: ours_generate(ours, ids, 1, c),
            args.repeats,
        )
        tokens = batch * (n - 1)
        rows.append(
            (
                f"decode tok/s, batch {batch}{', ds-model compile=True' if compile else ''}",
                tokens / max(hf_full - hf_one, 1e-9),
                tokens / max(ours_full - ours_one, 1e-9),
            )
        )
    ids = torch.randint(0, vocab, (1, args.prefill_len), generator=gen)
    hf_t, ours_t = timed_pair(
        lambda: hf_generate(hf, ids, 1), lambda: ours_generate(ours, ids, 1), args.repeats
    )
    rows.append(
        (
            f"prefill tok/s ({args.prefill_len} tokens)",
            args.prefill_len / hf_t,
            args.prefill_len / ours_t,
        )
    )
    return rows


def kv_rows(config) -> list[tuple[str, int]]:
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    mla = config.kv_cache_bytes_per_token(2)
    mha_same_hidden = 2 * config.hidden_size * layers * 2
    mha_same_heads = heads * (config.qk_head_dim + config.v_head_dim) * layers * 2
    return [
        ("MLA (latent + rope key)", mla),
        (f"MHA, {heads} heads x {config.hidden_size // heads} dims (same hidden)", mha_same_hidden),
        ("MHA with MLA's expanded per-head keys/values", mha_same_heads),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=65)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=None, help="also a real checkpoint directory")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also decode with generate(compile=True) (transformers stays eager)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import ds_model

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or '?'}; "
        f"torch {torch.__version__}, {args.threads} thread(s); fp32; median of {args.repeats}"
    )
    for shape in [*args.shapes, *([args.model] if args.model else [])]:
        with tempfile.TemporaryDirectory() as tmp:
            hf, ours = build(shape, tmp) if shape in SHAPES else load(shape)
            total, active = ds_model.parameter_counts(ours)
            print(
                f"\n### {shape}: {total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active per token\n"
            )
            print("| metric | transformers | ds-model | ratio |")
            print("| --- | ---: | ---: | ---: |")
            for name, theirs, mine in measure(hf, ours, args):
                print(f"| {name} | {theirs:.1f} | {mine:.1f} | {mine / theirs:.2f}x |")
            print("\n| KV cache, bf16, all layers | bytes per token |")
            print("| --- | ---: |")
            for name, value in kv_rows(ours.config):
                print(f"| {name} | {value:,} |")


if __name__ == "__main__":
    main()
