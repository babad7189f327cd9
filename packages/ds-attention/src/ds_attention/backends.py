"""The three AttentionBackend implementations and the choice between them."""

from __future__ import annotations

import os
from typing import Any

import torch

from ds_attention.protocol import MaskSpec
from ds_attention.reference import attention_reference
from ds_attention.sdpa import sdpa_attention

BACKEND_NAMES = ("triton", "sdpa", "reference")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _apply_cache(k: torch.Tensor, v: torch.Tensor, cache: Any | None):
    if cache is None:
        return k, v
    return cache.update(k, v)


def _prepare(q, k, v, mask_spec: MaskSpec, cache, softmax_scale):
    """The protocol's entry: append to the cache, then check the spec against the
    tensors exactly as attention() does (a hand-built MaskSpec gets no free pass)."""
    from ds_attention.validate import check_softmax_scale, make_mask_spec

    if not isinstance(mask_spec, MaskSpec):
        raise TypeError(f"mask_spec must be a MaskSpec, got {type(mask_spec).__name__}")
    k, v = _apply_cache(k, v, cache)
    cu = mask_spec.cu_seqlens_q
    if cu is not None and mask_spec.cu_seqlens_k is not None:
        cu = (cu, mask_spec.cu_seqlens_k)
    spec = make_mask_spec(
        q, k, v, causal=mask_spec.causal, window=mask_spec.window,
        block_mask=mask_spec.block_mask, block_size=mask_spec.block_size, cu_seqlens=cu,
    )  # fmt: skip
    return k, v, spec, check_softmax_scale(softmax_scale, q.shape[-1])


class ReferenceBackend:
    """Explicit masks in float32: slow, exact, runs anywhere."""

    name = "reference"

    def run(self, q, k, v, spec: MaskSpec, scale: float, return_lse: bool):
        out, lse = attention_reference(q, k, v, spec, softmax_scale=scale, upcast=True)
        return out, lse

    def forward(self, q, k, v, *, mask_spec: MaskSpec, cache=None, softmax_scale=None):
        k, v, spec, scale = _prepare(q, k, v, mask_spec, cache, softmax_scale)
        return self.run(q, k, v, spec, scale, False)[0]


class SDPABackend:
    """torch's scaled_dot_product_attention; a mask only where the pattern needs one."""

    name = "sdpa"

    def run(self, q, k, v, spec: MaskSpec, scale: float, return_lse: bool):
        out = sdpa_attention(q, k, v, spec, scale)
        lse = None
        if return_lse:
            # SDPA does not expose its log-sum-exp; recompute it from explicit scores.
            with torch.no_grad():
                lse = attention_reference(q, k, v, spec, softmax_scale=scale)[1]
        return out, lse

    def forward(self, q, k, v, *, mask_spec: MaskSpec, cache=None, softmax_scale=None):
        k, v, spec, scale = _prepare(q, k, v, mask_spec, cache, softmax_scale)
        return self.run(q, k, v, spec, scale, False)[0]


class TritonBackend:
    """The flash-attention kernel family in ``ds_attention.kernels`` (forward + backward)."""

    name = "triton"

    def run(self, q, k, v, spec: MaskSpec, scale: float, return_lse: bool):
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package: pip install triton")
        if q.device.type != "cuda" and not interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {q.device}) or "
                "TRITON_INTERPRET=1 set before triton is imported"
            )
        from ds_attention.kernels.flash import flash_attention

        return flash_attention(q, k, v, spec, scale)

    def forward(self, q, k, v, *, mask_spec: MaskSpec, cache=None, softmax_scale=None):
        k, v, spec, scale = _prepare(q, k, v, mask_spec, cache, softmax_scale)
        return self.run(q, k, v, spec, scale, False)[0]


_BACKENDS = {"triton": TritonBackend(), "sdpa": SDPABackend(), "reference": ReferenceBackend()}


def get_backend(name: str | None, device: torch.device):
    """``None`` picks Triton for CUDA tensors (when triton is installed), else SDPA."""
    if name is None:
        name = "triton" if device.type == "cuda" and triton_available() else "sdpa"
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or None, got {name!r}")
    return _BACKENDS[name]
