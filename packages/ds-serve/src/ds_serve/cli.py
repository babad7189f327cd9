"""``ds-serve [MODEL_PATH] [options]``: serve a model over the OpenAI API."""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main", "parse_args"]

API_KEY_ENV = "DS_SERVE_API_KEY"

_UNITS = {
    "": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}


def parse_bytes(text: str) -> int:
    """``512MiB``, ``2G``, ``1000000`` -> bytes (K/M/G and KiB/MiB/GiB are binary)."""
    lowered = text.strip().lower()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if unit and lowered.endswith(unit):
            number, factor = lowered[: -len(unit)], _UNITS[unit]
            break
    else:
        number, factor = lowered, 1
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--kv-cache-memory: cannot read {text!r}; use bytes or a size like 256MiB or 2G"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--kv-cache-memory must be > 0, got {text!r}")
    return int(value * factor)


def parse_lora(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora expects NAME=PATH, got {text!r}")
    return name, path


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ds-serve",
        description="Serve a DeepSeek-architecture model over the OpenAI API with continuous "
        "batching. With no MODEL_PATH, serves the built-in models/ds-tiny-coder, found from "
        "the current directory upward.",
    )
    parser.add_argument("model_path", nargs="?", default=None, metavar="MODEL_PATH")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health (default: the "
        f"{API_KEY_ENV} environment variable, which keeps the key out of `ps`)",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the name /v1/models reports (default: the directory name)",
    )
    parser.add_argument("--max-num-seqs", type=_positive, default=64)
    parser.add_argument("--max-num-batched-tokens", type=_positive, default=2048)
    parser.add_argument(
        "--max-waiting",
        type=_positive,
        default=256,
        help="waiting requests beyond this get HTTP 429",
    )
    parser.add_argument("--block-size", type=_positive, default=16)
    parser.add_argument(
        "--kv-cache-memory",
        type=parse_bytes,
        default=None,
        help="KV-cache budget, e.g. 512MiB (default: 25%% of free memory, at most 4 GiB and "
        "at most 2 x max-num-seqs x max-model-len tokens)",
    )
    parser.add_argument("--max-model-len", type=_positive, default=None)
    parser.add_argument(
        "--quantization",
        choices=["int8", "int4", "w8a8", "fp8"],
        default=None,
        help="quantize the linear layers at load (through ds-model / ds-quant); a checkpoint "
        "saved quantized is served as saved, and another method is refused",
    )
    parser.add_argument(
        "--lora",
        type=parse_lora,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a PEFT-format LoRA adapter served as model NAME; repeatable",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights' dtype; auto: the checkpoint's on GPU, float32 on CPU",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument(
        "--tensor-parallel-size",
        type=_positive,
        default=1,
        help="split the model across N ranks (heads, MLPs, routed experts by expert): "
        "ds-serve starts N-1 worker processes (gloo on CPU, NCCL with one GPU each), or "
        "runs under torchrun, where RANK 0 serves HTTP (default 1)",
    )
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument(
        "--compile",
        dest="decode_steps",
        action="store_const",
        const="compile",
        default=None,
        help="run decode steps through torch.compile, padded to batch-size buckets "
        "(compiled at startup: minutes on a small CPU; then faster steps)",
    )
    steps.add_argument(
        "--cuda-graph",
        dest="decode_steps",
        action="store_const",
        const="cuda_graph",
        help="replay decode steps as CUDA graphs, one per batch-size bucket (CUDA only)",
    )
    parser.add_argument("--max-body-bytes", type=_positive, default=4 * 1024 * 1024)
    parser.add_argument(
        "--stream-interval",
        type=_positive,
        default=1,
        help="tokens per streamed event (default 1); a choice's first token and its end "
        "are sent at once. Larger values cut the server's per-token work under load",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGTERM before they are aborted",
    )
    parser.add_argument(
        "--http",
        choices=("auto", "h11", "httptools"),
        default="auto",
        help="HTTP/1.1 implementation, as uvicorn's --http (auto: httptools when installed)",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop, as uvicorn's --loop (auto: uvloop when installed)",
    )
    parser.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        # The pipes to the engine process are inherited file descriptors (POSIX).
        default=os.name == "posix",
        help="run the engine (scheduler, model steps, sampling) in a process of its own, "
        "so HTTP and the model steps use two cores and do not share a GIL (default on "
        "POSIX systems); --no-engine-process runs it in a thread of the server's process",
    )
    parser.add_argument("--log-level", default="info")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key is empty; give a key or leave it out")
    names = [name for name, _ in args.lora]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        parser.error(f"--lora names must be unique; repeated: {repeated}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from ds_serve.default_model import DefaultModelNotFound, find_default_model
    from ds_serve.ranks import RankFailed
    from ds_serve.server import create_app, follow_steps

    engine_options = dict(
        served_model_name=args.served_model_name,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting=args.max_waiting,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        max_model_len=args.max_model_len,
        quantization=args.quantization,
        lora=dict(args.lora),
        dtype=args.dtype,
        device=args.device,
        enable_prefix_caching=not args.no_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size,
        decode_steps=args.decode_steps,
    )
    try:
        if args.tensor_parallel_size > 1 and int(os.environ.get("RANK", "0")) > 0:
            # Under torchrun: the ranks other than 0 follow rank 0's steps; no HTTP.
            model_path = args.model_path or find_default_model()
            follow_steps(model_path, **engine_options)
            return 0
        app = create_app(
            args.model_path,
            api_key=args.api_key,
            max_body_bytes=args.max_body_bytes,
            stream_interval=args.stream_interval,
            engine_process=args.engine_process,
            **engine_options,
        )
    except (DefaultModelNotFound, FileNotFoundError, ValueError, RankFailed) as exc:
        print(f"ds-serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        app.run(
            host=args.host,
            port=args.port,
            shutdown_grace=args.shutdown_grace,
            log_level=args.log_level,
            http=args.http,
            loop=args.loop,
        )
    except KeyboardInterrupt:
        # uvicorn raises Ctrl-C again once its graceful shutdown is done: the exit
        # status says so, without a traceback.
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
