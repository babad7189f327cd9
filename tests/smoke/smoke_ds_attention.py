"""Smoke test run in a fresh venv that holds only the ds-attention wheel (and torch).

A toy language model built only from ds_attention modules trains one step on CPU: the
loss is finite and every parameter receives a finite gradient.
"""

import importlib.metadata

import ds_attention
import torch
from ds_attention import Attention, DynamicAttention, NativeSparseAttention, SparseAttention
from torch import nn

requires = importlib.metadata.requires("ds-attention") or []
assert not any(r.startswith("ds-") for r in requires), f"ds-attention depends on {requires}"
assert "site-packages" in ds_attention.__file__, ds_attention.__file__


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = mixer

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class ToyLM(nn.Module):
    def __init__(self, vocab=97, dim=64, heads=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(
            Block(Attention(dim, heads, num_kv_heads=2), dim),
            Block(SparseAttention(dim, heads, sparse_ratio=0.5, block_size=16), dim),
            Block(DynamicAttention(dim, heads=heads, window="dynamic"), dim),
            Block(
                NativeSparseAttention(dim, heads, 2, block_size=16, num_selected=2, window=16), dim
            ),
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.head(self.blocks(self.embed(ids)))


torch.manual_seed(0)
model = ToyLM()
ids = torch.randint(0, 97, (2, 65))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
logits = model(ids[:, :-1])
loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
loss.backward()
assert torch.isfinite(loss), loss
missing = [
    n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
]
assert not missing, f"parameters without a finite gradient: {missing}"
before = [p.detach().clone() for p in model.parameters()]
opt.step()
changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
assert changed == len(before), f"only {changed} of {len(before)} parameters moved"
print(f"ds-attention {ds_attention.__version__} wheel trains a toy model: loss {loss.item():.3f}")
