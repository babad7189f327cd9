"""Model-level operations: inject adapters in place, pick the active one, merge, unload,
and mixed-adapter batches. Every function takes any ``nn.Module`` (a ``LoraModel`` is
unwrapped), so a model that owns its LoRA layers (ds-model) needs no wrapper object."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ds_lora.config import LoraConfig
from ds_lora.errors import AdapterNotFoundError, AdapterStateError, TargetModulesError
from ds_lora.layer import LoraLinear
from ds_lora.mixed import plan_rows
from ds_lora.modules_to_save import ModulesToSaveWrapper
from ds_lora.targeting import find_modules_to_save, find_targets, iter_modules

_CONFIGS = "_ds_lora_configs"


def unwrap(model: nn.Module) -> nn.Module:
    """The model that carries the adapters (``LoraModel.model`` or the module itself)."""
    inner = getattr(model, "_ds_lora_inner", None)
    return inner() if callable(inner) else model


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """``{adapter name: LoraConfig}`` in the order the adapters were added."""
    return unwrap(model).__dict__.setdefault(_CONFIGS, {})


def adapter_names(model: nn.Module) -> list[str]:
    return list(adapter_configs(model))


def _require(model: nn.Module, name: str) -> LoraConfig:
    configs = adapter_configs(model)
    if name not in configs:
        raise AdapterNotFoundError(
            f"adapter_name={name!r} is not on this model; its adapters are {list(configs)}"
        )
    return configs[name]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, module in iter_modules(unwrap(model)):
        if isinstance(module, LoraLinear):
            yield name, module


def _wrappers(model: nn.Module) -> Iterator[LoraLinear | ModulesToSaveWrapper]:
    for _, module in iter_modules(unwrap(model)):
        if isinstance(module, LoraLinear | ModulesToSaveWrapper):
            yield module


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place and return ``model``.

    Each module ``config.target_modules`` selects is replaced by a ``LoraLinear`` around it
    (or gains the adapter if it is one already); ``modules_to_save`` get a per-adapter copy.
    The first adapter becomes active, and only its parameters train (see ``set_adapter``);
    a later one is added frozen and inactive, as PEFT does.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a ds_lora.LoraConfig, got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(
            f"adapter_name must be a non-empty str without '.', got adapter_name={adapter_name!r}"
        )
    root = unwrap(model)
    configs = adapter_configs(root)
    if adapter_name in configs:
        raise AdapterStateError(
            f"adapter_name={adapter_name!r} already exists; adapters are {list(configs)}"
        )
    targets = find_targets(root, config)
    saved = find_modules_to_save(root, config.modules_to_save) if config.modules_to_save else []
    overlap = set(targets) & set(saved)
    if overlap:
        raise TargetModulesError(
            f"modules {sorted(overlap)} are both LoRA targets and modules_to_save; pick one"
        )
    for name in targets:
        module = root.get_submodule(name)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            _replace(root, name, module)
        module.add_adapter(adapter_name, config)
    for name in saved:
        module = root.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            _replace(root, name, module)
        module.add_adapter(adapter_name)
    configs[adapter_name] = config
    active = active_adapter(root)
    set_adapter(root, adapter_name if active is None else active)
    return model


def active_adapter(model: nn.Module) -> str | None:
    return unwrap(model).__dict__.get("_ds_lora_active")


def frozen_adapters(model: nn.Module) -> set[str]:
    """Adapters loaded for inference (``load_adapter(..., is_trainable=False)``): they never
    get ``requires_grad=True``, even when active."""
    return unwrap(model).__dict__.setdefault("_ds_lora_frozen", set())


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the adapter the forward uses, and the only one that trains: every
    other parameter gets ``requires_grad=False`` except the biases its ``bias`` setting opens.
    An adapter loaded for inference stays frozen."""
    config = _require(model, adapter_name)
    root = unwrap(model)
    root.__dict__["_ds_lora_active"] = adapter_name
    for module in _wrappers(root):
        module.active_adapter = adapter_name
    for param in root.parameters():
        param.requires_grad_(False)
    if adapter_name in frozen_adapters(root):
        return
    for _, module in iter_modules(root):
        if isinstance(module, LoraLinear) and adapter_name in module.lora_A:
            for table in (module.lora_A, module.lora_B, module.lora_magnitude_vector):
                if adapter_name in table:
                    table[adapter_name].requires_grad_(True)
            bias = getattr(module.base_layer, "bias", None)
            if config.bias == "lora_only" and isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            module.modules_to_save[adapter_name].requires_grad_(True)
    if config.bias == "all":
        for _, param in bias_parameters(root):
            param.requires_grad_(True)


def bias_parameters(root: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Base-model biases (``bias="all"``), outside LoRA internals and modules_to_save copies."""
    found = []
    for name, param in root.named_parameters():
        parts = name.split(".")
        if parts[-1] != "bias" or "lora_A" in parts or "lora_B" in parts:
            continue
        if "modules_to_save" in parts or "original_module" in parts:
            continue
        found.append((name, param))
    return found


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter. Layers left without adapters are unwrapped back to their base."""
    _require(model, adapter_name)
    root = unwrap(model)
    for name, module in list(iter_modules(root)):
        if isinstance(module, LoraLinear) and adapter_name in module.lora_A:
            module.delete_adapter(adapter_name)
            if not module.adapter_names:
                _replace(root, name, module.base_layer)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            module.delete_adapter(adapter_name)
            if not len(module.modules_to_save):
                _replace(root, name, module.original_module)
    configs = adapter_configs(root)
    del configs[adapter_name]
    frozen_adapters(root).discard(adapter_name)
    if active_adapter(root) == adapter_name:
        root.__dict__["_ds_lora_active"] = None
        if configs:
            set_adapter(root, next(iter(configs)))


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes as its base. Refused while an adapter is merged
    (the base weight then holds it; unmerge first)."""
    wrappers = list(_wrappers(model))
    merged = sorted({n for m in wrappers if isinstance(m, LoraLinear) for n in m.merged_adapters})
    if merged:
        raise AdapterStateError(f"adapters {merged} are merged; unmerge before disabling")
    for module in wrappers:
        module.disabled = True
    try:
        yield
    finally:
        for module in wrappers:
            module.disabled = False


def merge_adapter(model: nn.Module, adapter_names: Sequence[str] | None = None) -> None:
    """Fold adapters (default: the active one) into the base weights. A quantized base is
    dequantized, updated and re-quantized through its ``requantize(weight)``, with a
    ``QuantizedMergeWarning``. modules_to_save copies are not merged: they stay in use."""
    names = _names_or_active(model, adapter_names)
    for _, layer in lora_layers(model):
        layer.merge(names)


def unmerge_adapter(model: nn.Module) -> None:
    """Restore the base weights (exact up to float rounding on a float base)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def _names_or_active(model: nn.Module, adapter_names: Sequence[str] | None) -> list[str]:
    if adapter_names is None:
        active = active_adapter(model)
        if active is None:
            raise AdapterStateError("no adapter is active; pass adapter_names")
        return [active]
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    for name in adapter_names:
        _require(model, name)
    return list(adapter_names)


def unload(model: nn.Module, merge: bool = False, adapter_names: Sequence[str] | None = None):
    """Take every ds-lora wrapper out and return the plain model (``merge``: fold the
    adapters in first; modules_to_save then keep the active adapter's copy)."""
    root = unwrap(model)
    if merge:
        merge_adapter(root, adapter_names)
    else:
        unmerge_adapter(root)
    for name, module in list(iter_modules(root)):
        if isinstance(module, LoraLinear):
            _replace(root, name, module.base_layer)
        elif isinstance(module, ModulesToSaveWrapper):
            keep = module.active_module() if merge else module.original_module
            _replace(root, name, keep)
    root.__dict__.pop(_CONFIGS, None)
    root.__dict__.pop("_ds_lora_active", None)
    root.__dict__.pop("_ds_lora_frozen", None)
    return root


def merge_and_unload(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Merge the active adapter (or ``adapter_names``) and return the plain model."""
    return unload(model, merge=True, adapter_names=adapter_names)


@contextlib.contextmanager
def adapter_batch(
    model: nn.Module, row_adapters: Sequence[str | None], *, only: Sequence[str] | None = None
) -> Iterator[None]:
    """For the forwards inside the block, row ``i`` of the batch uses adapter
    ``row_adapters[i]`` (``None``: the base model alone).

    ``only``: restrict this to the wrapped layers whose qualified name is, or ends with
    ``.`` plus, one of these names (as ``target_modules`` matches). Blocks nest: on exit
    each layer gets back the rows it had before, so an inner ``only=`` block can give
    a few layers different rows, e.g. MLA's ``kv_b_proj``, which a paged runner applies
    to every cached context token rather than to the step's new tokens.

    A "row" is the leading dimension of each wrapped layer's input: the batch for
    ``(batch, seq, hidden)`` inputs, the token for packed ``(tokens, hidden)`` inputs (then
    pass one entry per token). Computed with gathered low-rank matmuls
    (``ds_lora.mixed``), not a loop over rows. Serving only: refused while an adapter is
    merged, when a row's adapter has modules_to_save, or in training mode with dropout.
    """
    root = unwrap(model)
    configs = adapter_configs(root)
    vocabulary = tuple(configs)
    row_adapters = list(row_adapters)
    slot_of: dict[str | None, int] = {None: len(vocabulary)}
    # Each distinct name is checked once: a paged runner passes one row per context token.
    for name in dict.fromkeys(row_adapters):
        if name is None:
            continue
        i = row_adapters.index(name)
        if not isinstance(name, str) or name not in configs:
            raise AdapterNotFoundError(
                f"row_adapters[{i}]={name!r} is not on this model; its adapters are "
                f"{list(vocabulary)} (or None for no adapter)"
            )
        config = configs[name]
        if config.modules_to_save:
            raise AdapterStateError(
                f"row_adapters[{i}]={name!r} has modules_to_save {list(config.modules_to_save)}; "
                "a fully trained module copy cannot be mixed per row"
            )
        if root.training and config.lora_dropout > 0:
            raise AdapterStateError(
                f"row_adapters[{i}]={name!r} has lora_dropout={config.lora_dropout} and the "
                "model is in training mode; mixed batches are for inference (call model.eval())"
            )
        slot_of[name] = vocabulary.index(name)
    slots = [slot_of[name] for name in row_adapters]
    if only is not None:
        if isinstance(only, str) or not all(isinstance(o, str) for o in only):
            raise TypeError(f"only must be a list of module names (str), got {only!r}")
        only = tuple(only)
    layers = [
        layer
        for name, layer in lora_layers(root)
        if only is None or any(name == o or name.endswith("." + o) for o in only)
    ]
    if only is not None and not layers:
        wrapped = sorted({name.rsplit(".", 1)[-1] for name, _ in lora_layers(root)})
        raise ValueError(f"only={list(only)} matches no LoRA layer; wrapped layers: {wrapped}")
    device = next((p.device for p in root.parameters()), torch.device("cpu"))
    row_index = torch.tensor(slots, dtype=torch.long, device=device)
    plan = plan_rows(row_index, len(vocabulary))  # once per batch, shared by every layer
    before = [layer.row_adapters_state() for layer in layers]
    try:
        for layer in layers:
            layer.set_row_adapters(vocabulary, row_index, plan)
        yield
    finally:
        for layer, state in zip(layers, before):
            layer.set_row_adapters(*state)


@contextlib.contextmanager
def adapter_rows(module: nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Inside an ``adapter_batch`` block, for the forwards inside this one, the wrapped
    layers under ``module`` serve only the batch rows ``rows`` ((n,) int64 indices into
    the batch): their input's row ``j`` takes the adapter of batch row ``rows[j]``.

    For a model that runs a submodule on a subset of the batch's rows, such as a
    mixture-of-experts layer running each expert on the tokens routed to it. Layers
    not in a mixed-adapter batch are left alone, so this costs one pass over
    ``module``'s submodules otherwise. On exit each layer gets back its rows."""
    layers = [
        m
        for m in module.modules()
        if isinstance(m, LoraLinear) and m.row_adapters_state()[1] is not None
    ]
    before = [layer.row_adapters_state() for layer in layers]
    try:
        for layer, (names, row_index, _) in zip(layers, before):
            layer.set_row_adapters(names, row_index[rows.to(row_index.device)])
        yield
    finally:
        for layer, state in zip(layers, before):
            layer.set_row_adapters(*state)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as PEFT counts them (buffers excluded)."""
    trainable = total = 0
    for param in unwrap(model).parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
