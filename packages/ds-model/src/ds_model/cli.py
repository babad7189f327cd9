"""``ds-model generate [PATH] "prompt"``, ``ds-model info [PATH]`` and
``ds-model quantize SRC DST --method int8``.

``quantize`` loads SRC, quantizes its linear layers with ds-quant (as
``from_pretrained(quantization=)`` does) and saves the result to DST in ds-quant's
format, which ``from_pretrained`` and ``ds-serve DST`` load as saved. Without PATH,
``generate`` and ``info`` use the project's built-in model (``models/ds-tiny-coder``, found
from the current directory upward; see ``ds_model.default_model``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-model", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on bad input, show the traceback too")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", parents=[common], help="generate text from a prompt")
    # [PATH] PROMPT as one list: argparse cannot place an optional positional before a
    # required one once options sit between them (PATH --max-new-tokens 6 PROMPT).
    gen.add_argument(
        "words",
        nargs="+",
        metavar="[PATH] PROMPT",
        help="a local checkpoint directory (default: the built-in models/ds-tiny-coder), "
        "then the prompt",
    )
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument(
        "--dtype",
        default="auto",
        help="e.g. float32, bfloat16; auto: the checkpoint's on GPU, float32 on CPU (bf16 "
        "matmuls there compile a kernel per new shape and decode slower at this size)",
    )
    gen.add_argument("--device", default="cpu")
    gen.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (a few seconds first; faster long outputs)",
    )
    info = sub.add_parser(
        "info", parents=[common], help="parameters, active parameters, KV bytes per token"
    )
    info.add_argument(
        "path",
        nargs="?",
        default=None,
        help="a checkpoint directory or preset name (default: the built-in model)",
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    quant = sub.add_parser(
        "quantize", parents=[common], help="save a quantized copy of a checkpoint (ds-quant)"
    )
    quant.add_argument("source", help="a local checkpoint directory")
    quant.add_argument("destination", help="the directory to write the quantized checkpoint to")
    quant.add_argument(
        "--method",
        required=True,
        choices=["int8", "int4", "w8a8", "fp8"],
        help="int8: INT8 weights; int4: W4A16 (the LM head INT8); w8a8: INT8 weights and "
        "activations; fp8: DeepSeek-V3's FP8 blocks",
    )
    quant.add_argument("--group-size", type=int, default=None, help="int4: channels per scale")
    quant.add_argument(
        "--dtype", default=None, help="float parts' dtype (default: the checkpoint's own)"
    )
    return parser


def _quantize(args: argparse.Namespace) -> int:
    from ds_model.loading import from_pretrained

    method: object = args.method
    if args.group_size is not None:
        if args.method != "int4":
            raise ValueError(f"--group-size applies to --method int4, not {args.method}")
        import ds_quant

        method = ds_quant.Int4WeightOnlyConfig(group_size=args.group_size)
    model = from_pretrained(args.source, dtype=args.dtype, quantization=method)
    model.save_pretrained(args.destination)
    print(f"saved {args.source} quantized ({args.method}) to {args.destination}")
    return 0


def _info(path: str, as_json: bool) -> int:
    from ds_model.config import ModelConfig
    from ds_model.loading import parameter_counts
    from ds_model.model import DeepSeekForCausalLM

    config = ModelConfig.from_preset(path) if _is_preset(path) else ModelConfig.from_file(path)
    with torch.device("meta"):  # shapes only: nothing is read or allocated
        model = DeepSeekForCausalLM(config)
    total, active = parameter_counts(model)
    facts = {
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "attention": "MLA" if config.is_mla else "MHA/GQA",
        "attention_pattern": config.attention.kind,
        "moe": bool(config.is_moe),
        "parameters": total,
        "active_parameters_per_token": active,
        "kv_cache_bytes_per_token_bf16": config.kv_cache_bytes_per_token(2),
        "kv_cache_bytes_per_token_fp32": config.kv_cache_bytes_per_token(4),
        "max_position_embeddings": config.max_position_embeddings,
    }
    if as_json:
        print(json.dumps(facts, indent=2))
    else:
        width = max(map(len, facts))
        for key, value in facts.items():
            shown = (
                f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
            )
            print(f"{key:<{width}}  {shown}")
    return 0


def _is_preset(path: str) -> bool:
    from pathlib import Path

    from ds_model.config import PRESETS

    return path in PRESETS and not Path(path).is_dir()


def _generate(args: argparse.Namespace) -> int:
    from ds_model.loading import from_pretrained

    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if torch.device(args.device).type == "cpu" else None
    model = from_pretrained(args.path, dtype=dtype, device=args.device)
    if model.tokenizer is None:
        print(f"error: {args.path} has no tokenizer.json or tokenizer.model", file=sys.stderr)
        return 2
    prompt = args.prompt
    if args.chat:
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    for piece in model.stream(
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        compile=args.compile,
    ):
        print(piece, end="", flush=True)
    print()
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "quantize":
        args.path = args.source
    if args.command != "generate":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args
    # Positionals after an option come back as extras; options never do here.
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    words = [*args.words, *extra]
    if len(words) > 2:
        parser.error(f"generate takes [PATH] PROMPT, got {len(words)} words: {words!r}")
    if len(words) == 1:
        from pathlib import Path

        if (Path(words[0]) / "config.json").is_file():
            parser.error(f"{words[0]!r} is a model directory: give a prompt after it")
        words.insert(0, None)
    args.path, args.prompt = words
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.path is None:
            from ds_model.default_model import find_default_model

            args.path = str(find_default_model())
        if args.command == "info":
            return _info(args.path, args.json)
        if args.command == "quantize":
            return _quantize(args)
        return _generate(args)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        if args.debug:
            raise
        print(f"ds-model: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
