"""Round-to-nearest quantizers and the 4-bit packing, in plain torch.

Layouts (all row-major, one row per output channel):

- INT8 per channel: ``q`` int8 (out, in), ``scale`` float32 (out,); ``w ~ q * scale``.
- INT4 per group: ``q`` uint8 values 0..15 (out, in_padded), ``scale`` and ``zero``
  float32 (out, n_groups) with ``w ~ (q - zero) * scale``; ``in_padded`` is ``in``
  rounded up to a multiple of ``group_size`` (the padding replicates each row's last
  column, so it never widens the last group's range, and the padded columns meet zero
  activations, so they never change a result).
- Packed INT4: uint8 (out, in_padded // 2), element ``2j`` in the low nibble and
  ``2j + 1`` in the high nibble of byte ``j``.
"""

from __future__ import annotations

import torch

__all__ = [
    "dequantize_int4",
    "dequantize_int8",
    "pack_int4",
    "padded_in_features",
    "quantize_int4",
    "quantize_int8_per_channel",
    "quantize_int8_per_token",
    "unpack_int4",
]


def padded_in_features(in_features: int, group_size: int) -> int:
    """``in_features`` rounded up to a multiple of ``group_size``."""
    return -(-in_features // group_size) * group_size


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(rows, 2 * m) integers in 0..15 -> (rows, m) uint8, two values per byte."""
    if q.dim() != 2 or q.shape[-1] % 2:
        raise ValueError(
            f"pack_int4 needs a 2-D tensor with an even last dim, got {tuple(q.shape)}"
        )
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(
            f"pack_int4 values must lie in 0..15, got [{int(q.min())}, {int(q.max())}]"
        )
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(rows, m) uint8 -> (rows, 2 * m) uint8 values 0..15; the inverse of ``pack_int4``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"unpack_int4 needs a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8, one scale per row: (out, in) float -> (int8 (out, in), float32 (out,)).

    ``scale = amax(|row|) / 127`` (1.0 for an all-zero row, which then stays exactly zero).
    ``w`` may have any strides; the result is row-major, as the kernels read it.
    """
    w = w.detach().to(torch.float32).contiguous()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(out, in) int8 and (out,) scales -> (out, in) ``dtype``, computed in float32."""
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric INT8 per row of ``x`` (tokens, features):
    returns (int8 (tokens, features), float32 (tokens, 1)) with ``x ~ q * scale``."""
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(xf / scale).clamp(-127, 127).to(torch.int8), scale


def quantize_int4(
    w: torch.Tensor, group_size: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groupwise INT4 round-to-nearest.

    ``w``: (out, in) float. Returns ``q`` uint8 (out, in_padded) in 0..15, ``scale`` and
    ``zero`` float32 (out, in_padded // group_size), with ``w ~ (q - zero) * scale``.

    Asymmetric: each group's [min, max] maps onto [0, 15] with a floating zero point
    ``-min / scale`` (no rounding of the zero point, so no clamping error: every value
    is within half a step). Symmetric: [-amax, amax] with ``scale = amax / 7`` and
    zero point 8. A constant group gets scale 1 and reproduces its value exactly when it
    is an integer multiple of the scale (zeros always are).
    """
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(w.shape)}")
    out_features, in_features = w.shape
    k_pad = padded_in_features(in_features, group_size)
    w = w.detach().to(torch.float32).contiguous()  # any strides in, row-major out
    if k_pad != in_features:
        w = torch.cat((w, w[:, -1:].expand(out_features, k_pad - in_features)), dim=1)
    groups = w.view(out_features, k_pad // group_size, group_size)
    if symmetric:
        amax = groups.abs().amax(dim=-1)
        scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
        zero = torch.full_like(scale, 8.0)
        q = torch.round(groups / scale[..., None]).clamp(-8, 7) + 8
    else:
        lo = groups.amin(dim=-1)
        hi = groups.amax(dim=-1)
        spread = hi - lo
        scale = torch.where(spread > 0, spread / 15.0, torch.ones_like(spread))
        zero = -lo / scale
        q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return q.to(torch.uint8).view(out_features, k_pad), scale, zero


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed (out, in_padded // 2) uint8 + (out, groups) scale / zero -> (out, in) ``dtype``."""
    q = unpack_int4(packed).to(torch.float32)
    out_features, k_pad = q.shape
    groups = q.view(out_features, k_pad // group_size, group_size)
    w = (groups - zero.to(torch.float32)[..., None]) * scale.to(torch.float32)[..., None]
    return w.view(out_features, k_pad)[:, :in_features].to(dtype)
