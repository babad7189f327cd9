"""CPU decode tokens/s per weight format, against the machine's memory bandwidth.

Batch-1 decode on a CPU reads every active weight once per token, so its ceiling is
(memory bandwidth) / (active weight bytes per token). For a ~110M DeepSeek-V3-shaped
random model and a llama-shaped one of about the same size, each saved once and loaded
through ``ds_model.from_pretrained(dtype=..., quantization=...)`` (the path ds-serve's
``--quantization`` takes), this measures greedy ``generate`` decode tokens/s for fp32,
bf16, INT8 weight-only, INT4 g128 (and, with ``--reference``, INT8 / INT4 forced onto
ds-quant's dequantize-then-matmul reference), at each ``--batch``:

- decode time = generate(1 + N tokens) - generate(1 token), so the prefill cancels;
  formats run interleaved in every repeat; medians over ``--repeats``.
- active weight bytes per token: every linear layer's stored bytes (weights, scales,
  bias) except the routed experts, of which a token reads ``top_k / n_routed``; the
  router; not the embedding (one row).
- copy bandwidth: a 256 MiB tensor copy in the same run (bytes read + written / s);
  "achieved" = active bytes x batch-1 tokens/s, and its share of the copy bandwidth.
- linears: one pass over the layers a token's step runs (routed experts: ``top_k`` of
  them), on random inputs, without the step's glue (attention, routing, norms,
  Python): the kernels' own time, rate and share of the copy bandwidth.
- ``--compile``: each format again, loaded a second time and decoded with
  ``generate(..., compile=True)`` (the fixed-shape step through ``torch.compile``),
  interleaved with the eager rows in every repeat; compiled once per batch size before
  timing (the compile time is printed, not timed). Those rows' "vs fp32" is against
  fp32 eager and "vs fp32 compiled" against fp32 compiled.

Run (one thread, as decode on a shared host):

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-model/benchmarks/bench_cpu_decode.py

With ``--llama-cpp PYTHON --llama-cpp-converter convert_hf_to_gguf.py``, the
llama-shaped checkpoint is also converted by llama.cpp's own converter and decoded by
llama.cpp (F32, BF16, Q8_0, Q4_0; one thread) in a subprocess of PYTHON, interleaved
with ds-model's formats, in a second batch-1 table (see llama_cpp_peer.py); "active
MB" is there every GGUF tensor but the token embedding.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
from pathlib import Path

import llama_cpp_peer
import torch
from bench_generate import SHAPES as GENERATE_SHAPES
from torch import nn

# bench_generate.py's 100M V3 shape with top-2 routing, DeepSeek-V3's gate and a longer
# context.
SHAPES = {
    "v3-110M": {
        **GENERATE_SHAPES["v3-100M"],
        "model_type": "deepseek_v3",
        "num_experts_per_tok": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "max_position_embeddings": 1024,
    },
    "llama-134M": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 1024,
    },
}

# name -> (dtype, quantization, force the reference kernels)
FORMATS = {
    "fp32": ("float32", None, False),
    "bf16": ("bfloat16", None, False),
    "int8": ("float32", "int8", False),
    "int4": ("float32", "int4", False),
    # The same weights with bfloat16 activations throughout (the CPU ops compute in
    # bf16 either way; this drops the layers' casts and runs the rest of the step in bf16).
    "int8 bf16": ("bfloat16", "int8", False),
    "int4 bf16": ("bfloat16", "int4", False),
    "int8 reference": ("float32", "int8", True),
    "int4 reference": ("float32", "int4", True),
}


def machine() -> str:
    model = "unknown CPU"
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"{model} ({platform.machine()}, {'+'.join(isa) or 'no AVX'}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )


def copy_bandwidth(repeats: int = 7) -> float:
    """Bytes read + written per second copying a 256 MiB tensor (median)."""
    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def active_bytes(model: nn.Module) -> int:
    """Weight bytes one token's decode step reads (see module doc)."""
    config = model.config
    routed_share = 1.0
    if config.n_routed_experts:
        routed_share = config.num_experts_per_tok / config.n_routed_experts
    total = 0.0
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or hasattr(module, "dequantize")):
            if not name.endswith(".gate") or not hasattr(module, "top_k"):
                continue
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        size = sum(t.numel() * t.element_size() for t in tensors)
        total += size * (routed_share if ".experts." in name else 1.0)
    return int(total)


def active_linears(model: nn.Module) -> list[nn.Module]:
    """The linear layers one token's decode step runs: all but the routed experts, and
    ``top_k`` of those per MoE layer."""
    config = model.config
    top_k = config.num_experts_per_tok or 0
    layers = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or hasattr(module, "dequantize")):
            continue
        parts = name.split(".")
        if "experts" in parts and int(parts[parts.index("experts") + 1]) >= top_k:
            continue
        layers.append(module)
    return layers


def linears_seconds(layers: list[nn.Module], dtype: torch.dtype, batch: int) -> float:
    """One pass over ``layers`` with fresh (batch, in_features) inputs: the weight-reading
    part of a decode step without its glue (attention, routing, norms, Python), each
    layer called as the eager step calls it (``ds_model.mlp.project``)."""
    from ds_model.mlp import project

    inputs = [torch.randn(batch, m.in_features, dtype=dtype) for m in layers]
    with torch.inference_mode():
        start = time.perf_counter()
        for module, x in zip(layers, inputs, strict=True):
            project(module, x)
        return time.perf_counter() - start


def llama_cpp_rows(
    worker: llama_cpp_peer.Worker,
    seconds: dict[str, list[float]],
    tokens: int,
    base_tps: float,
    bandwidth: float,
) -> None:
    """The batch-1 table of the llama.cpp formats, measured in the same repeats as the
    table above it ("vs fp32": against ds-model's first format)."""
    print("\n| weights | active MB/token | tokens/s | vs fp32 | achieved GB/s | of copy bw |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, times in seconds.items():
        tps = tokens / statistics.median(times)
        achieved = worker.bytes[name] * tps
        print(
            f"| {name} | {worker.bytes[name] / 1e6:.1f} | {tps:.1f} | {tps / base_tps:.2f}x "
            f"| {achieved / 1e9:.1f} | {100 * achieved / bandwidth:.0f}% |"
        )


def load(path: str, fmt: str) -> nn.Module:
    import ds_model

    dtype, quantization, reference = FORMATS[fmt]
    model = ds_model.from_pretrained(path, dtype=dtype, quantization=quantization)
    model.config = dataclasses.replace(model.config, eos_token_id=None)
    model.tokenizer = None
    if reference:
        for module in model.modules():
            if hasattr(module, "backend"):
                module.backend = "reference"
    return model


def decode_seconds(
    model: nn.Module, ids: torch.Tensor, new_tokens: int, compile: bool = False
) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, 1, compile=compile)
        one = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, 1 + new_tokens, compile=compile)
        return time.perf_counter() - start - one


COMPILED = " compiled"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--formats", nargs="+", default=["fp32", "bf16", "int8", "int4"])
    parser.add_argument("--reference", action="store_true", help="add reference-kernel rows")
    parser.add_argument(
        "--llama-cpp",
        metavar="PYTHON",
        help="an interpreter with llama-cpp-python and gguf: add llama.cpp rows "
        "to the llama-shaped batch-1 table",
    )
    parser.add_argument(
        "--llama-cpp-converter",
        metavar="PATH",
        help="llama.cpp's convert_hf_to_gguf.py (for --llama-cpp)",
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--min-capacity",
        type=int,
        default=None,
        help="the compiled step's smallest cache (ds_model.cuda_graph.MIN_CAPACITY)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="add generate(compile=True) rows per format"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    formats = list(args.formats)
    if args.reference:
        formats += [f"{f} reference" for f in ("int8", "int4") if f in formats]
    for fmt in formats:
        if fmt not in FORMATS:
            parser.error(f"--formats: {fmt!r} is not one of {sorted(FORMATS)}")
    if args.compile:
        formats += [fmt + COMPILED for fmt in formats]
        # One compiled step per model and batch size, all of GraphedDecoder._forward:
        # more than dynamo's default of 8 per function in this one process.
        torch._dynamo.config.recompile_limit = 64
    if args.min_capacity is not None:
        import ds_model.cuda_graph

        ds_model.cuda_graph.MIN_CAPACITY = args.min_capacity
    import ds_model

    print(f"machine: {machine()}")
    if args.llama_cpp_converter and not args.llama_cpp:
        parser.error("--llama-cpp-converter is used only with --llama-cpp PYTHON")
    if args.llama_cpp:
        version = llama_cpp_peer.check(args.llama_cpp, args.llama_cpp_converter)
        print(f"llama-cpp-python {version} (one thread)")
    bandwidths = [copy_bandwidth()]
    for shape in args.shapes:
        worker = gguf_dir = None
        with tempfile.TemporaryDirectory() as path:
            base = ds_model.from_config(dict(SHAPES[shape]), dtype=torch.float32, seed=0)
            params = sum(p.numel() for p in base.parameters())
            base.save_pretrained(path)
            if args.llama_cpp and SHAPES[shape]["model_type"] == "llama":
                gguf_dir = tempfile.TemporaryDirectory()
                ggufs = llama_cpp_peer.convert(
                    args.llama_cpp, args.llama_cpp_converter, Path(path), Path(gguf_dir.name)
                )
                worker = llama_cpp_peer.Worker(args.llama_cpp, ggufs)
            del base
            models = {fmt: load(path, fmt.removesuffix(COMPILED)) for fmt in formats}
        vocab = SHAPES[shape]["vocab_size"]
        for batch in args.batches:
            ids = torch.randint(
                3, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch)
            )
            for fmt, model in models.items():
                start = time.perf_counter()
                # warm-up: first-call caches, allocator; compiling the step
                decode_seconds(model, ids, 2, fmt.endswith(COMPILED))
                if fmt.endswith(COMPILED):
                    print(
                        f"{shape} batch {batch} {fmt}: compiled in "
                        f"{time.perf_counter() - start:.1f} s"
                    )
            times: dict[str, list[float]] = {fmt: [] for fmt in formats}
            kernel_times: dict[str, list[float]] = {fmt: [] for fmt in formats}
            layers = {fmt: active_linears(model) for fmt, model in models.items()}
            llama_times: dict[str, list[float]] = {}
            if worker is not None and batch == 1:
                with torch.inference_mode():
                    ours = torch.as_tensor(models[formats[0]].generate(ids, args.tokens))
                theirs = worker.decode(ids[0].tolist(), args.tokens)["generated"]
                same = sum(a == b for a, b in zip(ours.view(-1).tolist(), theirs["llama.cpp F32"]))
                print(
                    f"greedy tokens: llama.cpp F32 equals ds-model {formats[0]} at "
                    f"{same} of {args.tokens} positions"
                )
                llama_times = {name: [] for name in theirs}
            for _ in range(args.repeats):
                for fmt, model in models.items():
                    compiled = fmt.endswith(COMPILED)
                    times[fmt].append(decode_seconds(model, ids, args.tokens, compiled))
                    if compiled:  # the same layers as the eager row's (not re-timed)
                        continue
                    dtype = next(model.model.norm.parameters()).dtype
                    kernel_times[fmt].append(
                        statistics.median(
                            linears_seconds(layers[fmt], dtype, batch) for _ in range(5)
                        )
                    )
                if llama_times:
                    reply = worker.decode(ids[0].tolist(), args.tokens)["seconds"]
                    for name, seconds in reply.items():
                        llama_times[name].append(seconds)
                bandwidths.append(copy_bandwidth(3))
            bandwidth = statistics.median(bandwidths)
            print(
                f"\n### {shape} ({params / 1e6:.0f}M parameters), batch {batch}, "
                f"{args.tokens} new tokens, median of {args.repeats}; "
                f"copy bandwidth {bandwidth / 1e9:.1f} GB/s\n"
            )
            compiled_column = " vs fp32 compiled |" if args.compile else ""
            print(
                "| weights | active MB/token | tokens/s | vs fp32 |"
                + compiled_column
                + " achieved GB/s | of copy bw "
                "| linears ms | linears vs fp32 | linears GB/s (of copy bw) |"
            )
            print(
                "|---|---:|---:|---:|"
                + "---:|" * bool(compiled_column)
                + "---:|---:|---:|---:|---:|"
            )
            base_tps = base_kernel = base_compiled = None
            for fmt in formats:
                tps = batch * args.tokens / statistics.median(times[fmt])
                if fmt.endswith(COMPILED):
                    base_compiled = base_compiled or tps
                    kernel_times[fmt] = kernel_times[fmt.removesuffix(COMPILED)]
                kernel = statistics.median(kernel_times[fmt])
                base_tps, base_kernel = base_tps or tps, base_kernel or kernel
                nbytes = active_bytes(models[fmt])
                if batch == 1:
                    achieved = nbytes * tps
                    share = f"{achieved / 1e9:.1f} | {100 * achieved / bandwidth:.0f}%"
                    rate = nbytes / kernel
                    kernel_share = f"{rate / 1e9:.1f} ({100 * rate / bandwidth:.0f}%)"
                else:
                    share, kernel_share = "- | -", "-"  # a batch reads more experts
                if compiled_column:
                    versus = f" {tps / base_compiled:.2f}x |" if base_compiled else " - |"
                else:
                    versus = ""
                print(
                    f"| {fmt} | {nbytes / 1e6:.1f} | {tps:.1f} | {tps / base_tps:.2f}x |{versus} {share} "
                    f"| {1e3 * kernel:.2f} | {base_kernel / kernel:.2f}x | {kernel_share} |"
                )
            if llama_times:
                llama_cpp_rows(worker, llama_times, args.tokens, base_tps, bandwidth)
        if worker is not None:
            worker.close()
            gguf_dir.cleanup()


if __name__ == "__main__":
    main()
