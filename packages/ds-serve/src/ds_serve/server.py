"""``create_app``: from a checkpoint directory to a running server object.

Loads the model with ds-model (optionally quantized, with LoRA adapters), sizes the
paged KV pool from a memory budget, builds ds-batching's ``Scheduler`` and ds-model's
``ModelRunner`` over the same pool geometry, and wraps them in an ``Engine`` and an
``App``.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch
from ds_batching import Scheduler, SchedulerConfig

from ds_serve.app import DEFAULT_MAX_BODY_BYTES, App
from ds_serve.default_model import find_default_model
from ds_serve.engine import Engine

__all__ = ["ENGINE_OPTIONS", "build_engine", "create_app"]

log = logging.getLogger("ds_serve")

# What create_app(**engine_options) accepts, with its defaults.
ENGINE_OPTIONS = {
    "max_num_seqs": 64,
    "max_num_batched_tokens": 2048,
    "max_waiting": 256,
    "block_size": 16,
    "kv_cache_memory": None,  # bytes; None: 25% of free memory, capped at 4 GiB
    "num_blocks": None,  # an explicit pool size wins over kv_cache_memory
    "max_model_len": None,  # None: the model's max_position_embeddings
    "quantization": None,  # "int8" | "int4"
    "lora": None,  # {adapter name: PEFT adapter directory}
    "dtype": "auto",
    "device": None,
    "enable_prefix_caching": True,
    "enable_chunked_prefill": True,
    "served_model_name": None,
}
QUANTIZATIONS = ("int8", "int4")


def _options(engine_options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(engine_options) - set(ENGINE_OPTIONS))
    if unknown:
        raise TypeError(f"unknown engine options {unknown}; accepted: {sorted(ENGINE_OPTIONS)}")
    options = {**ENGINE_OPTIONS, **engine_options}
    if options["quantization"] not in (None, *QUANTIZATIONS):
        raise ValueError(
            f"quantization must be one of {QUANTIZATIONS} or None, got {options['quantization']!r}"
        )
    return options


def _default_kv_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(free // 4, 4 << 30)


def _load_model(path: Path, dtype, device: torch.device, quantization: str | None):
    """The model through ds-model. Quantization is named ("int8" / "int4"), never a ds-quant
    object: ds-serve reaches the leaves only through ds-model."""
    import ds_model

    if quantization is None:
        return ds_model.from_pretrained(path, dtype=dtype, device=device)
    try:
        return ds_model.from_pretrained(path, dtype=dtype, device=device, quantization=quantization)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(
            f"quantization={quantization!r}: the installed ds-model could not apply it by name "
            f"({exc}); ds-serve needs ds_model.from_pretrained(quantization='int8'|'int4')"
        ) from exc


def _load_adapters(model, lora: dict[str, str | os.PathLike]) -> None:
    """Each PEFT-format adapter under its own name, through ds-model."""
    if not lora:
        return
    import ds_model

    load = getattr(ds_model, "load_adapter", None)
    if load is None:
        raise ValueError(
            f"--lora {sorted(lora)}: the installed ds-model has no load_adapter(model, path, "
            "adapter_name=...), which ds-serve needs to load named adapters"
        )
    for name, adapter_path in lora.items():
        if not Path(adapter_path).is_dir():
            raise FileNotFoundError(f"--lora {name}={adapter_path}: no such adapter directory")
        load(model, adapter_path, adapter_name=name)


def build_engine(model_path: str | os.PathLike | None = None, **engine_options: Any) -> Engine:
    """The engine for ``model_path`` (None: the built-in model, see ``default_model``)."""
    import ds_model

    options = _options(engine_options)
    path = Path(model_path) if model_path is not None else find_default_model()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    device = torch.device(options["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = None if options["dtype"] == "auto" else options["dtype"]
    model = _load_model(path, dtype, device, options["quantization"])
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise FileNotFoundError(
            f"{path} has no tokenizer (tokenizer.json or tokenizer.model): a server needs one"
        )
    adapters = tuple(options["lora"] or {})
    _load_adapters(model, options["lora"] or {})
    config = model.config
    max_model_len = options["max_model_len"] or config.max_position_embeddings
    if max_model_len > config.max_position_embeddings:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    block_size = options["block_size"]
    num_blocks = options["num_blocks"]
    if num_blocks is None:
        budget = options["kv_cache_memory"] or _default_kv_memory(device)
        num_blocks = ds_model.num_blocks_for_memory(config, budget, block_size, model.dtype)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={budget} bytes is smaller than one KV block")
    runner = ds_model.ModelRunner(model, num_blocks=num_blocks, block_size=block_size)
    if adapters and "adapters" not in inspect.signature(runner.step).parameters:
        raise ValueError(
            f"--lora {list(adapters)}: serving adapters needs ds-model's ModelRunner.step to "
            "take adapters=[name or None per sequence] (a mixed-adapter batch through "
            "ds-lora); the installed ds-model's step does not"
        )
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
        "serving %s on %s: %d KV blocks x %d tokens, adapters %s",
        path,
        device,
        num_blocks,
        block_size,
        list(adapters),
    )
    return Engine(
        scheduler=scheduler,
        runner=runner,
        tokenizer=tokenizer,
        model_name=options["served_model_name"] or path.resolve().name,
        adapters=adapters,
        max_model_len=max_model_len,
        vocab_size=min(config.vocab_size, tokenizer.vocab_size),
        eos_token_ids=tuple(dict.fromkeys(eos)),
    )


def create_app(
    model_path: str | os.PathLike | None = None,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    **engine_options: Any,
) -> App:
    """The server for ``model_path``: ``create_app(path).run(host="127.0.0.1", port=8000)``,
    or hand the returned object to any ASGI server. ``engine_options``: see ``ENGINE_OPTIONS``.
    """
    engine = build_engine(model_path, **engine_options)
    return App(engine, api_key=api_key, max_body_bytes=max_body_bytes)
