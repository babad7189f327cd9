"""DeepSeek-V3 FP8 block weights: ``weight`` (float8_e4m3fn, (out, in)) and
``weight_scale_inv`` (float32, (ceil(out / 128), ceil(in / 128))).

The real weight is ``weight.float() * weight_scale_inv[i // 128, j // 128]``: the name
"scale_inv" is DeepSeek's (the quantizer divided by the scale), but as stored it is the
multiplier. Edge blocks may be partial when a dimension is not a multiple of the block.
"""

from __future__ import annotations

import torch

__all__ = ["FP8_DTYPE", "FP8_MAX", "dequantize_fp8_block", "quantize_fp8_block"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    if (
        not isinstance(block, tuple | list)
        or len(block) != 2
        or not all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise ValueError(f"block_size must be two positive ints (rows, cols), got {block!r}")
    return int(block[0]), int(block[1])


def _expected_scale_shape(shape: torch.Size, block: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def _expand_blocks(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """(ceil(out/br), ceil(in/bc)) per-block values -> (out, in), edge blocks cropped."""
    full = scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[: shape[0], : shape[1]]


def dequantize_fp8_block(
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The real weight of a DeepSeek-V3 FP8 linear, as ``dtype``.

    ``weight``: (out, in) float8_e4m3fn (any float dtype is accepted, e.g. after a
    cast). ``weight_scale_inv``: (ceil(out / block_size[0]), ceil(in / block_size[1])),
    float32. Returns (out, in) = ``weight * weight_scale_inv`` per block, computed in
    float32 and cast once to ``dtype``.
    """
    block = _check_block(block_size)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if not (weight.dtype == FP8_DTYPE or weight.is_floating_point()):
        raise TypeError(f"weight must be float8_e4m3fn (or a float dtype), got {weight.dtype}")
    expected = _expected_scale_shape(weight.shape, block)
    if tuple(weight_scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv must have shape {expected} for weight {tuple(weight.shape)} "
            f"and block_size {block}, got {tuple(weight_scale_inv.shape)}"
        )
    rows, cols = weight.shape
    n_r, n_c = expected
    w = weight.to(torch.float32)
    if rows != n_r * block[0] or cols != n_c * block[1]:  # partial edge blocks
        w = torch.nn.functional.pad(w, (0, n_c * block[1] - cols, 0, n_r * block[0] - rows))
    tiles = (
        w.view(n_r, block[0], n_c, block[1]) * weight_scale_inv.to(torch.float32)[:, None, :, None]
    )
    return tiles.view(n_r * block[0], n_c * block[1])[:rows, :cols].to(dtype)


def quantize_fp8_block(
    weight: torch.Tensor, block_size: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float (out, in) weight to DeepSeek-V3's format.

    Returns ``(weight_fp8, weight_scale_inv)``: (out, in) float8_e4m3fn and
    (ceil(out / br), ceil(in / bc)) float32 with ``weight_scale_inv = amax(block) / 448``
    (1.0 for an all-zero block, so zeros stay exact).
    """
    block = _check_block(block_size)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 2-D float tensor, got {weight.dtype} {tuple(weight.shape)}"
        )
    rows, cols = weight.shape
    n_r, n_c = _expected_scale_shape(weight.shape, block)
    w = weight.detach().to(torch.float32).contiguous()  # any strides in, row-major out
    padded = torch.zeros(n_r * block[0], n_c * block[1], dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w
    tiles = padded.view(n_r, block[0], n_c, block[1])
    amax = tiles.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand_blocks(scale_inv, weight.shape, block)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(FP8_DTYPE), scale_inv
