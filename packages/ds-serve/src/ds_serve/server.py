"""``create_app``: from a checkpoint directory to a running server object.

Loads the model with ds-model (optionally quantized, with LoRA adapters), sizes the
paged KV pool from a memory budget, builds ds-batching's ``Scheduler`` and ds-model's
``ModelRunner`` over the same pool geometry, and wraps them in an ``Engine`` and an
``App``. Quantization and adapters go through ds-model's API only
(``from_pretrained(quantization=)``, ``load_adapter``, ``ModelRunner.step(adapters=)``):
ds-serve declares ds-model and ds-batching and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from ds_batching import Scheduler, SchedulerConfig

from ds_serve import ranks as ranks_
from ds_serve.app import DEFAULT_MAX_BODY_BYTES, App
from ds_serve.default_model import find_default_model
from ds_serve.engine import Engine
from ds_serve.ranks import Ranks
from ds_serve.tensor_parallel import TensorParallelRunner, follow

__all__ = ["ENGINE_OPTIONS", "build_engine", "create_app"]

log = logging.getLogger("ds_serve")

# What create_app(**engine_options) accepts, with its defaults.
ENGINE_OPTIONS = {
    "max_num_seqs": 64,
    "max_num_batched_tokens": 2048,
    "max_waiting": 256,
    "block_size": 16,
    # bytes; None: 25% of free memory, capped at 4 GiB and at what the pool can use
    "kv_cache_memory": None,
    "num_blocks": None,  # an explicit pool size wins over kv_cache_memory
    "max_model_len": None,  # None: the model's max_position_embeddings
    "quantization": None,  # "int8" | "int4" | "w8a8" | "fp8" | a ds-quant config object
    "lora": None,  # {adapter name: PEFT adapter directory}
    "dtype": "auto",
    "device": None,
    "enable_prefix_caching": True,
    "enable_chunked_prefill": True,
    "served_model_name": None,
    # ranks the model is split across (heads, MLPs, experts): see ds_serve.tensor_parallel
    "tensor_parallel_size": 1,
    # None: eager steps; "compile" | "cuda_graph": decode steps compiled / captured per
    # batch-size bucket (ds_model.decode_buckets), built before the server starts.
    "decode_steps": None,
}
# The short names ds-model's from_pretrained(quantization=) accepts (see docs/ds-model.md):
# weight-only int8 / int4 (W4A16), int8 weights and dynamic int8 activations, and
# DeepSeek's FP8 block quantization.
QUANTIZATIONS = ("int8", "int4", "w8a8", "fp8")
DECODE_STEPS = ("compile", "cuda_graph")


def _serving_dtype(option: str, device: torch.device) -> str | None:
    """The weights' dtype for the ``dtype`` option (``None``: the checkpoint's own).

    ``"auto"`` is the checkpoint's dtype on an accelerator and float32 on the CPU.
    There, bf16/fp16 matrix multiplies run through oneDNN, which compiles and caches a
    kernel for every new shape; a server's steps have new shapes all the time (prompt
    lengths, batch sizes, tokens per expert), so serving the shipped bf16 model grew
    by ~300 MiB over 40 requests of varied length (float32: 15 MiB) and was slower in
    decode (0.83 s against 0.55 s for 4 x 64 tokens). Ask for ``bfloat16`` explicitly
    where weight memory matters more (a large model on a CPU)."""
    if option != "auto":
        return option
    return "float32" if device.type == "cpu" else None


def _options(engine_options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(engine_options) - set(ENGINE_OPTIONS))
    if unknown:
        raise TypeError(f"unknown engine options {unknown}; accepted: {sorted(ENGINE_OPTIONS)}")
    options = {**ENGINE_OPTIONS, **engine_options}
    # The sizes ds-serve computes with (the KV pool) are checked here, by ds-serve's names.
    sizes = ("max_num_seqs", "block_size", "kv_cache_memory", "num_blocks", "max_model_len")
    for name in (*sizes, "tensor_parallel_size"):
        value = options[name]
        if value is None and ENGINE_OPTIONS[name] is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    quantization = options["quantization"]
    # A string must be one of the short names; anything else that is not None is taken to
    # be a ds-quant config object and handed to ds-model as it is (ds-model checks it).
    if isinstance(quantization, str) and quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {QUANTIZATIONS}, a ds-quant config object or None, "
            f"got {quantization!r}"
        )
    options["lora"] = _adapter_paths(options["lora"])
    if options["decode_steps"] not in (None, *DECODE_STEPS):
        raise ValueError(
            f"decode_steps must be None (eager), 'compile' or 'cuda_graph', "
            f"got {options['decode_steps']!r}"
        )
    if options["tensor_parallel_size"] > 1:
        reasons = {
            "quantization": "the ranks split plain linear layers",
            "lora": "the ranks split plain linear layers",
            "decode_steps": "every rank runs the same eager step",
        }
        for name, reason in reasons.items():
            if options[name]:
                raise ValueError(
                    f"{name} is not supported with tensor_parallel_size > 1 "
                    f"(--tensor-parallel-size {options['tensor_parallel_size']}): {reason}"
                )
    return options


def _adapter_paths(lora: Any) -> dict[str, Path]:
    """``{name: directory}`` checked for what the HTTP side relies on: each name is a
    non-empty string without whitespace (it is what a request puts in ``model``)."""
    if lora is None:
        return {}
    if not isinstance(lora, dict):
        raise TypeError(f"lora must be a dict {{adapter name: PEFT directory}}, got {lora!r}")
    paths = {}
    for name, path in lora.items():
        if not isinstance(name, str) or not name or name != name.strip() or " " in name:
            raise ValueError(
                f"lora adapter name {name!r} is not allowed: use a non-empty name without "
                "spaces (requests select the adapter with it in `model`)"
            )
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"lora[{name!r}] must be a directory path, got {path!r}")
        paths[name] = Path(path)
    return paths


def _default_kv_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(free // 4, 4 << 30)


def _useful_num_blocks(max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    """Blocks for every running sequence at full length, twice over: the second half keeps
    finished requests' prefixes cached. More would be allocated (and, on CPU, zeroed and
    committed) for nothing: a small model would otherwise take gigabytes at start-up."""
    return 2 * max_num_seqs * -(-max_model_len // block_size)


def _load_model(path: Path, dtype, device: torch.device, quantization: Any):
    """The model through ds-model, quantized there (its ``quantization=`` takes the short
    names and ds-quant config objects) before any adapter is attached, as QLoRA does. A
    PEFT adapter folder (``adapter_config.json``, no ``config.json``: what a LoRA
    fine-tune writes) serves its base with the adapter applied to every request."""
    import ds_model

    adapter = None
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        adapter, path = path, adapter_base(path)
    return ds_model.from_pretrained(
        path, dtype=dtype, device=device, quantization=quantization, adapter=adapter
    )


def _newest_checkpoint(path: Path) -> Path:
    """A training run's output directory (``checkpoint-<step>/`` folders, no model files
    of its own) serves its newest complete checkpoint; any other directory itself."""
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    from ds_model.training.checkpoint import list_checkpoints

    found = list_checkpoints(str(path))
    return Path(found[-1][1]) if found else path


def adapter_base(adapter: Path) -> Path:
    """The base checkpoint an adapter folder names (``base_model_name_or_path``): an
    absolute path, or one relative to the working directory or to the adapter folder."""
    config_file = adapter / "adapter_config.json"
    try:
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{config_file}: not a JSON object ({exc})") from None
    if not isinstance(base, str) or not base:
        raise ValueError(
            f"{config_file}: base_model_name_or_path={base!r} does not name the base model's "
            "directory; set it (deepseek-train records it when it trains from a directory)"
        )
    for candidate in (Path(base), adapter / base):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"{config_file}: base_model_name_or_path={base!r} is not a local directory "
        "(absolute, or relative to the working directory or to the adapter folder); "
        "ds-serve never downloads"
    )


def _load_adapters(model, lora: dict[str, Path]) -> None:
    """Each PEFT-format adapter under its own name, through ds-model."""
    import ds_model

    for name, adapter_path in lora.items():
        if not adapter_path.is_dir():
            raise FileNotFoundError(f"--lora {name}={adapter_path}: no such adapter directory")
        try:
            ds_model.load_adapter(model, adapter_path, adapter_name=name)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(
                f"--lora {name}={adapter_path}: cannot load the adapter: {exc}"
            ) from exc


def _probe_adapters(runner, adapters: tuple[str, ...]) -> None:
    """Run each adapter once in a mixed two-sequence step, so an adapter the runner cannot
    serve is refused at start-up with its name rather than failing the engine loop (and
    every request in flight) on the first request that selects it. The step writes two KV
    slots of block 0 before any request exists; a request's blocks are always written
    before they are read, so nothing stale is ever attended to."""
    for name in adapters:
        try:
            runner.step([[0], [0]], [0, 0], [[0], [0]], adapters=[name, None])
        except Exception as exc:
            raise ValueError(
                f"--lora {name}: ds-model's runner cannot serve this adapter in a mixed batch "
                f"({type(exc).__name__}: {exc})"
            ) from exc


def _model_dir(model_path: str | os.PathLike | None) -> Path:
    """The directory to serve: ``model_path``, or the built-in model's."""
    path = Path(model_path) if model_path is not None else find_default_model()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    return path


def build_engine(model_path: str | os.PathLike | None = None, **engine_options: Any) -> Engine:
    """The engine for ``model_path`` (None: the built-in model, see ``default_model``)."""
    import ds_model

    options = _options(engine_options)
    path = _model_dir(model_path)
    device = torch.device(options["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _serving_dtype(options["dtype"], device)
    checkpoint = _newest_checkpoint(path)
    tp = options["tensor_parallel_size"]
    # Split ranks load on the CPU and keep their shard on the device.
    load_on = torch.device("cpu") if tp > 1 else device
    model = _load_model(checkpoint, dtype, load_on, options["quantization"])
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise FileNotFoundError(
            f"{path} has no tokenizer (tokenizer.json or tokenizer.model): a server needs one"
        )
    adapters = tuple(options["lora"])
    model_name = options["served_model_name"] or path.resolve().name
    if model_name in adapters:
        raise ValueError(
            f"lora adapter name {model_name!r} is the served model's own name; requests "
            "could not tell them apart: rename the adapter or set served_model_name"
        )
    _load_adapters(model, options["lora"])
    config = model.config
    max_model_len = options["max_model_len"] or config.max_position_embeddings
    if max_model_len > config.max_position_embeddings:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    block_size = options["block_size"]
    ranks = _start_ranks(checkpoint, options, config) if tp > 1 else None
    try:
        if ranks is not None:
            model, device = _shard(model, ranks), ranks.device
        num_blocks = _pool_size(options, model, max_model_len, device)
        if ranks is not None:
            num_blocks = ranks.agree_min(num_blocks)
        runner = ds_model.ModelRunner(
            model,
            num_blocks=num_blocks,
            block_size=block_size,
            decode_steps=options["decode_steps"],
        )
        if runner.decode_steps is not None:
            log.info(
                "building %s decode steps for batch sizes %s",
                options["decode_steps"],
                runner.decode_steps.buckets,
            )
            runner.decode_steps.warm_up()
    except BaseException:
        if ranks is not None:  # no worker may outlive a server that failed to start
            ranks.stop(timeout=0.0)
        raise
    _probe_adapters(runner, adapters)
    if ranks is not None:
        runner = TensorParallelRunner(runner, ranks)
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=options["max_num_seqs"],
            max_num_batched_tokens=options["max_num_batched_tokens"],
            block_size=block_size,
            num_blocks=num_blocks,
            max_waiting=options["max_waiting"],
            enable_chunked_prefill=options["enable_chunked_prefill"],
            enable_prefix_caching=options["enable_prefix_caching"],
        )
    )
    eos = [i for i in (tokenizer.eos_token_id, *config.eos_token_ids) if i is not None]
    log.info(
        "serving %s on %s: %d KV blocks x %d tokens, adapters %s, tensor parallel %d",
        path,
        device,
        num_blocks,
        block_size,
        list(adapters),
        tp,
    )
    engine = Engine(
        scheduler=scheduler,
        runner=runner,
        tokenizer=tokenizer,
        model_name=model_name,
        adapters=adapters,
        max_model_len=max_model_len,
        vocab_size=min(config.vocab_size, tokenizer.vocab_size),
        eos_token_ids=tuple(dict.fromkeys(eos)),
    )
    if ranks is not None:
        ranks.watch(engine.fail)
    return engine


def _pool_size(options: dict[str, Any], model, max_model_len: int, device: torch.device) -> int:
    """The KV pool's blocks: ``num_blocks``, else what ``kv_cache_memory`` (default: a
    share of free memory) holds, at most what the running sequences can use."""
    import ds_model

    block_size = options["block_size"]
    num_blocks = options["num_blocks"]
    if num_blocks is None:
        budget = options["kv_cache_memory"]
        if budget is None:
            num_blocks = _useful_num_blocks(options["max_num_seqs"], max_model_len, block_size)
            budget = _default_kv_memory(device)
        fits = ds_model.num_blocks_for_memory(model.config, budget, block_size, model.dtype)
        num_blocks = fits if num_blocks is None else min(num_blocks, fits)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={budget} bytes is smaller than one KV block")
    return num_blocks


def _start_ranks(checkpoint: Path, options: dict[str, Any], config) -> Ranks:
    """Check that the model splits into ``tensor_parallel_size`` ranks, then start or
    join them (see ``ds_serve.ranks``)."""
    from ds_model import check_tensor_parallel_size

    tp = options["tensor_parallel_size"]
    try:
        check_tensor_parallel_size(config, tp)
    except ValueError as exc:
        raise ValueError(f"--tensor-parallel-size {tp}: {exc}") from None
    return ranks_.start(tp, str(checkpoint), options, options["device"])


def _shard(model, ranks: Ranks):
    """This rank's shard of ``model``, on its device."""
    from ds_model import shard_model

    shard_model(model, ranks.rank, ranks.world_size, group=ranks.model_group)
    return model.to(ranks.device)


def follow_steps(model_path: str | os.PathLike, **engine_options: Any) -> None:
    """A tensor-parallel rank other than 0 (a worker ``ds-serve`` started, or a
    ``torchrun`` process with RANK > 0): load and shard the model as rank 0 does, size
    the same KV pool, then run the steps rank 0 sends until it stops."""
    import ds_model

    options = _options(engine_options)
    ranks = ranks_.join(options["device"])
    try:
        dtype = _serving_dtype(options["dtype"], ranks.device)
        path = _newest_checkpoint(Path(model_path))
        model = _shard(_load_model(path, dtype, torch.device("cpu"), None), ranks)
        max_model_len = options["max_model_len"] or model.config.max_position_embeddings
        num_blocks = ranks.agree_min(_pool_size(options, model, max_model_len, ranks.device))
        runner = ds_model.ModelRunner(
            model, num_blocks=num_blocks, block_size=options["block_size"]
        )
        follow(runner, ranks)
    finally:
        ranks.stop()


def create_app(
    model_path: str | os.PathLike | None = None,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    stream_interval: int = 1,
    engine_process: bool = False,
    **engine_options: Any,
) -> App:
    """The server for ``model_path``: ``create_app(path).run(host="127.0.0.1", port=8000)``,
    or hand the returned object to any ASGI server. ``engine_options``: see ``ENGINE_OPTIONS``.
    ``stream_interval``: the tokens a streamed choice sends per event (see ``App``).
    ``engine_process``: run the engine in a process of its own (``ds_serve.engine_process``;
    what the ``ds-serve`` command does) rather than in a thread of this one.
    """
    if engine_process:
        from ds_serve.engine_process import EngineClient

        # A missing model or an unknown option fails here, before a process starts.
        _options(engine_options)
        engine = EngineClient(_model_dir(model_path), engine_options)
        return App(
            engine, api_key=api_key, max_body_bytes=max_body_bytes, stream_interval=stream_interval
        )
    engine = build_engine(model_path, **engine_options)
    return App(
        engine, api_key=api_key, max_body_bytes=max_body_bytes, stream_interval=stream_interval
    )
