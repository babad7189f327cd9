"""``ModulesToSaveWrapper``: a module trained in full, as one copy per adapter (PEFT's
``modules_to_save``, with the same names: ``original_module``, ``modules_to_save.<adapter>``)."""

from __future__ import annotations

import copy

from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """Runs the active adapter's copy of the module, or the original when none is active."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def active_module(self) -> nn.Module:
        name = self.active_adapter
        if self.disabled or name is None or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)
