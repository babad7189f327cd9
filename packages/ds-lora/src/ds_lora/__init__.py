"""ds-lora: exact, PEFT-compatible LoRA (and DoRA) over any linear layer, float or
quantized, with mixed-adapter batches for serving."""

from ds_lora.config import LoraConfig
from ds_lora.errors import (
    AdapterNotFoundError,
    AdapterShapeError,
    AdapterStateError,
    LoraConfigError,
    QuantizedMergeWarning,
    TargetModulesError,
)
from ds_lora.layer import LoraLinear
from ds_lora.lora_model import LoraModel, get_peft_model
from ds_lora.modules_to_save import ModulesToSaveWrapper
from ds_lora.peft_format import adapter_tensors, load_adapter, save_adapter
from ds_lora.protocol import LinearLike, MixedAdapterLayer, QuantizedLinearLike, Requantizable
from ds_lora.tuner import (
    active_adapter,
    adapter_batch,
    adapter_configs,
    adapter_names,
    adapter_rows,
    delete_adapter,
    disable_adapters,
    inject,
    merge_adapter,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge_adapter,
)

__version__ = "0.2.0"

__all__ = [
    "AdapterNotFoundError",
    "AdapterShapeError",
    "AdapterStateError",
    "LinearLike",
    "LoraConfig",
    "LoraConfigError",
    "LoraLinear",
    "LoraModel",
    "MixedAdapterLayer",
    "ModulesToSaveWrapper",
    "QuantizedLinearLike",
    "QuantizedMergeWarning",
    "Requantizable",
    "TargetModulesError",
    "__version__",
    "active_adapter",
    "adapter_batch",
    "adapter_configs",
    "adapter_names",
    "adapter_rows",
    "adapter_tensors",
    "delete_adapter",
    "disable_adapters",
    "get_peft_model",
    "inject",
    "load_adapter",
    "merge_adapter",
    "merge_and_unload",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge_adapter",
]
