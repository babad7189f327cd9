"""Rotary position embeddings: default, linear and YaRN frequencies; two layouts.

- rotate-half layout (llama): dims ``[0, d/2)`` pair with ``[d/2, d)``.
- interleaved layout (DeepSeek V2/V3): dims ``(0, 1), (2, 3), ...`` pair up. We rotate
  the even/odd slices and write the result de-interleaved (evens first, then odds);
  queries and keys get the same permutation, so every dot product is unchanged and
  the cached rope key stays contiguous.

Tables hold ``cos``/``sin`` of shape (max_position_embeddings, rope_dim / 2) in fp32,
already multiplied by YaRN's ``attention_factor`` (1.0 for the other kinds).
"""

from __future__ import annotations

import math

import torch

from ds_model.config import ModelConfig, RopeScaling

__all__ = ["apply_rotary", "inv_freq_and_attention_factor", "rope_tables"]


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, base: float, rs: RopeScaling, max_pos: int) -> tuple[torch.Tensor, float]:
    factor = rs.factor
    original = rs.original_max_position_embeddings or max_pos
    if rs.attention_factor is not None:
        attention_factor = rs.attention_factor
    elif rs.mscale and rs.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rs.mscale) / _yarn_mscale(factor, rs.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp below would divide by zero
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where a dim rotates fast enough to extrapolate unchanged
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def inv_freq_and_attention_factor(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rope_dim / 2,) and the factor cos/sin are multiplied by."""
    dim, base, rs = config.rope_dim, config.rope_theta, config.rope_scaling
    if rs is not None and rs.rope_type == "yarn":
        return _yarn(dim, base, rs, config.max_position_embeddings)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rs is not None and rs.rope_type == "linear":
        inv_freq = inv_freq / rs.factor
    return inv_freq, 1.0


def rope_tables(
    config: ModelConfig, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin``: fp32 (max_position_embeddings, rope_dim / 2)."""
    inv_freq, attention_factor = inv_freq_and_attention_factor(config)
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos() * attention_factor, freqs.sin() * attention_factor
    return cos.to(device), sin.to(device)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """Rotate ``x``: (batch, seqlen, heads, rope_dim) by ``cos``/``sin``:
    (batch, seqlen, 1, rope_dim / 2), already gathered at each token's position."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
