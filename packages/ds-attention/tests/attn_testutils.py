"""Shared test helpers: random problems and the flash-attn error rule."""

from __future__ import annotations

import ds_attention
import torch
from ds_attention.reference import attention_reference
from ds_attention.validate import make_mask_spec


def rand_qkv(b, sq, sk, h, h_kv, d_qk, d_v, dtype, device="cpu", seed=0, requires_grad=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, sq, h, d_qk, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, sk, h_kv, d_qk, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(b, sk, h_kv, d_v, generator=g).to(device=device, dtype=dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def reference(q, k, v, upcast=True, **mask_kwargs):
    scale = mask_kwargs.pop("softmax_scale", None)
    spec = make_mask_spec(q, k, v, **mask_kwargs)
    return attention_reference(q, k, v, spec, softmax_scale=scale, upcast=upcast)


def forward_backward(fn, q, k, v, dout):
    """Returns (out, dq, dk, dv) of ``fn(q, k, v)`` against the upstream gradient dout."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout)
    return (out.detach(), *(t.grad for t in leaves))


def check_close(kernel_fn, q, k, v, mask_kwargs, dtype, atol32=1e-4, factor=2.0):
    """The flash-attn rule: in fp16/bf16 each of out, dq, dk, dv from the kernel must be
    within ``factor`` (2x) of the error of the reference in that dtype, plus flash-attn's
    floor of twice the dtype's rounding error at the values' magnitude; in fp32 within ``atol32`` of the fp32 reference."""
    g = torch.Generator(device="cpu").manual_seed(123)
    dout = torch.randn(*q.shape[:3], v.shape[-1], generator=g).to(device=q.device, dtype=dtype)

    def ref_fn(upcast):
        return lambda a, b, c: reference(a, b, c, upcast=upcast, **dict(mask_kwargs))[0]

    truth = forward_backward(ref_fn(True), q.float(), k.float(), v.float(), dout.float())
    got = forward_backward(kernel_fn, q, k, v, dout)
    names = ("out", "dq", "dk", "dv")
    if dtype == torch.float32:
        for name, a, b in zip(names, got, truth):
            err = (a.float() - b).abs().max().item() if a.numel() else 0.0
            assert err <= atol32, f"{name}: max abs error {err:.3g} > {atol32}"
        return
    low = forward_backward(ref_fn(False), q, k, v, dout)
    for name, a, lo, b in zip(names, got, low, truth):
        if not a.numel():
            continue
        err = (a.float() - b).abs().max().item()
        base = (lo.float() - b).abs().max().item()
        # flash-attn's floor: twice the rounding error of values of this size in dtype.
        b_low = b.to(dtype)
        atol = 2 * (b_low + 0.3 - 0.3 - b_low).abs().max().item()
        assert err <= factor * base + atol, (
            f"{name}: kernel error {err:.3g} > {factor} x ref error {base:.3g} + {atol:.3g}"
        )


def attn(backend, **mask_kwargs):
    return lambda q, k, v: ds_attention.attention(q, k, v, backend=backend, **mask_kwargs)
