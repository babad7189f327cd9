"""Batch-1 decode on a GPU against the memory-bandwidth roofline (needs CUDA).

A random ~1B-parameter DeepSeek-V3-shaped model in bf16 decodes greedily; at batch 1
every step reads every active weight once, so the roofline is

    tokens/s <= bandwidth / (active parameter bytes + KV bytes read per token)

The script measures the device's achievable bandwidth with a large device-to-device
copy in the same run and prints decode tokens/s, the roofline, and the fraction, plus
transformers ``generate`` on the same weights for comparison. Goal: >= 60%.
ds-model runs twice: eager steps (``cuda_graph=False``) and the default, each step
replayed as one captured CUDA graph. ``--arch llama`` measures a dense ~1B DeepSeek
LLM-shaped (llama) model instead of the V3 MoE shape.

    uv run --frozen python packages/ds-model/benchmarks/bench_gpu_decode.py [--arch llama] \
        [--compile]

``--compile`` adds ``generate(compile=True)``: the step compiled (its warm-up call
compiles, untimed), then captured.

Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

SHAPE_1B = {
    "vocab_size": 32000,
    "hidden_size": 1536,
    "intermediate_size": 4096,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "q_lora_rank": 512,
    "kv_lora_rank": 256,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "n_routed_experts": 16,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
}


SHAPE_LLAMA_1B = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_hidden_layers": 18,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
}


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Achievable bytes/s: a device-to-device copy reads and writes ``nbytes`` each."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def decode_rate(fn, new_tokens: int) -> float:
    fn(2)
    torch.cuda.synchronize()
    times = {}
    for n in (1, new_tokens):
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn(n)
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        times[n] = statistics.median(samples)
    return (new_tokens - 1) / (times[new_tokens] - times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=129)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--arch", choices=["v3", "llama"], default="v3")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also generate(compile=True): compiled, then captured",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    import ds_model
    import transformers

    device = "cuda"
    if args.arch == "v3":
        config_cls, model_cls, shape = (
            transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, SHAPE_1B,
        )  # fmt: skip
    else:
        config_cls, model_cls, shape = (
            transformers.LlamaConfig, transformers.LlamaForCausalLM, SHAPE_LLAMA_1B,
        )  # fmt: skip
    config = config_cls(**shape, max_position_embeddings=4096, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    hf = model_cls(config).to(torch.bfloat16).eval()
    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf.save_pretrained(tmp)
        ours = ds_model.from_pretrained(tmp, dtype=torch.bfloat16, device=device)
    hf = hf.to(device)
    total, active = ds_model.parameter_counts(ours)
    ids = torch.randint(0, config.vocab_size, (1, args.prompt_len), device=device)

    def run_ours(n: int) -> None:
        ours.generate(ids, n)

    def run_eager(n: int) -> None:
        ours.generate(ids, n, cuda_graph=False)

    def run_compiled(n: int) -> None:
        ours.generate(ids, n, compile=True)

    def run_hf(n: int) -> None:
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    bandwidth = copy_bandwidth(device)
    context = args.prompt_len + args.new_tokens // 2
    bytes_per_token = active * 2 + ours.config.kv_cache_bytes_per_token(2) * context
    roofline = bandwidth / bytes_per_token
    mine = decode_rate(run_ours, args.new_tokens)
    eager = decode_rate(run_eager, args.new_tokens)
    theirs = decode_rate(run_hf, args.new_tokens)
    compiled = decode_rate(run_compiled, args.new_tokens) if args.compile else None
    print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__}); bf16; batch 1")
    print(f"{args.arch}: parameters {total / 1e9:.2f}B, active per token {active / 1e9:.2f}B")
    print("| metric | value |")
    print("| --- | ---: |")
    print(f"| copy bandwidth | {bandwidth / 1e9:.0f} GB/s |")
    print(f"| roofline decode | {roofline:.0f} tok/s |")
    print(f"| ds-model decode, CUDA graph | {mine:.0f} tok/s ({mine / roofline:.0%} of roofline) |")
    print(f"| ds-model decode, eager | {eager:.0f} tok/s ({eager / roofline:.0%} of roofline) |")
    if compiled is not None:
        print(
            f"| ds-model decode, compile=True + CUDA graph | {compiled:.0f} tok/s "
            f"({compiled / roofline:.0%} of roofline) |"
        )
    print(f"| transformers decode (eager) | {theirs:.0f} tok/s |")
    print(f"| ds-model CUDA graph / transformers | {mine / theirs:.2f}x |")


if __name__ == "__main__":
    main()
