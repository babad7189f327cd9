"""The stable interface of ds-optim's gradient compression."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class GradientCompressor(Protocol):
    """Turns a gradient into a smaller payload and back.

    Stateful: with error feedback, what was lost when compressing a tensor under
    ``key`` is added back the next time that key is compressed. Usable inside a DDP
    communication hook (``key`` is then the bucket index).
    """

    def compress(self, tensor: torch.Tensor, key: Any = None) -> Any:
        """Return a payload (packed codes plus scales) for ``tensor``."""
        ...

    def decompress(self, payload: Any) -> torch.Tensor:
        """Rebuild a tensor of the original shape and dtype from ``payload``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
