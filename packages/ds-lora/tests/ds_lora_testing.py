"""Test doubles and tiny models shared by ds-lora's tests (ds-quant is not installed in
ds-lora's isolated run, so quantized bases are an INT4 double that satisfies the protocol)."""

from __future__ import annotations

import torch
from torch import nn


def quantize_int4(weight: torch.Tensor, group_size: int):
    """Asymmetric 4-bit round-to-nearest per group of ``group_size`` input columns."""
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo = w.amin(dim=-1, keepdim=True)
    hi = w.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = torch.clamp(torch.round((w - lo) / scale), 0, 15).to(torch.uint8)
    return q, scale, lo


class Int4LinearNoHook(nn.Module):
    """A minimal INT4 weight-only linear: uint8 codes + per-group scale/offset. Offers
    in_features, out_features, bias, dequantize() and a call; no way to take a new weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 8):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self._store(weight)

    def _store(self, weight: torch.Tensor) -> None:
        q, scale, lo = quantize_int4(weight, self.group_size)
        self.register_buffer("codes", q)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", lo)

    def dequantize(self) -> torch.Tensor:
        w = self.codes.float() * self.scale + self.offset
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantize().to(x.dtype), self.bias)


class Int4Linear(Int4LinearNoHook):
    """The INT4 double with the merge hook: requantize(weight) in place."""

    def requantize(self, weight: torch.Tensor) -> None:
        self._store(weight)


class Int4LinearFromFloat(Int4LinearNoHook):
    """No requantize, but a from_float(linear, config) classmethod + config (ds-quant's shape)."""

    def __init__(self, weight, bias, group_size=8):
        super().__init__(weight, bias, group_size)
        self.config = {"group_size": group_size}

    @classmethod
    def from_float(cls, linear: nn.Linear, config) -> Int4LinearFromFloat:
        return cls(linear.weight, linear.bias, config["group_size"])


def quantize_model(model: nn.Module, cls=Int4Linear, skip: tuple[str, ...] = ()) -> nn.Module:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name not in skip:
                setattr(module, child_name, cls(child.weight, child.bias))
    return model


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.v_proj(torch.tanh(self.q_proj(h)))
        return x + self.down_proj(torch.relu(self.up_proj(self.norm(x))))


class TinyModel(nn.Module):
    """(batch, seq, dim) -> (batch, seq, vocab), a stack of linear blocks and an lm_head."""

    def __init__(
        self, dim: int = 16, hidden: int = 24, layers: int = 2, vocab: int = 11, bias: bool = True
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(dim, hidden, bias) for _ in range(layers))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def randomize_adapters(
    model: nn.Module, seed: int, std: float = 0.2, only: str | None = None
) -> None:
    """Give LoRA parameters (of adapter ``only``, or all) non-zero values, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and (only is None or f".{only}." in name):
                noise = torch.randn(param.shape, generator=gen) * std
                if "magnitude" in name:
                    param.mul_(1 + noise.to(param))
                else:
                    param.copy_(noise.to(param))


class Int4LinearNoGrad(Int4Linear):
    """Like kernels without a derivative (torch's int4 CPU matmul): the forward is opaque
    to autograd, so gradients must come from ds-lora's dequantize() route."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return super().forward(x.detach())
