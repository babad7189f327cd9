"""Load checkpoints from a local directory and write them back in the same layout.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or
shards listed by ``model.safetensors.index.json``. The model is built on the meta
device (no memory), then each tensor is read from its memory-mapped shard, converted
once to the target dtype/device and put in place, so weights are never held twice.

Key conversions (both directions):

- routed experts: the model keeps DeepSeek's per-expert layout
  (``mlp.experts.{e}.{gate,up,down}_proj.weight``); transformers 5's fused
  ``mlp.experts.gate_up_proj`` (experts, 2 x inter, hidden) / ``down_proj`` (experts,
  hidden, inter) are split into it on load. Saving writes the per-expert layout.
- FP8 (DeepSeek-V3): ``weight`` float8_e4m3fn with ``weight_scale_inv`` block scales is
  dequantized through ds-quant's ``dequantize_fp8_block`` to the target dtype.
- layers past ``num_hidden_layers`` (V3's multi-token-prediction module) are skipped
  with a warning: generation here predicts one token at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ds_model.config import PRESETS, ConfigError, ModelConfig, read_json
from ds_model.generation_config import GENERATION_CONFIG_FILE
from ds_model.model import DeepSeekForCausalLM
from ds_model.quantized_checkpoint import (
    is_quantized,
    is_quantized_checkpoint,
    load_quantized_pretrained,
    save_quantized_weights,
    saved_method,
)

__all__ = [
    "CheckpointError",
    "MissingShardError",
    "ShapeMismatchError",
    "from_pretrained",
    "load_adapter",
    "load_state",
    "save_pretrained",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """The checkpoint does not fit the model its config describes."""


class MissingShardError(CheckpointError):
    """A shard named by the index is not in the directory."""


class ShapeMismatchError(CheckpointError):
    """A checkpoint tensor's shape differs from the model parameter's."""


def _torch_dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={value!r} is not a torch floating dtype (e.g. 'bfloat16')")
    return dtype


@contextlib.contextmanager
def open_safetensors(file: Path) -> Iterator[Any]:
    """``safe_open`` whose errors (a truncated or corrupt file) name the file."""
    try:
        handle = safe_open(file, framework="pt")
    except Exception as exc:  # SafetensorError, OSError: the message lacks the path
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
    with handle as f:
        yield f


def _shard_path(path: Path, index: Path, key: str, name: Any) -> Path:
    """The shard ``name`` inside ``path``; an absolute name or one that climbs out with
    ``..`` is refused. Checked on the name, not the resolved file, so a symlinked shard
    (the Hugging Face cache's layout) still loads."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index}: weight_map[{key!r}]={name!r} is not a file name")
    normal = os.path.normpath(name)
    if os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep):
        raise CheckpointError(
            f"{index}: weight_map[{key!r}]={name!r} points outside the checkpoint "
            f"directory {path}; shards must be files inside it"
        )
    return path / normal


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Map every tensor key to the shard file that holds it."""
    index = path / INDEX_FILE
    if index.is_file():
        raw = read_json(index, CheckpointError)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' object")
        files = {}
        for key, name in weight_map.items():
            shard = _shard_path(path, index, key, name)
            if not shard.is_file():
                raise MissingShardError(
                    f"shard {name!r} listed in {INDEX_FILE} (for tensor {key!r}) is missing "
                    f"from {path}"
                )
            files[key] = shard
        return files
    single = path / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    with open_safetensors(single) as f:
        return dict.fromkeys(f.keys(), single)


class _Target:
    """Where one checkpoint tensor goes: a module's parameter or buffer."""

    def __init__(self, module: nn.Module, attr: str, shape: torch.Size) -> None:
        self.module, self.attr, self.shape = module, attr, shape


def _targets(model: DeepSeekForCausalLM) -> dict[str, _Target]:
    """Checkpoint key -> target, for every tensor the model needs."""
    out: dict[str, _Target] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        tensors = {**module._parameters, **module._buffers}
        for attr, t in tensors.items():
            if t is None or attr in module._non_persistent_buffers_set:
                continue
            out[f"{prefix}{attr}"] = _Target(module, attr, t.shape)
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def load_state(
    model: DeepSeekForCausalLM,
    files: dict[str, Path],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    keep_fp8: bool = False,
) -> list[str]:
    """Fill a (meta) model from checkpoint files. Returns notes on skipped keys.

    ``keep_fp8``: FP8 weights of linear layers stay FP8 as ds-quant ``Fp8BlockLinear``
    modules (half the memory of bf16), routed experts included."""
    config = model.config
    targets = _targets(model)
    block = tuple(
        (config.extra.get("quantization_config") or {}).get("weight_block_size", (128, 128))
    )
    filled: set[str] = set()
    skipped_layers: set[int] = set()
    unexpected: list[str] = []
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with open_safetensors(file) as f:
            present = set(f.keys())
            for key in keys:
                if key.endswith("weight_scale_inv") or key.endswith(_IGNORED_SUFFIXES):
                    continue
                m = _LAYER_KEY.match(key)
                if m and int(m.group(1)) >= config.num_hidden_layers:
                    skipped_layers.add(int(m.group(1)))
                    continue
                if key not in present:
                    raise CheckpointError(f"tensor {key!r} is indexed in {file.name} but absent")
                fused = _FUSED_EXPERT_KEY.match(key)
                if fused:
                    _load_fused_experts(targets, fused, f.get_tensor(key), dtype, device, filled)
                    continue
                target = targets.get(key)
                if target is None:
                    if not (key == "lm_head.weight" and config.tie_word_embeddings):
                        unexpected.append(key)  # a tied head stored anyway is just dropped
                    continue
                tensor = f.get_tensor(key)
                scale_key = key.removesuffix("weight") + "weight_scale_inv"
                if tensor.dtype == torch.float8_e4m3fn:
                    if keep_fp8 and isinstance(target.module, nn.Linear):
                        _keep_fp8(
                            model, key, target, tensor, files, scale_key, block, dtype, device
                        )
                        filled.add(key)
                        continue
                    tensor = _dequantize_fp8(key, tensor, files, scale_key, block, dtype)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ShapeMismatchError(
                        f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)} but the "
                        f"model expects {tuple(target.shape)}"
                    )
                _place(target, tensor, dtype, device)
                filled.add(key)
    missing = sorted(set(targets) - filled)
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" ... ({len(missing)} in all)" if len(missing) > 8 else ""
        )
        raise CheckpointError(f"checkpoint is missing tensors the model needs: {shown}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.reset_rope()
    notes = []
    if skipped_layers:
        notes.append(
            f"skipped layers {sorted(skipped_layers)} beyond num_hidden_layers="
            f"{config.num_hidden_layers} (multi-token-prediction module; unused for "
            "next-token generation)"
        )
    if unexpected:
        notes.append(f"ignored {len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
    return notes


def _place(target: _Target, tensor: torch.Tensor, dtype, device) -> None:
    module, attr = target.module, target.attr
    keep_fp32 = attr == "e_score_correction_bias"
    tensor = tensor.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
    if attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())


def _load_fused_experts(targets, match, tensor, dtype, device, filled: set[str]) -> None:
    """transformers 5 layout: experts.gate_up_proj (E, 2I, H), experts.down_proj (E, H, I),
    split into the per-expert linear layers."""
    base = match.group(1)
    names = ("gate_proj", "up_proj") if match.group(2) == "gate_up_proj" else ("down_proj",)
    first = targets.get(f"{base}.0.{names[0]}.weight")
    experts = sum(f"{base}.{e}.{names[0]}.weight" in targets for e in range(tensor.shape[0]))
    key = f"{base}.{match.group(2)}"
    if first is None:
        raise CheckpointError(f"checkpoint tensor {key!r}: the model has no routed experts there")
    rows, cols = first.shape
    expected = (experts, rows * len(names), cols)
    if tuple(tensor.shape) != expected:
        raise ShapeMismatchError(
            f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)} but the model "
            f"expects {expected}"
        )
    for e in range(experts):
        for name, part in zip(names, tensor[e].chunk(len(names))):
            weight_key = f"{base}.{e}.{name}.weight"
            _place(targets[weight_key], part.contiguous(), dtype, device)
            filled.add(weight_key)


def _keep_fp8(model, key, target, tensor, files, scale_key, block, dtype, device) -> None:
    """Swap the meta ``nn.Linear`` for ds-quant's FP8 block linear holding the weights."""
    from ds_quant import Fp8BlockLinear

    expected = tuple(target.shape)
    if tuple(tensor.shape) != expected:
        raise ShapeMismatchError(
            f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)} but the model "
            f"expects {expected}"
        )
    if target.module.bias is not None:
        raise CheckpointError(f"FP8 linear {key!r} with a bias is not supported")
    scale = _read(files, scale_key, key)
    layer = Fp8BlockLinear.from_fp8(tensor, scale, None, block_size=block, dtype=dtype)
    parent_name, _, child = key.removesuffix(".weight").rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer.to(device))


def _read(files, scale_key: str, key: str) -> torch.Tensor:
    if scale_key not in files:
        raise CheckpointError(f"FP8 tensor {key!r} has no {scale_key!r} in the checkpoint")
    with open_safetensors(files[scale_key]) as f:
        return f.get_tensor(scale_key)


def _dequantize_fp8(key, tensor, files, scale_key, block, dtype) -> torch.Tensor:
    from ds_quant import dequantize_fp8_block

    return dequantize_fp8_block(tensor, _read(files, scale_key, key), block_size=block, dtype=dtype)


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    quantization: Any = None,
    adapter: str | os.PathLike | None = None,
    tokenizer: bool = True,
    keep_fp8: bool = False,
    torch_dtype: torch.dtype | str | None = None,
    device_map: Any = None,
) -> DeepSeekForCausalLM:
    """Load a model from a local checkpoint directory (never the network).

    A preset name (``"standard"``, ``"light"``, ``"tiny"``) that is not a directory gives
    a randomly initialised model of that shape (seed 0).

    ``dtype``: the weights' dtype; ``None`` uses ``config.json``'s ``torch_dtype``
    (``dtype`` in transformers 5) when it names a float type, else float32; FP8
    checkpoints load as bfloat16; ``"auto"``: bfloat16 where the device multiplies it
    natively, else float32 (``auto_dtype``). ``quantization``: a ds-quant config, a ds-quant config
    name, or a short name (``"int8"``, ``"int4"``, ``"w8a8"``, ``"fp8"``), applied after
    loading with ``ds_quant.quantize_`` to every linear layer but the LM head, which
    weight-only recipes (INT8, INT4) quantize to INT8. ``adapter``: a PEFT-format LoRA directory
    attached through ds-lora. ``tokenizer``: attach ``model.tokenizer`` when the
    directory has tokenizer files. ``keep_fp8``: FP8 checkpoints keep their linear
    layers in FP8 (ds-quant ``Fp8BlockLinear``) instead of dequantizing at load.
    ``torch_dtype`` is transformers' name for ``dtype``; ``device_map`` places the whole
    model on one device (``"auto"``: CUDA when available, else the CPU; ``"cpu"``,
    ``"cuda:1"``, an index or a ``torch.device``), as transformers does for a model
    that fits one device. ``generation_config.json``, when present, gives ``generate``
    its defaults (``model.generation_config``).
    """
    dtype, device = _transformers_spelling(dtype, device, torch_dtype, device_map)
    path = Path(path)
    if isinstance(dtype, str) and dtype == "auto":
        dtype = auto_dtype(device)
    if not path.is_dir() and str(path) in PRESETS:
        from ds_model.auto import from_config

        return from_config(str(path), dtype=_torch_dtype(dtype) or torch.float32, device=device)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{str(path)!r} is not a local checkpoint directory (ds-model never downloads)"
        )
    config = ModelConfig.from_file(path)
    if is_quantized_checkpoint(config):
        _check_requested_quantization(path, config, quantization)
        model = load_quantized_pretrained(path, config, dtype=_torch_dtype(dtype), device=device)
    else:
        files = checkpoint_files(path)
        dtype = _torch_dtype(dtype) or _default_dtype(config)
        with torch.device("meta"):
            model = DeepSeekForCausalLM(config)
        for note in load_state(model, files, dtype=dtype, device=device, keep_fp8=keep_fp8):
            warnings.warn(f"{path.name}: {note}", stacklevel=2)
        if quantization is not None:
            _quantize(model, quantization)
    if adapter is not None:
        _attach_adapter(model, Path(adapter))
    model.eval()  # last: layers swapped in above start in training mode (LoRA dropout)
    if tokenizer:
        from ds_model.tokenizer import Tokenizer

        if Tokenizer.available(path):
            model.tokenizer = Tokenizer.from_dir(path)
    generation = path / GENERATION_CONFIG_FILE
    if generation.is_file():
        saved = read_json(generation, ConfigError)
        if not isinstance(saved, dict):
            raise ConfigError(f"{generation}: expected a JSON object, got {type(saved).__name__}")
        model.generation_config = saved
    return model


def _transformers_spelling(dtype: Any, device: Any, torch_dtype: Any, device_map: Any):
    """``torch_dtype`` / ``device_map`` (transformers' keywords) as ``dtype`` / ``device``."""
    if torch_dtype is not None:
        if dtype is not None:
            raise ValueError(
                f"dtype={dtype!r} and torch_dtype={torch_dtype!r} are the same setting; "
                "give one of them"
            )
        dtype = torch_dtype
    if device_map is None:
        return dtype, device
    if str(device) != "cpu":
        raise ValueError(
            f"device={device!r} and device_map={device_map!r} are the same setting; give one"
        )
    if isinstance(device_map, dict):
        raise ValueError(
            "device_map as a dict (per-module placement) is not supported: ds-model loads "
            "the whole model on one device; give 'auto', 'cpu', 'cuda', an index or a "
            "torch.device (tensor and pipeline parallelism are ds_model.training's)"
        )
    if device_map == "auto":
        return dtype, "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, bool) or not isinstance(device_map, (str, int, torch.device)):
        raise ValueError(
            f"device_map={device_map!r}: use 'auto', 'cpu', 'cuda', 'cuda:N', an index or a "
            "torch.device"
        )
    try:
        return dtype, torch.device(device_map)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device_map={device_map!r} is not a device: {exc}") from None


def auto_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """What ``dtype="auto"`` loads: bfloat16 on a CPU that multiplies it natively
    (``avx512_bf16`` / ``amx_bf16`` / Arm ``bf16``) and on a CUDA device that supports
    it, float32 elsewhere (emulated bf16 matmuls are slower than float32 ones)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        from ds_model.training.trainer import cpu_has_bf16

        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.float32


def _default_dtype(config: ModelConfig) -> torch.dtype:
    if config.extra.get("quantization_config"):
        return torch.bfloat16
    for name in ("torch_dtype", "dtype"):
        value = config.extra.get(name)
        if isinstance(value, str):
            try:
                return _torch_dtype(value)
            except ValueError:
                continue
    return torch.float32


# Short names for ``quantization=`` (what ds-serve's --quantization passes), beside
# ds-quant's own config names (``"int4_weight_only"``...) and config objects.
QUANTIZATION_NAMES = {
    "int8": "int8_weight_only",
    "int4": "int4_weight_only",
    "w8a8": "int8_dynamic_activation_int8_weight",
    "fp8": "fp8_block",
}


def _quant_config(config: Any) -> Any:
    if not isinstance(config, str):
        return config
    import ds_quant

    name = QUANTIZATION_NAMES.get(config, config)
    try:
        return ds_quant.config_from_dict({"name": name})
    except KeyError:
        raise ValueError(
            f"quantization={config!r} is unknown; use one of {sorted(QUANTIZATION_NAMES)}, a "
            "ds-quant config name, or a ds-quant config object"
        ) from None


def _quantize(model: nn.Module, config: Any) -> None:
    import ds_quant

    config = _quant_config(config)
    # The router stays in full precision, as DeepSeek's own FP8 model keeps it.
    ds_quant.quantize_(model, config, filter_fn=_quantizable)
    if isinstance(config, _weight_only_head_configs()) and not model.config.tie_word_embeddings:
        # The LM head is the largest matrix a decode step reads (half the active bytes of
        # a 100M V3 shape with a 32k vocabulary), so a weight-only recipe that leaves it in
        # float cannot decode much faster than float. INT8 for INT4 recipes too, as
        # llama.cpp keeps its output matrix at 6-8 bits when the rest is 4-bit. A tied
        # head shares the embedding's weight and stays float.
        ds_quant.quantize_(model, ds_quant.Int8WeightOnlyConfig(), filter_fn=_is_lm_head)


def _check_requested_quantization(path: Path, config: ModelConfig, quantization: Any) -> None:
    """A checkpoint saved quantized loads as it was saved; asking for another recipe is
    refused rather than stacking a second quantization on the stored one."""
    if quantization is None:
        return
    saved = saved_method(config)
    requested = _quant_config(quantization)
    same = requested.name == saved.name if isinstance(quantization, str) else requested == saved
    if not same:
        raise ValueError(
            f"quantization={quantization!r} conflicts with {path}, which is saved quantized "
            f"as {saved.to_dict()} (config.json quantization_config); load it without "
            "quantization (it is used as saved) or give the same method"
        )


def _weight_only_head_configs() -> tuple[type, ...]:
    import ds_quant

    return (ds_quant.Int8WeightOnlyConfig, ds_quant.Int4WeightOnlyConfig)


def _quantizable(module: nn.Module, name: str) -> bool:
    # MLA's kv_b_proj stays float: absorbed decode multiplies its per-head halves as
    # batched-matmul operands, and a quantized one sends every step to the naive form,
    # which expands the whole cached latent through it (2% of a 110M V3 shape's bytes).
    if name.endswith("kv_b_proj"):
        return False
    return isinstance(module, nn.Linear) and not name.endswith("lm_head")


def _is_lm_head(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and name == "lm_head"


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default"
) -> nn.Module:
    """Attach a PEFT-format LoRA adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``) under ``adapter_name``, through ds-lora. Several named
    adapters can live on one model; ds-lora switches and mixes them."""
    import ds_lora

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"LoRA adapter directory {str(path)!r} does not exist")
    training = model.training
    ds_lora.load_adapter(model, path, adapter_name=adapter_name)
    # New LoRA layers start in training mode; an eval model must not get dropout.
    return model.train(training)


def _attach_adapter(model: nn.Module, adapter: Path) -> None:
    load_adapter(model, adapter)


# -- saving ----------------------------------------------------------------------------


def _refuse_adapter_layers(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if "lora" in type(module).__name__.lower():
            raise CheckpointError(
                f"cannot save module {name!r} ({type(module).__name__}): merge the adapter "
                "or save it on its own (ds_lora.save_adapter) before save_pretrained"
            )


def export_state_dict(model: DeepSeekForCausalLM) -> dict[str, torch.Tensor]:
    """The checkpoint layout: per-expert keys, no tied LM head, contiguous unshared tensors."""
    for name, module in model.named_modules():
        if hasattr(module, "dequantize") or "lora" in type(module).__name__.lower():
            raise CheckpointError(
                f"cannot save module {name!r} ({type(module).__name__}): merge adapters / "
                "dequantize before save_pretrained, which writes plain float checkpoints"
            )
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        out[key] = t.detach().contiguous().clone()
    return out


def save_pretrained(
    model: DeepSeekForCausalLM,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 4 * 1024**3,
) -> None:
    """Write ``config.json`` and safetensors (sharded with an index above
    ``max_shard_bytes``) loadable here and by transformers. Every file is written to a
    temporary name and moved into place with ``os.replace``.

    A model quantized by ds-quant is written in ds-quant's format instead (one
    ``model.safetensors`` holding the quantized tensors as stored, the recipe recorded in
    ``config.json``'s ``quantization_config``; see ``ds_model.quantized_checkpoint``),
    which ``from_pretrained`` loads back exactly; transformers does not read it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    _refuse_adapter_layers(model)
    quantized = is_quantized(model)
    if quantized:
        state: dict[str, torch.Tensor] = {}
        shards: list[dict[str, torch.Tensor]] = []
    else:
        state = {k: v.to("cpu") for k, v in export_state_dict(model).items()}
        shards = _split(state, max_shard_bytes)
    generation = getattr(model, "generation_config", None)
    if generation:
        _atomic_text(path / GENERATION_CONFIG_FILE, json.dumps(generation, indent=2))
    written = []
    if quantized:
        config["quantization_config"] = save_quantized_weights(model, path)
        written.append(SINGLE_FILE)
    elif len(shards) == 1:
        _atomic(path / SINGLE_FILE, lambda p: save_file(shards[0], p, metadata={"format": "pt"}))
        written.append(SINGLE_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic(path / name, lambda p, s=shard: save_file(s, p, metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(shard, name))
            written.append(name)
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _atomic_text(path / INDEX_FILE, json.dumps(index, indent=2))
    stale = [path / SINGLE_FILE] if len(shards) > 1 else [path / INDEX_FILE]
    for old in stale:
        old.unlink(missing_ok=True)
    _atomic_text(path / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(path)


def _split(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def _atomic(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a saved model is for others to read
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_text(target: Path, text: str) -> None:
    _atomic(target, lambda p: Path(p).write_text(text))


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total parameters, parameters active per token).

    Active, as DeepSeek counts it (V3: 37B of 671B; V2-Lite: 2.4B of 15.7B): routed
    experts count ``k`` of ``E``, and the input embedding table does not count (a token
    reads one row of it) unless it is tied to the LM head, which uses all of it.
    """
    total = sum(p.numel() for p in _unique(model.parameters()))
    config: ModelConfig = model.config
    inactive = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    if config.is_moe:
        per_expert = 3 * config.hidden_size * config.moe_intermediate_size
        moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
        inactive += moe_layers * per_expert * (config.n_routed_experts - config.num_experts_per_tok)
    return total, total - inactive


def _unique(params: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    seen = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p
