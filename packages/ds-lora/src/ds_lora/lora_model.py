"""``LoraModel``: what ``get_peft_model`` returns, a thin ``nn.Module`` around the adapted
model with PEFT's method names. Every method is one of the model-level functions in
``ds_lora.tuner`` / ``ds_lora.peft_format``, which also work on the bare model."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from torch import nn

from ds_lora import peft_format, tuner
from ds_lora.config import LoraConfig


class LoraModel(nn.Module):
    """The adapted model is ``self.model`` (modified in place); attribute lookups that
    ``LoraModel`` does not answer fall through to it, as with PEFT's ``PeftModel``."""

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.model = tuner.inject(model, config, adapter_name)

    def _ds_lora_inner(self) -> nn.Module:
        return self.model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # --- adapters --------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return tuner.adapter_configs(self.model)

    @property
    def active_adapter(self) -> str | None:
        return tuner.active_adapter(self.model)

    @property
    def adapter_names(self) -> list[str]:
        return tuner.adapter_names(self.model)

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        tuner.inject(self.model, config, adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        tuner.set_adapter(self.model, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        tuner.delete_adapter(self.model, adapter_name)

    def disable_adapter(self) -> AbstractContextManager[None]:
        """``with model.disable_adapter(): ...`` runs the base model (PEFT's name)."""
        return tuner.disable_adapters(self.model)

    def adapter_batch(self, row_adapters: Sequence[str | None]) -> AbstractContextManager[None]:
        """``with model.adapter_batch(["a", None, "b"]): model(x)``: one adapter per row."""
        return tuner.adapter_batch(self.model, row_adapters)

    # --- merging ---------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        tuner.merge_adapter(self.model, adapter_names)

    def unmerge_adapter(self) -> None:
        tuner.unmerge_adapter(self.model)

    def merge_and_unload(self, adapter_names: Sequence[str] | None = None) -> nn.Module:
        return tuner.merge_and_unload(self.model, adapter_names)

    def unload(self) -> nn.Module:
        return tuner.unload(self.model)

    def get_base_model(self) -> nn.Module:
        return self.model

    # --- parameters ------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return tuner.trainable_parameters(self.model)

    def print_trainable_parameters(self) -> None:
        tuner.print_trainable_parameters(self.model)

    def lora_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.model.parameters() if p.requires_grad)

    # --- files -----------------------------------------------------------------------------
    def save_pretrained(
        self, directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None
    ) -> None:
        """PEFT's layout: adapter ``"default"`` in ``directory``, any other in
        ``directory/<name>``."""
        names = list(selected_adapters) if selected_adapters is not None else self.adapter_names
        for name in names:
            target = Path(directory) if name == "default" else Path(directory) / name
            peft_format.save_adapter(self.model, target, name)

    def load_adapter(
        self, directory: str | os.PathLike, adapter_name: str, is_trainable: bool = False
    ) -> None:
        peft_format.load_adapter(self.model, directory, adapter_name, is_trainable)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        directory: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> LoraModel:
        """Wrap ``model`` with the adapter saved in ``directory`` (by ds-lora or PEFT)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.model = model
        peft_format.load_adapter(model, directory, adapter_name, is_trainable)
        return self


def get_peft_model(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default"
) -> LoraModel:
    """Inject ``config`` into ``model`` in place and return it wrapped as a ``LoraModel``
    (PEFT's entry point). Use ``ds_lora.inject`` to keep the bare model instead."""
    return LoraModel(model, config, adapter_name)
