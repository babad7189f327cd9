"""Tensor- and expert-parallel inference: one model split across the ranks of a group.

The plan is Megatron's, as vLLM applies it to DeepSeek models:

- attention: the query, key and value projections are split column-wise by head and
  the output projection row-wise, so each rank runs its own heads. MLA keeps its
  latent projections (``q_a_proj``, ``kv_a_proj_with_mqa`` and their norms) whole on
  every rank, so every rank caches the whole latent (one per token, shared by all
  heads); its per-head projections (``q_proj`` / ``q_b_proj``, ``kv_b_proj``) are
  split by head and ``o_proj`` row-wise. A llama model's ranks cache only their own
  key/value heads.
- dense MLPs and shared experts: ``gate_proj``/``up_proj`` column-wise, ``down_proj``
  row-wise.
- routed experts: split by expert, each rank holding a contiguous range; the router
  is whole on every rank, so all compute the same routing and each runs its experts
  on the tokens routed to them.
- embeddings, norms, routers and the LM head: whole on every rank (replicated), so
  every rank has whole logits and sampling needs no gather. At DeepSeek-V3's
  vocabulary this costs 2 x 129280 x 7168 values per rank, which a vocabulary split
  would divide.

Each rank's attention and MLP/MoE outputs are partial sums; one all-reduce after each
(two per layer) makes them whole. A row-parallel bias is kept on rank 0 only, so the
sum adds it once. Sharding copies the kept slices, so the whole weights are freed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ds_model.config import ModelConfig
from ds_model.mla import MLAttention
from ds_model.mlp import MLP
from ds_model.moe import MoE, RoutedExperts

__all__ = [
    "ExpertShard",
    "allowed_tensor_parallel_sizes",
    "check_tensor_parallel_size",
    "shard_model",
]


def allowed_tensor_parallel_sizes(config: ModelConfig) -> list[int]:
    """The sizes ``config`` splits evenly into: divisors of the attention heads (and
    key/value heads), of the dense MLP's and the shared experts' intermediate sizes."""
    return [size for size in range(1, config.num_attention_heads + 1) if not _uneven(config, size)]


def _uneven(config: ModelConfig, size: int) -> list[str]:
    """What ``size`` does not divide, as ``name=value`` strings."""
    sizes = {"num_attention_heads": config.num_attention_heads}
    if not config.is_mla:
        sizes["num_key_value_heads"] = config.num_key_value_heads
    if any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        sizes["intermediate_size"] = config.intermediate_size
    if config.is_moe and config.n_shared_experts:
        shared = config.moe_intermediate_size * config.n_shared_experts
        sizes["moe_intermediate_size x n_shared_experts"] = shared
    return [f"{name}={value}" for name, value in sizes.items() if value % size]


def check_tensor_parallel_size(config: ModelConfig, size: Any) -> None:
    """A clear error for a ``tensor_parallel_size`` the model cannot be split into."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {size!r}")
    uneven = _uneven(config, size)
    if uneven:
        allowed = ", ".join(map(str, allowed_tensor_parallel_sizes(config)))
        raise ValueError(
            f"tensor_parallel_size={size} does not divide the model's {', '.join(uneven)}; "
            f"allowed sizes for this model: {allowed}"
        )


def shard_model(model: Any, rank: int, world_size: int, group: Any = None) -> Any:
    """Keep rank ``rank``'s shard of ``model`` (a ``DeepSeekForCausalLM``) in place and
    make its layers all-reduce their outputs over ``group`` (torch.distributed; None:
    the default group). Every rank must call it with the same whole model. The model's
    ``config`` becomes the rank's own (its share of the heads), so a ``ModelRunner``
    built over it sizes the rank's KV pool. Returns ``model``.

    Plain ``nn.Linear`` projections only: a LoRA-wrapped or quantized model is refused
    (quantize or attach adapters after sharding is not supported either)."""
    config: ModelConfig = model.config
    check_tensor_parallel_size(config, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size})")
    if world_size == 1:
        return model
    reduce = _AllReduce(group)
    for layer in model.model.layers:
        if isinstance(layer.self_attn, MLAttention):
            _shard_mla(layer.self_attn, rank, world_size)
        else:
            _shard_attention(layer.self_attn, rank, world_size)
        if isinstance(layer.mlp, MoE):
            _shard_moe(layer.mlp, rank, world_size)
        else:
            _shard_mlp(layer.mlp, rank, world_size)
        layer.self_attn.register_forward_hook(reduce)
        layer.mlp.register_forward_hook(reduce)
    heads = config.num_attention_heads // world_size
    kv_heads = config.num_key_value_heads // world_size if not config.is_mla else heads
    local = dataclasses.replace(config, num_attention_heads=heads, num_key_value_heads=kv_heads)
    model.config = model.model.config = local
    return model


class _AllReduce:
    """A forward hook summing a module's output over the group, in place."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=self.group)
        return output


class ExpertShard(RoutedExperts):
    """The routed experts ``[first, first + len(self))`` of a MoE whose experts are
    split across ranks. ``forward`` takes the router's global expert indices and returns
    this rank's part of the routed sum: the other ranks' experts contribute zero here."""

    def __init__(self, experts: list[MLP], first: int) -> None:
        nn.ModuleList.__init__(self, experts)
        self.first = first

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.first
        token, slot = ((local >= 0) & (local < len(self))).nonzero(as_tuple=True)
        out = torch.zeros_like(x)
        if token.numel():
            # One (token, expert) pair per row: the routed sum of k=1 over this rank's pairs.
            pairs = super().forward(x[token], weights[token, slot, None], local[token, slot, None])
            out.index_add_(0, token, pairs)
        return out


def _shard_attention(attn: nn.Module, rank: int, world: int) -> None:
    heads, kv_heads = attn.num_heads // world, attn.num_kv_heads // world
    d = attn.head_dim
    _keep_rows(attn.q_proj, rank * heads * d, heads * d)
    _keep_rows(attn.k_proj, rank * kv_heads * d, kv_heads * d)
    _keep_rows(attn.v_proj, rank * kv_heads * d, kv_heads * d)
    _keep_columns(attn.o_proj, rank * heads * d, heads * d, keep_bias=rank == 0)
    attn.num_heads, attn.num_kv_heads = heads, kv_heads


def _shard_mla(attn: MLAttention, rank: int, world: int) -> None:
    heads = attn.num_heads // world
    q_proj = attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj
    _keep_rows(q_proj, rank * heads * attn.qk_dim, heads * attn.qk_dim)
    per_head = attn.nope_dim + attn.v_dim
    _keep_rows(attn.kv_b_proj, rank * heads * per_head, heads * per_head)
    _keep_columns(attn.o_proj, rank * heads * attn.v_dim, heads * attn.v_dim, keep_bias=rank == 0)
    attn.num_heads = heads


def _shard_mlp(mlp: MLP, rank: int, world: int) -> None:
    inter = mlp.gate_proj.out_features // world
    _keep_rows(mlp.gate_proj, rank * inter, inter)
    _keep_rows(mlp.up_proj, rank * inter, inter)
    _keep_columns(mlp.down_proj, rank * inter, inter, keep_bias=rank == 0)


def _shard_moe(moe: MoE, rank: int, world: int) -> None:
    total = len(moe.experts)
    first, end = rank * total // world, (rank + 1) * total // world
    moe.experts = ExpertShard(list(moe.experts)[first:end], first)
    if moe.shared_experts is not None:
        _shard_mlp(moe.shared_experts, rank, world)


def _keep_rows(linear: nn.Module, start: int, count: int) -> None:
    """Column parallel: keep output features ``[start, start + count)``."""
    _plain(linear)
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight[start : start + count].clone(), False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias[start : start + count].clone(), False)
    linear.out_features = count


def _keep_columns(linear: nn.Module, start: int, count: int, keep_bias: bool) -> None:
    """Row parallel: keep input features ``[start, start + count)``."""
    _plain(linear)
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight[:, start : start + count].clone(), False)
        if linear.bias is not None and not keep_bias:
            linear.bias = None
    linear.in_features = count


def _plain(linear: nn.Module) -> None:
    if type(linear) is not nn.Linear:
        raise TypeError(
            f"tensor parallelism splits plain nn.Linear layers; got {type(linear).__name__} "
            "(LoRA adapters and quantization are not supported with tensor_parallel_size > 1)"
        )
