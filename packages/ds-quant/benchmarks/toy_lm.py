"""A tiny byte-level causal transformer trained on local text, for quantization
experiments while the project's default model does not exist. Not a real model: its
numbers are labelled "toy" wherever they appear.

Corpus: the Python standard library's own ``.py`` sources on this machine (nothing is
downloaded); files are split by name into train and held-out sets.
"""

from __future__ import annotations

import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.RMSNorm(d)
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (
            p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class ToyLM(nn.Module):
    """(batch, seq) byte ids -> (batch, seq, 256) logits."""

    def __init__(self, d: int = 256, layers: int = 4, heads: int = 4, hidden: int = 768) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.blocks = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, 256, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def corpus(max_bytes: int = 3_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held_out) uint8 byte streams from the stdlib sources; every 10th file
    (by sorted name) is held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, held = bytearray(), bytearray()
    for i, path in enumerate(files):
        target = held if i % 10 == 0 else train
        if len(target) < max_bytes:
            target += path.read_bytes()
    return (
        torch.frombuffer(train, dtype=torch.uint8).long(),
        torch.frombuffer(held, dtype=torch.uint8).long(),
    )


def batches(data: torch.Tensor, batch: int, seq: int, count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (count, batch), generator=g)
    return [torch.stack([data[s : s + seq + 1] for s in row.tolist()]) for row in starts]


def train(steps: int = 300, batch: int = 16, seq: int = 128, seed: int = 0) -> ToyLM:
    torch.manual_seed(seed)
    data, _ = corpus()
    model = ToyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    start = time.perf_counter()
    for step, chunk in enumerate(batches(data, batch, seq, steps, seed)):
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")
    return model.eval()


@torch.no_grad()
def perplexity(model: nn.Module, windows: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for chunk in windows:
        logits = model(chunk[:, :-1]).float()
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += chunk[:, 1:].numel()
    return math.exp(total / count)
