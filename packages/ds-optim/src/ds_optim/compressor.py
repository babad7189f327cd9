"""Stateful gradient compressors: block-wise 4-bit and 8-bit with error feedback.

Error feedback (as in 1-bit Adam and PowerSGD): what quantization dropped from the
tensor compressed under ``key`` is kept as a residual and added to the next tensor
compressed under the same key, so over T steps the sum of what was transmitted stays
within one quantization step of the true sum instead of drifting by T half-steps.
Residuals are fp32, whatever the gradient dtype.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch

from ds_optim.blockquant import (
    QuantizedTensor,
    check_block_size,
    check_scale_dtype,
    dequantize_blockwise,
    quantize_with_error,
)

__all__ = ["BlockwiseGradientCompressor", "Int4GradientCompressor", "Int8GradientCompressor"]


class BlockwiseGradientCompressor:
    """Block-wise scaled integer compressor; satisfies ``ds_optim.GradientCompressor``.

    ``key`` names the stream a tensor belongs to (a DDP bucket index, a parameter
    name); each key has its own error-feedback residual. When a key's tensor changes
    size (DDP rebuilds its buckets after the first iteration) the stale residual is
    dropped, as PowerSGD does.

    A block whose input (gradient plus residual) is non-finite decodes to NaN and
    leaves that block's residual untouched, so one overflowing step that a loss
    scaler skips does not poison the residuals of the steps after it.
    """

    bits: ClassVar[int]

    def __init__(
        self,
        block_size: int = 128,
        stochastic_rounding: bool = True,
        error_feedback: bool = True,
        *,
        scale_dtype: torch.dtype = torch.bfloat16,
        seed: int = 0,
    ) -> None:
        self.block_size = check_block_size(block_size)
        self.scale_dtype = check_scale_dtype(scale_dtype)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.error_feedback = bool(error_feedback)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.residuals: dict[Any, torch.Tensor] = {}
        self._generators: dict[str, torch.Generator] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(block_size={self.block_size}, "
            f"stochastic_rounding={self.stochastic_rounding}, "
            f"error_feedback={self.error_feedback}, scale_dtype={self.scale_dtype})"
        )

    def _generator(self, device: torch.device) -> torch.Generator:
        name = str(device)
        gen = self._generators.get(name)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[name] = gen
        return gen

    def compress(self, tensor: torch.Tensor, key: Any = None) -> QuantizedTensor:
        """Quantize ``tensor`` (any shape; fp32/bf16/fp16) plus the residual of ``key``."""
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"tensor must be a floating-point torch.Tensor, got {type(tensor)!r}")
        x = tensor.detach().float()
        residual = self.residuals.get(key) if self.error_feedback else None
        if residual is not None and (residual.shape != x.shape or residual.device != x.device):
            residual = None
        if residual is not None:
            x = x + residual
        q, error = quantize_with_error(
            x,
            bits=self.bits,
            block_size=self.block_size,
            scale_dtype=self.scale_dtype,
            stochastic=self.stochastic_rounding,
            generator=self._generator(x.device) if self.stochastic_rounding else None,
            want_error=self.error_feedback,
        )
        if error is not None:
            new_residual = error[: x.numel()].view(x.shape)
            keep = torch.isnan(new_residual)  # blocks that decode to NaN: keep the old residual
            if bool(keep.any()):
                old = residual if residual is not None else torch.zeros_like(x)
                new_residual = torch.where(keep, old, new_residual)
            self.residuals[key] = new_residual
        return QuantizedTensor(q.codes, q.scales, tensor.shape, tensor.dtype, q.bits, q.block_size)

    def decompress(self, payload: QuantizedTensor) -> torch.Tensor:
        """Rebuild the tensor (original shape and dtype) from ``payload``."""
        if not isinstance(payload, QuantizedTensor):
            raise TypeError(f"payload must be a QuantizedTensor, got {type(payload)!r}")
        if payload.bits != self.bits:
            raise ValueError(f"payload has bits={payload.bits}, this compressor is {self.bits}-bit")
        return dequantize_blockwise(payload)

    def reset(self) -> None:
        """Drop every residual (e.g. after the model's parameters were reloaded)."""
        self.residuals.clear()

    def state_dict(self) -> dict[str, Any]:
        """Config, residuals and RNG states: enough to resume bit-exactly."""
        return {
            "bits": self.bits,
            "block_size": self.block_size,
            "scale_dtype": str(self.scale_dtype).removeprefix("torch."),
            "stochastic_rounding": self.stochastic_rounding,
            "error_feedback": self.error_feedback,
            "seed": self.seed,
            "residuals": {k: v.detach().clone() for k, v in self.residuals.items()},
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("bits") != self.bits:
            raise ValueError(
                f"state_dict is for a {state.get('bits')}-bit compressor, this one is {self.bits}-bit"
            )
        self.block_size = check_block_size(state["block_size"])
        self.scale_dtype = check_scale_dtype(getattr(torch, state["scale_dtype"]))
        self.stochastic_rounding = bool(state["stochastic_rounding"])
        self.error_feedback = bool(state["error_feedback"])
        self.seed = int(state["seed"])
        self.residuals = {k: v.clone() for k, v in state["residuals"].items()}
        self._generators = {}
        for name, gen_state in state["generators"].items():
            self._generator(torch.device(name)).set_state(gen_state)

    # torch.Generator does not pickle; travel as state_dict (DDP hook states are pickled).
    def __getstate__(self) -> dict[str, Any]:
        return {"state": self.state_dict()}

    def __setstate__(self, pickled: dict[str, Any]) -> None:
        state = pickled["state"]
        self.__init__(  # type: ignore[misc]
            state["block_size"],
            state["stochastic_rounding"],
            state["error_feedback"],
            scale_dtype=getattr(torch, state["scale_dtype"]),
            seed=state["seed"],
        )
        self.load_state_dict(copy.copy(state))


class Int4GradientCompressor(BlockwiseGradientCompressor):
    """4-bit codes in [-7, 7], two per byte, one fp16/bf16 scale per block.

    With ``block_size=128`` and bf16 scales a block costs 64 + 2 bytes instead of
    512: 7.76x smaller than fp32.
    """

    bits = 4


class Int8GradientCompressor(BlockwiseGradientCompressor):
    """8-bit codes in [-127, 127], one fp16/bf16 scale per block (3.9x smaller than fp32)."""

    bits = 8
