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

Routed experts are a ``ModuleList`` of SwiGLU ``MLP`` experts, laid out as DeepSeek's
checkpoints name them (``experts.{e}.gate_proj.weight``...), so that ds-quant's
``quantize_``, ds-lora's targeting and FP8 loading reach every expert's linear layers,
as they did in transformers 4's DeepSeek models (transformers 5 fuses the experts into
two stacked tensors, which ``ds_model.loading`` splits). A decode step runs its few
(token, expert) pairs one by one; larger batches sort tokens by expert and run each hit
expert once on its rows.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ds_model import lean_backward
from ds_model.config import ModelConfig
from ds_model.mlp import MLP, plain_linear_weights

__all__ = ["MoE", "RoutedExperts", "Router", "run_experts_eagerly", "sync_free"]

# At or below this many (token, expert) pairs, loop over pairs; above, group by expert.
GATHER_MAX_PAIRS = 4

_sync_free_depth = 0


@contextlib.contextmanager
def sync_free():
    """Inside, routed experts run without reading routing decisions on the host (no
    ``.tolist()``), so the pass can be captured as a CUDA graph: the same kernels run
    whatever the routing, which device-side indexing into ``RoutedExperts.stack_weights``'
    stacked weights keeps cheap (wrapped experts run on every token instead). A
    process-wide switch: another thread's MoE calls meanwhile take it too (correct,
    slower)."""
    global _sync_free_depth
    _sync_free_depth += 1
    try:
        yield
    finally:
        _sync_free_depth -= 1


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
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))
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
            grouped = scores.view(-1, self.n_group, self.num_experts // self.n_group)
            drop = self._dropped_groups(grouped.amax(dim=-1))
            masked = grouped.masked_fill(drop, 0.0).view(-1, self.num_experts)
            weights, idx = torch.topk(masked, self.top_k, dim=-1, sorted=False)
        else:  # noaux_tc
            biased = scores + self.e_score_correction_bias.float()
            grouped = biased.view(-1, self.n_group, self.num_experts // self.n_group)
            drop = self._dropped_groups(grouped.topk(2, dim=-1)[0].sum(dim=-1))
            biased = grouped.masked_fill(drop, float("-inf")).view(-1, self.num_experts)
            idx = torch.topk(biased, self.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, idx)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx

    def _dropped_groups(self, group_scores: torch.Tensor) -> torch.Tensor:
        """(tokens, n_group) -> bool (tokens, n_group, 1): groups outside the top ones."""
        if self.topk_group == self.n_group:
            return torch.zeros_like(group_scores, dtype=torch.bool).unsqueeze(-1)
        top = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)
        return ~keep.unsqueeze(-1)


class RoutedExperts(nn.ModuleList):
    """``num_experts`` SwiGLU experts; ``forward(x (tokens, hidden), weights, idx (tokens,
    k))`` -> (tokens, hidden): each token's k experts, weighted by ``weights``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__(MLP(hidden, intermediate) for _ in range(num_experts))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if _sync_free_depth:
            return self._sync_free(x, weights, idx)
        if torch.compiler.is_compiling() and idx.numel() > GATHER_MAX_PAIRS:
            plain = [_plain_weights(expert) for expert in self]
            mm_dtype = lean_backward.matmul_dtype(x)
            if (
                all(w is not None for w in plain)
                and _grouped_mm_fits(plain[0][2], mm_dtype)
                and not lean_backward.varying_shapes_are_costly(x)
            ):
                flat = [w for triple in plain for w in triple]
                if torch.is_grad_enabled() and lean_backward.applies(x, weights, *flat):
                    return lean_backward.grouped_experts(x, weights, idx, plain)
                return _grouped(x, weights, idx, *_stack(plain))
        return self._dispatch(x, weights, idx)

    def _dispatch(self, x, weights, idx) -> torch.Tensor:
        if torch.is_grad_enabled():
            plain = [_plain_weights(expert) for expert in self]
            if all(w is not None for w in plain):
                flat = [t for triple in plain for t in triple]
                if lean_backward.applies(x, weights, *flat):
                    return lean_backward.routed_experts(x, weights, idx, plain)
        if idx.numel() <= GATHER_MAX_PAIRS:
            return self._few(x, weights, idx)
        return self._looped(x, weights, idx)

    def _few(self, x, weights, idx) -> torch.Tensor:
        # A handful of (token, expert) pairs (decode): no sorting, one call per pair.
        out = torch.zeros_like(x)
        pair_weights = weights.to(x.dtype)
        for t, experts in enumerate(idx.tolist()):
            for j, e in enumerate(experts):
                out[t] += self._run(e, x[t : t + 1], slice(t, t + 1))[0] * pair_weights[t, j]
        return out

    def _looped(self, x, weights, idx) -> torch.Tensor:
        out = torch.zeros_like(x)
        counts = torch.bincount(idx.reshape(-1), minlength=len(self)).tolist()
        order = torch.argsort(idx.reshape(-1), stable=True)
        token_of = order // idx.shape[1]
        pair_weights = weights.reshape(-1)[order].to(x.dtype)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start : start + count]
            y = self._run(expert, x[rows], rows)
            out.index_add_(0, rows, y * pair_weights[start : start + count, None])
            start += count
        return out

    def stack_weights(self) -> bool:
        """Re-lay plain experts' weights as views of two stacked tensors, gate/up
        (experts, 2 * intermediate, hidden) and down (experts, hidden, intermediate), so
        a sync-free pass can index experts on the device. Values, names, state-dict keys
        and memory use are unchanged, but the weights become new ``Parameter`` objects
        (an optimizer built before holds the old ones). Returns False, changing nothing,
        if any expert is wrapped, quantized or hooked. Idempotent."""
        if self._stacked() is not None:
            return True
        plain = [_plain_weights(expert) for expert in self]
        if any(w is None for w in plain):
            return False
        gate0 = plain[0][0]
        inter = gate0.shape[0]
        # Not inference tensors even when called under inference_mode (a generate inside
        # it): the model must stay trainable.
        with torch.inference_mode(False), torch.no_grad():
            gate_up, down = _stack(plain)
        grad = gate0.requires_grad
        for e, expert in enumerate(self):
            expert.gate_proj.weight = nn.Parameter(gate_up[e, :inter], requires_grad=grad)
            expert.up_proj.weight = nn.Parameter(gate_up[e, inter:], requires_grad=grad)
            expert.down_proj.weight = nn.Parameter(down[e], requires_grad=grad)
        self._stacked_weights = (gate_up, down)
        return True

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stacked tensors, if every expert's weights are still views of them (a
        ``load_state_dict`` copies into them; replacing a layer or weight breaks this)."""
        stacked = getattr(self, "_stacked_weights", None)
        if stacked is None or torch.compiler.is_compiling():
            # Compiled: data_ptr() cannot be traced; the decode step that compiles this
            # stacks just before and is rebuilt when any weight moves.
            return stacked
        gate_up, down = stacked
        inter = gate_up.shape[1] // 2
        for e, expert in enumerate(self):
            w = _plain_weights(expert)
            if (
                w is None
                or w[0].data_ptr() != gate_up[e].data_ptr()
                or w[1].data_ptr() != gate_up[e, inter:].data_ptr()
                or w[2].data_ptr() != down[e].data_ptr()
            ):
                self._stacked_weights = None
                return None
        return stacked

    def _sync_free(self, x, weights, idx) -> torch.Tensor:
        """The routed output with no host sync (see ``sync_free``). With stacked weights:
        fewer pairs than experts gather their experts' weights (decode reads only the
        routed experts), on CPU also more while the copies stay under
        ``GATHER_MAX_BYTES``; more pairs run grouped by expert on CPU, where arithmetic
        is the cost, and every expert on every token in two batched matmuls on CUDA
        (capturing grouped_mm there has not been tried). Unstacked (wrapped) experts:
        every expert module on every token."""
        stacked = self._stacked()
        if stacked is None:
            dense = _dense_weights(weights, idx, len(self), x.dtype)
            out = torch.zeros_like(x)
            for e, expert in enumerate(self):
                out += expert(x) * dense[:, e : e + 1]
            return out
        gate_up, down = stacked
        if idx.numel() < len(self) or (x.is_cpu and _gather_is_cheaper(idx, gate_up, down)):
            return _gathered(x, weights, idx, gate_up, down)
        if x.is_cpu and _grouped_mm_fits(down):
            return _grouped(x, weights, idx, gate_up, down)
        return _every_expert(x, weights, idx, gate_up, down)

    def _run(self, e: int, x_rows: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        """Expert ``e`` on the tokens ``rows`` of the batch. Under a mixed-adapter batch
        (ds-lora's ``adapter_batch``: one adapter per token row), the expert's LoRA layers
        see only these rows, so they get these rows' adapters for the call."""
        expert = self[e]
        weights = _plain_weights(expert)
        if weights is not None:
            gate, up, down = weights
            return F.linear(F.silu(F.linear(x_rows, gate)) * F.linear(x_rows, up), down)
        mixed = [
            (layer, layer.row_adapters_state())
            for layer in (expert.gate_proj, expert.up_proj, expert.down_proj)
            # A class attribute lookup: cheap for the plain nn.Linear of every other call.
            if hasattr(type(layer), "row_adapters_state")
            and layer.row_adapters_state()[1] is not None
        ]
        if not mixed:
            return expert(x_rows)
        for layer, (names, row_index, _) in mixed:
            here = rows if isinstance(rows, slice) else rows.to(row_index.device)
            layer.set_row_adapters(names, row_index[here])
        try:
            return expert(x_rows)
        finally:
            for layer, state in mixed:
                layer.set_row_adapters(*state)


# On CPU, gathering every pair's expert weights beats one grouped matmul per expert while
# the copies stay this small (a decode step, 2-core x86_64: +12-28% tokens/s for the
# shipped model at batch 4-8 and a 14M V3 shape at batch 8-16; grouped won at 25 MiB and
# more: the 14M shape at batch 32, a 100M one at batch 8).
GATHER_MAX_BYTES = 16 * 2**20


def _gather_is_cheaper(idx, gate_up, down) -> bool:
    per_expert = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    return idx.numel() * per_expert <= GATHER_MAX_BYTES


def _grouped_mm_fits(down: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """``F.grouped_mm`` exists (torch >= 2.9) and accepts these shapes: its rows must be
    multiples of 16 bytes (hidden and intermediate sizes of 4 fp32 or 8 bf16 values).
    ``down``: one expert's (hidden, inter) weight or the stacked (experts, hidden, inter);
    ``dtype``: the matmuls' dtype if not the weight's (autocast)."""
    hidden, inter = down.shape[-2:]
    size = dtype.itemsize if dtype is not None else down.element_size()
    return hasattr(F, "grouped_mm") and (hidden * size) % 16 == 0 and (inter * size) % 16 == 0


def _stack(plain: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts' (gate, up, down) weights -> gate/up (experts, 2 * inter, hidden) and down
    (experts, hidden, inter): copies, differentiable."""
    gate_up = torch.stack([torch.cat((gate, up)) for gate, up, _ in plain])
    return gate_up, torch.stack([down for _, _, down in plain])


def _dense_weights(weights, idx, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """(tokens, experts) routing weights, zero where a token did not pick the expert."""
    dense = torch.zeros(idx.shape[0], num_experts, dtype=dtype, device=idx.device)
    return dense.scatter_(1, idx, weights.to(dtype))


def _gathered(x, weights, idx, gate_up, down) -> torch.Tensor:
    """Each (token, expert) pair as a batched matrix-vector product over its expert's
    gathered weights: reads only the routed experts. Stacked layouts as in ``_grouped``."""
    k = idx.shape[1]
    pairs = x.repeat_interleave(k, dim=0)[:, :, None]  # (pairs, hidden, 1)
    gate, up = torch.bmm(gate_up[idx.reshape(-1)], pairs).squeeze(-1).chunk(2, -1)
    y = torch.bmm(down[idx.reshape(-1)], (F.silu(gate) * up)[:, :, None]).squeeze(-1)
    y = y * weights.reshape(-1, 1).to(x.dtype)  # (pairs, hidden)
    return y.view(x.shape[0], k, -1).sum(dim=1)


def _every_expert(x, weights, idx, gate_up, down) -> torch.Tensor:
    """Every expert on every token, weighted by the routing (zero where not picked)."""
    dense = _dense_weights(weights, idx, gate_up.shape[0], x.dtype)
    gate, up = torch.matmul(gate_up, x.t()).chunk(2, dim=1)  # (experts, inter, tokens)
    h = F.silu(gate) * up * dense.t()[:, None, :]
    return torch.matmul(down, h).sum(dim=0).t()


def _grouped(x, weights, idx, gate_up, down) -> torch.Tensor:
    """The compiled form of the dispatch, for plain experts: tokens sorted by expert and
    two grouped matmuls (``F.grouped_mm``) over the experts' stacked weights, gate/up
    (experts, 2 * inter, hidden) and down (experts, hidden, inter), with no
    data-dependent Python, so torch.compile keeps the MoE in its graph (+12% tokens/s
    over an eager dispatch, training the shipped model's shape on CPU). Training stacks
    (copies) every expert's weights once per call, which is why eager code keeps the
    loop; a decode step uses ``stack_weights``' stacked views."""
    num_experts, k = gate_up.shape[0], idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // k
    ones = torch.ones_like(flat, dtype=torch.int32)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    offsets = counts.scatter_add_(0, flat.to(torch.int32), ones).cumsum(0, dtype=torch.int32)
    hidden = F.grouped_mm(x[token_of], gate_up.transpose(1, 2), offs=offsets)
    gate, up = hidden.chunk(2, dim=-1)
    y = F.grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)
    y = y * weights.reshape(-1)[order].to(x.dtype)[:, None]
    return torch.zeros_like(x).index_add(0, token_of, y)


def run_experts_eagerly(model: nn.Module) -> int:
    """Keep ``torch.compile`` out of the loop dispatch of every ``RoutedExperts`` of
    ``model`` (used when its experts are wrapped or hooked: LoRA, quantized layers, or
    a decode step's few pairs): its control flow depends on how many tokens each
    expert gets, so compiled it would recompile at nearly every step. Called before
    compiling (the Trainer's ``torch_compile=True`` does); returns how many MoE layers
    it marked. Not done at import: ``torch.compiler.disable`` imports torch._dynamo
    (and triton), about a second of start-up that nothing else needs."""
    marked = 0
    for module in model.modules():
        if isinstance(module, RoutedExperts) and "_dispatch" not in vars(module):
            module._dispatch = torch.compiler.disable(module._dispatch)
            marked += 1
    return marked


def _plain_weights(expert: MLP) -> tuple[torch.Tensor, ...] | None:
    """An expert's three weights if it can run as three ``F.linear`` calls without its
    four module calls (~5% of a batch-8 decode step): no hooks on the expert, plain
    layers (``plain_linear_weights``); ``None`` otherwise."""
    if expert._forward_hooks or expert._forward_pre_hooks:
        return None
    return plain_linear_weights(expert.gate_proj, expert.up_proj, expert.down_proj)


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
