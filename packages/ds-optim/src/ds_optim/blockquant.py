"""Block-wise scaled integer quantization of gradients: the plain-torch ground truth.

Layout: a tensor of any shape is flattened (row-major) and zero-padded to a whole
number of blocks of ``block_size`` elements. Each block gets one scale,
``absmax(block) / qmax`` rounded *up* to the scale dtype (fp16 or bf16) so that no
code ever needs clipping, and codes are symmetric integers in ``[-qmax, qmax]``
(qmax = 7 for 4 bits, 127 for 8 bits). 4-bit codes are stored offset by 8 and packed
two per byte: element ``2i`` in the low nibble, element ``2i + 1`` in the high nibble.

A block that holds an inf or a nan gets a NaN scale, so the whole block decodes to
NaN: a non-finite gradient stays non-finite through compression and an FP16 loss
scaler still sees the overflow and skips the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "QuantizedTensor",
    "dequantize_blockwise",
    "pack_int4",
    "qmax_for_bits",
    "quantize_blockwise",
    "unpack_int4",
]

_SCALE_DTYPES = (torch.float16, torch.bfloat16)
_BITS = (4, 8)


def qmax_for_bits(bits: int) -> int:
    """Largest code magnitude: 7 for 4 bits, 127 for 8 bits (symmetric, zero is exact)."""
    if bits not in _BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed: {_BITS}")
    return (1 << (bits - 1)) - 1


def check_block_size(block_size: object) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be a positive even int, got {block_size!r}")
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even int, got {block_size}")
    return block_size


def check_scale_dtype(scale_dtype: object) -> torch.dtype:
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(
            f"scale_dtype={scale_dtype!r} is not supported; allowed: torch.float16, torch.bfloat16"
        )
    return scale_dtype  # type: ignore[return-value]


@dataclass(frozen=True)
class QuantizedTensor:
    """A compressed tensor.

    ``codes``: uint8, ``num_blocks * block_size * bits // 8`` bytes.
    ``scales``: ``scale_dtype``, ``(num_blocks,)``; NaN marks a block with non-finite input.
    ``shape`` / ``dtype``: what :func:`dequantize_blockwise` rebuilds.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    block_size: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes that travel on the wire: packed codes plus scales."""
        return self.codes.numel() + self.scales.numel() * self.scales.element_size()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed codes in ``[-8, 7]`` (any integer dtype, even length) two per byte."""
    if codes.numel() % 2:
        raise ValueError(f"pack_int4 needs an even number of codes, got {codes.numel()}")
    pairs = (codes.reshape(-1).view(torch.uint8) + 8).view(-1, 2)  # wraps mod 256: 0..15
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(n,)`` -> int8 codes ``(2n,)``."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=1).reshape(-1)


def _round_scale_up(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """fp32 positive scales -> ``scale_dtype``, never smaller than the input.

    Rounding down would push ``|x| / scale`` past qmax; rounding up costs at most one
    ulp of the scale. For positive floats the bit pattern is monotonic, so the next
    representable value up is the integer bit pattern plus one (this also lifts a
    scale that underflowed to zero onto the smallest subnormal).
    """
    rounded = scale.to(scale_dtype)
    too_small = rounded.float() < scale
    bumped = (rounded.view(torch.int16) + 1).view(scale_dtype)
    return torch.where(too_small, bumped, rounded)


def quantize_blockwise(
    x: torch.Tensor,
    *,
    bits: int = 4,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.bfloat16,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` (any shape, floating point) block-wise to ``bits``-bit codes.

    Deterministic rounding is round-to-nearest (error <= half a step, the block's
    scale). Stochastic rounding is ``floor(x / scale + u)`` with ``u ~ U[0, 1)``:
    unbiased, error < one step.
    """
    return quantize_with_error(
        x,
        bits=bits,
        block_size=block_size,
        scale_dtype=scale_dtype,
        stochastic=stochastic,
        generator=generator,
        want_error=False,
    )[0]


def quantize_with_error(
    x: torch.Tensor,
    *,
    bits: int,
    block_size: int,
    scale_dtype: torch.dtype,
    stochastic: bool,
    generator: torch.Generator | None,
    want_error: bool,
) -> tuple[QuantizedTensor, torch.Tensor | None]:
    """:func:`quantize_blockwise` plus, if ``want_error``, ``x - dequantize(q)`` in fp32
    (flat, padded; NaN in blocks with non-finite input), computed without unpacking."""
    qmax = qmax_for_bits(bits)
    check_block_size(block_size)
    check_scale_dtype(scale_dtype)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    num_blocks = max(1, -(-n // block_size))
    if num_blocks * block_size != n:
        flat = torch.nn.functional.pad(flat, (0, num_blocks * block_size - n))
    blocks = flat.view(num_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # inf or nan exactly when the block is non-finite
    finite = torch.isfinite(absmax)
    all_finite = bool(finite.all())
    if not all_finite:
        blocks = torch.where(finite[:, None], blocks, torch.zeros((), device=blocks.device))
        absmax = torch.where(finite, absmax, torch.zeros((), device=absmax.device))
    scale = _round_scale_up(absmax / qmax, scale_dtype)
    scale_f = scale.float()
    divisor = torch.where(scale_f > 0, scale_f, torch.ones((), device=scale_f.device))
    y = blocks / divisor[:, None]
    if stochastic:
        y.add_(torch.rand(y.shape, generator=generator, device=y.device, dtype=y.dtype)).floor_()
    else:
        y.round_()
    y.clamp_(-qmax, qmax)
    error = None
    if want_error:
        error = (blocks - y * scale_f[:, None]).view(-1)
    codes = y.to(torch.int8)
    if not all_finite:
        nan = torch.full((), float("nan"), dtype=scale_dtype, device=scale.device)
        scale = torch.where(finite, scale, nan)
        if error is not None:
            error = torch.where(finite.repeat_interleave(block_size), error, float("nan"))
    if not bool(torch.isfinite(scale).all()) and error is not None:  # fp16 scale overflow
        error = torch.where(
            torch.isfinite(scale).repeat_interleave(block_size), error, float("nan")
        )
    packed = pack_int4(codes) if bits == 4 else codes.view(-1).view(torch.uint8)
    return QuantizedTensor(packed, scale, x.shape, x.dtype, bits, block_size), error


def dequantize_blockwise(
    q: QuantizedTensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Rebuild the tensor of ``q.shape`` in ``out_dtype`` (default: the original dtype)."""
    codes = unpack_int4(q.codes) if q.bits == 4 else q.codes.view(torch.int8)
    blocks = codes.view(-1, q.block_size).float() * q.scales.float()[:, None]
    flat = blocks.reshape(-1)[: q.numel]
    return flat.view(q.shape).to(out_dtype or q.dtype)
