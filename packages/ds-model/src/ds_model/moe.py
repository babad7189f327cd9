"""DeepSeekMoE: shared experts plus routed top-k experts, with V2's and V3's gates.

Gating (``Router``), on fp32 scores:

- ``greedy`` (V2): softmax scores, the top-k experts.
- ``group_limited_greedy`` (V2): softmax; keep the ``topk_group`` groups whose best
  expert scores highest, then the top-k experts inside them.
- ``noaux_tc`` (V3): sigmoid scores; selection uses ``scores + e_score_correction_bias``,
  groups ranked by the sum of their two best biased scores; the weights are the
  unbiased scores of the chosen experts.

Then ``norm_topk_prob`` renormalises the k weights to sum to 1 and
``routed_scaling_factor`` scales them.

Routed experts are stored stacked, ``gate_up`` (experts, 2 x moe_intermediate, hidden)
and ``down`` (experts, hidden, moe_intermediate), so a decode step gathers the chosen
experts' weights and runs two batched matmuls instead of a Python loop; large batches
loop over the experts that received tokens. Checkpoints keep DeepSeek's per-expert
keys (``experts.{e}.gate_proj.weight``...); ``ds_model.loading`` converts both ways.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds_model.config import ModelConfig
from ds_model.mlp import MLP

__all__ = ["MoE", "RoutedExperts", "Router"]

# At or below this many (token, expert) pairs, gather weights and bmm; above, loop experts.
GATHER_MAX_PAIRS = 16


class Router(nn.Module):
    """``x``: (tokens, hidden) -> weights (tokens, k) fp32, indices (tokens, k) int64."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.method, self.scoring = config.topk_method, config.scoring_func
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        if self.scoring == "softmax":
            scores = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
        if self.method == "greedy":
            weights, idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        elif self.method == "group_limited_greedy":
            group_scores = scores.view(-1, self.n_group, self.num_experts // self.n_group)
            keep = self._group_mask(group_scores.amax(dim=-1))
            masked = scores.masked_fill(~keep, 0.0)
            weights, idx = torch.topk(masked, self.top_k, dim=-1, sorted=False)
        else:  # noaux_tc
            biased = scores + self.e_score_correction_bias.float()
            grouped = biased.view(-1, self.n_group, self.num_experts // self.n_group)
            keep = self._group_mask(grouped.topk(2, dim=-1)[0].sum(dim=-1))
            idx = torch.topk(biased.masked_fill(~keep, float("-inf")), self.top_k, dim=-1)[1]
            weights = scores.gather(1, idx)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """(tokens, n_group) -> bool (tokens, experts): experts in the top groups."""
        top = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)
        per_group = self.num_experts // self.n_group
        return mask.unsqueeze(-1).expand(-1, -1, per_group).reshape(-1, self.num_experts)


class RoutedExperts(nn.Module):
    """Stacked SwiGLU experts. ``forward(x (tokens, hidden), weights, idx (tokens, k))``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if idx.numel() <= GATHER_MAX_PAIRS:
            return self._gathered(x, weights, idx)
        return self._looped(x, weights, idx)

    def _gathered(self, x, weights, idx) -> torch.Tensor:
        tokens, k = idx.shape
        flat = idx.reshape(-1)
        h = torch.bmm(self.gate_up[flat], x.repeat_interleave(k, dim=0).unsqueeze(-1))
        gate, up = h.squeeze(-1).split(self.intermediate, dim=-1)
        y = torch.bmm(self.down[flat], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        y = y.view(tokens, k, -1) * weights.unsqueeze(-1).to(y.dtype)
        return y.sum(dim=1)

    def _looped(self, x, weights, idx) -> torch.Tensor:
        out = torch.zeros_like(x)
        counts = torch.bincount(idx.reshape(-1), minlength=self.num_experts).tolist()
        order = torch.argsort(idx.reshape(-1), stable=True)
        token_of = order // idx.shape[1]
        pair_weights = weights.reshape(-1)[order].to(x.dtype)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start : start + count]
            gate, up = F.linear(x[rows], self.gate_up[expert]).split(self.intermediate, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down[expert])
            out.index_add_(0, rows, y * pair_weights[start : start + count, None])
            start += count
        return out


class MoE(nn.Module):
    """``x``: (batch, seqlen, hidden) -> same. Routed experts plus always-on shared ones."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(
            config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        )
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = MLP(
                config.hidden_size, config.moe_intermediate_size * config.n_shared_experts
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx = self.gate(flat)
        out = self.experts(flat, weights, idx).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
