"""Exceptions and warnings of ds-lora. Each names the argument, the value and what is allowed."""

from __future__ import annotations


class LoraConfigError(ValueError):
    """A ``LoraConfig`` field (or an ``adapter_config.json`` entry) holds a value not allowed."""


class TargetModulesError(ValueError):
    """``target_modules`` matched nothing (the message lists the module names that exist), or
    matched a module LoRA cannot wrap."""


class AdapterNotFoundError(KeyError):
    """An adapter name that the model does not carry. The message lists the names it does."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


class AdapterShapeError(ValueError):
    """A saved adapter tensor does not fit the model: names the key and both shapes."""


class AdapterStateError(ValueError):
    """An operation that the current adapter state forbids (e.g. a mixed batch while merged)."""


class QuantizedMergeWarning(UserWarning):
    """Merging into (or unmerging from) a quantized base re-quantizes the weight, so the merged
    model differs from base + adapter by the quantization error."""
