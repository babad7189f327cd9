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
two stacked tensors, which ``ds_model.loading`` splits).

The routed sum (``RoutedExperts.forward``) has these forms, picked by what is running:

- eager: a loop over the experts the batch hit, each running its own module on its
  tokens' rows (so hooks, LoRA and quantized layers take part, and only the routed
  experts' weights are read). It reads the per-expert token counts on the host.
- compiled (``torch.compile``) or captured (CUDA graph): two grouped matmuls
  (``F.grouped_mm``) over the experts' stacked weights, with no host sync. It needs
  plain experts (bias-free ``nn.Linear`` layers, no hooks) and shapes ``grouped_mm``
  accepts. Otherwise (quantized, wrapped or hooked experts) an inference step runs the
  eager loop as one opaque custom op, ``ds_model::routed_experts``, inside the compiled
  graph, so only the routed experts' weights are read and the rest of the step stays
  one graph; a training step runs the loop outside the compiled graph.
- compiled CPU inference: one token (a batch-1 decode step) over plain stacked experts
  takes its k experts' rows of the stacked weights by index inside multiply-and-sum
  products (``ds_model.expert_products``), and so do ds-quant INT8 / INT4 weight-only
  experts (their buffers stacked the same way); other CPU inference steps run the opaque op, since
  CPU ``grouped_mm`` multiplies every expert, idle ones included.
"""

from __future__ import annotations

import itertools
import weakref

import ds_lora
import torch
import torch.nn.functional as F
from torch import nn

from ds_model import lean_backward
from ds_model.config import ModelConfig
from ds_model.expert_products import (
    Stacked,
    layer_tensors,
    one_token_experts,
    quantized_expert_layers,
    stack_quantized,
)
from ds_model.matvec import one_static_row
from ds_model.mlp import MLP, plain_linear_weights

__all__ = ["MoE", "RoutedExperts", "Router", "device_side"]


def device_side(x: torch.Tensor) -> bool:
    """Whether code running on ``x`` may not read tensors on the host: it is being traced
    by ``torch.compile`` (a host read would break the graph and specialise on the
    routing) or captured into a CUDA graph (a host read is an error there)."""
    if torch.compiler.is_compiling():
        return True
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


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
        # Every group kept (topk_group == n_group, as in the built-in model) masks
        # nothing: the group scores, their top-k and the mask are skipped (six ops a
        # layer; the built-in model's eager decode 1.03-1.04x the tokens/s, EPYC-512).
        limited = self.method != "greedy" and self.topk_group < self.n_group
        if self.method == "group_limited_greedy" and limited:
            grouped = scores.view(-1, self.n_group, self.num_experts // self.n_group)
            drop = self._dropped_groups(grouped.amax(dim=-1))
            masked = grouped.masked_fill(drop, 0.0).view(-1, self.num_experts)
            weights, idx = torch.topk(masked, self.top_k, dim=-1, sorted=False)
        elif self.method != "noaux_tc":  # greedy, or every group kept
            weights, idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        else:
            biased = scores + self.e_score_correction_bias.float()
            if limited:
                grouped = biased.view(-1, self.n_group, self.num_experts // self.n_group)
                drop = self._dropped_groups(grouped.topk(2, dim=-1)[0].sum(dim=-1))
                biased = grouped.masked_fill(drop, float("-inf")).view(-1, self.num_experts)
            idx = torch.topk(biased, self.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, idx)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling if self.scaling != 1.0 else weights, idx

    def _dropped_groups(self, group_scores: torch.Tensor) -> torch.Tensor:
        """(tokens, n_group) -> bool (tokens, n_group, 1): groups outside the top ones."""
        top = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)
        return ~keep.unsqueeze(-1)


class RoutedExperts(nn.ModuleList):
    """``num_experts`` SwiGLU experts; ``forward(x (tokens, hidden), weights, idx (tokens,
    k))`` -> (tokens, hidden): each token's k experts, weighted by ``weights``.

    ``lean_backward`` (set by ``ds_model.lean_backward.enable``; the Trainer does):
    train plain experts through the hand-written backward of ``ds_model.lean_backward``
    (the same sum, fewer saved activations)."""

    lean_backward = False
    # The stacked weights a compiled one-token CPU step reads (``stack_weights``), or None.
    _one_token_stacked: tuple[Stacked, Stacked] | None = None

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__(MLP(hidden, intermediate) for _ in range(num_experts))
        self._register_op_key()

    def _register_op_key(self) -> None:
        self._op_key = next(_OP_KEYS)
        _BY_OP_KEY[self._op_key] = self

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy restores through here: the copy takes a key of its own, or the
        # compiled step of the copy would run the original's experts.
        super().__setstate__(state)
        self._register_op_key()
        if self._one_token_stacked is not None:
            _watch_layers(self)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if device_side(x):
            inference = torch.compiler.is_compiling() and not torch.is_grad_enabled()
            if inference and x.device.type == "cpu":
                # Only the record is read here: checking the experts themselves added
                # guards per expert (2.8 ms against 22 us per layer at 256 INT8 experts).
                stacked = self._one_token_stacked if one_static_row(x) else None
                if stacked is not None:
                    return one_token_experts(x, weights, idx, *stacked)
                # CPU grouped_mm runs a matmul per expert, idle ones included: about
                # 3 ms a call at batch 1 in the compiled 110M V3 step, a third of it.
                return torch.ops.ds_model.routed_experts(x, weights, idx, self._op_key)
            plain = self._plain_weights()
            if plain is not None and _grouped_fits(x, plain[0][2]):
                return self._grouped(x, weights, idx, plain)
            if inference:
                return torch.ops.ds_model.routed_experts(x, weights, idx, self._op_key)
            return _outside_graph(self._per_expert)(x, weights, idx)
        return self._per_expert(x, weights, idx)

    def _per_expert(self, x, weights, idx) -> torch.Tensor:
        """The eager form: tokens sorted by expert, each hit expert's module on its rows."""
        if self.lean_backward and torch.is_grad_enabled():
            plain = self._plain_weights()
            flat = [] if plain is None else [w for triple in plain for w in triple]
            if plain is not None and lean_backward.applies(x, weights, *flat):
                return lean_backward.routed_experts(x, weights, idx, plain)
        if x.shape[0] == 1 and not torch.is_grad_enabled():
            return self._one_token(x, weights, idx)
        flat_idx = idx.reshape(-1)
        counts = torch.bincount(flat_idx, minlength=len(self)).tolist()
        order = torch.argsort(flat_idx, stable=True)
        token_of = order // idx.shape[1]
        pair_weights = weights.reshape(-1)[order].to(x.dtype)
        out = torch.zeros_like(x)
        start = 0
        # Training runs every expert, an idle one on no rows, so each has a (zero)
        # gradient: data-parallel ranks must reduce the same parameters (FSDP2
        # reduce-scatters only those with a gradient, and the ranks' collectives would
        # no longer match).
        every = torch.is_grad_enabled()
        for expert, count in zip(self, counts):
            if count or every:
                rows = token_of[start : start + count]
                if _wrapped(expert):
                    with ds_lora.adapter_rows(expert, rows):
                        y = expert(x[rows])
                else:
                    y = expert(x[rows])
                out.index_add_(0, rows, y * pair_weights[start : start + count, None])
                start += count
        return out

    def _one_token(self, x, weights, idx) -> torch.Tensor:
        """Batch-1 decode: the token's k experts in turn, each weighted and summed, with
        none of the sort, scatter and per-expert row gathers (about ten small ops per
        layer, as much time as an expert's matmuls at this size). The token is row 0 of
        a one-row batch, so a mixed-adapter LoRA batch needs no row remapping."""
        pair_weights = weights.to(x.dtype)
        out = None
        for j, e in enumerate(idx[0].tolist()):
            y = self[e](x) * pair_weights[:, j : j + 1]
            out = y if out is None else out + y
        return out

    def _grouped(self, x, weights, idx, plain) -> torch.Tensor:
        """The compiled and captured form: tokens sorted by expert, two grouped matmuls
        over the stacked weights, gate/up (experts, 2 * inter, hidden) and down (experts,
        hidden, inter). Training stacks (copies, differentiable) the weights per call; an
        inference step reads ``stack_weights``' stacked tensors in place."""
        flat_weights = [w for triple in plain for w in triple]
        if self.lean_backward and lean_backward.applies(x, weights, *flat_weights):
            return lean_backward.grouped_experts(x, weights, idx, plain)
        stacked = None if torch.is_grad_enabled() else self._stacked(plain)
        gate_up, down = stacked if stacked is not None else _stack(plain)
        dtype = lean_backward.matmul_dtype(x)
        k = idx.shape[1]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // k
        ones = torch.ones_like(flat, dtype=torch.int32)
        counts = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
        offsets = counts.scatter_add_(0, flat.to(torch.int32), ones).cumsum(0, dtype=torch.int32)
        rows = x[token_of].to(dtype)
        gate, up = F.grouped_mm(rows, gate_up.to(dtype).transpose(1, 2), offs=offsets).chunk(2, -1)
        y = F.grouped_mm(F.silu(gate) * up, down.to(dtype).transpose(1, 2), offs=offsets)
        y = y.to(x.dtype) * weights.reshape(-1)[order].to(x.dtype)[:, None]
        return torch.zeros_like(x).index_add(0, token_of, y)

    def _stack_quantized(self) -> bool:
        """``stack_weights`` for ds-quant INT8 / INT4 weight-only experts (see
        ``ds_model.expert_products``)."""
        layers = quantized_expert_layers(self)
        if layers is None:
            return False
        if self._stacked_quantized() is not None:
            return True
        stacked = stack_quantized(layers)
        if stacked is None:
            return False
        self._stacked_quantized_weights = (stacked, layer_tensors(layers))
        return True

    def _stacked_quantized(self) -> tuple[Stacked, Stacked] | None:
        """The quantized experts' stacked buffers, if the experts are still the layers
        whose buffers are the views ``_stack_quantized`` made."""
        record = getattr(self, "_stacked_quantized_weights", None)
        layers = quantized_expert_layers(self) if record is not None else None
        if layers is None:
            return None
        stacked, tensors = record
        if any(a is not b for a, b in zip(layer_tensors(layers), tensors)):
            return None
        # ``.data`` assignment keeps the tensor objects and swaps their storage.
        storages = {t.untyped_storage().data_ptr() for t in _views(stacked)}
        if any(t.untyped_storage().data_ptr() not in storages for t in tensors):
            return None
        return stacked

    def _stacked_plain(self) -> tuple[Stacked, Stacked] | None:
        plain = self._plain_weights()
        stacked = None if plain is None else self._stacked(plain)
        return None if stacked is None else (Stacked(stacked[0]), Stacked(stacked[1]))

    def _plain_weights(self) -> list[tuple[torch.Tensor, ...]] | None:
        """Every expert's (gate, up, down) weights if all are plain (``plain_linear_weights``
        and no hooks on the expert), else ``None``."""
        plain = []
        for expert in self:
            if expert._forward_hooks or expert._forward_pre_hooks:
                return None
            weights = plain_linear_weights(expert.gate_proj, expert.up_proj, expert.down_proj)
            if weights is None:
                return None
            plain.append(weights)
        return plain

    def stack_weights(self) -> bool:
        """Re-lay plain experts' weights as views of two stacked tensors, gate/up
        (experts, 2 * intermediate, hidden) and down (experts, hidden, intermediate), so
        that an inference step's grouped form reads them without copying. Values, names,
        state-dict keys and memory use are unchanged, but the weights become new
        ``Parameter`` objects (an optimizer built before holds the old ones). Returns
        False if any expert is wrapped, quantized or hooked, changing nothing, except
        for ds-quant INT8 / INT4 weight-only experts: those are stacked the same way
        (``_stack_quantized``) for the compiled one-token CPU form, and False says that
        the grouped form, which needs float weights, cannot run.
        Idempotent while the weights are still views of the stacked tensors."""
        self._one_token_stacked = None
        plain = self._plain_weights()
        if plain is None:
            if self._stack_quantized():
                self._watch(self._stacked_quantized())
            return False
        if self._stacked(plain) is not None:
            self._watch(self._stacked_plain())
            return True
        inter = plain[0][0].shape[0]
        # Not inference tensors even when called under inference_mode (a generate inside
        # it): the model must stay trainable.
        with torch.inference_mode(False), torch.no_grad():
            gate_up, down = _stack(plain)
        grad = plain[0][0].requires_grad
        for e, expert in enumerate(self):
            expert.gate_proj.weight = nn.Parameter(gate_up[e, :inter], requires_grad=grad)
            expert.up_proj.weight = nn.Parameter(gate_up[e, inter:], requires_grad=grad)
            expert.down_proj.weight = nn.Parameter(down[e], requires_grad=grad)
        params = tuple(w for e in self for w in _layer_weights(e))
        self._stacked_weights = (gate_up, down, params)
        self._watch(self._stacked_plain())
        return True

    def _watch(self, stacked: tuple[Stacked, Stacked] | None) -> None:
        """Record what compiled one-token steps read; it is forgotten when an expert's
        module, parameter or buffer is replaced (``_forget_stacking``) or the experts
        move (``_apply``). Compiled code trusts it: a forward hook added to an expert
        afterwards is seen at the next ``stack_weights`` (ds-model's decoders call it
        whenever a module's hooks change)."""
        self._one_token_stacked = stacked
        if stacked is not None:
            _watch_layers(self)

    def _stacked(self, plain) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stacked tensors, if the experts' weights are still the ``Parameter``
        objects ``stack_weights`` made and views of them. Compiled code cannot read
        ``data_ptr()``: there the identity check is traced (a replaced weight
        recompiles) and ``_apply`` (``.to()``, ``.cuda()``, ``.half()``...) forgets the
        stacking, since it may give the same ``Parameter`` new storage."""
        stacked = getattr(self, "_stacked_weights", None)
        if stacked is None:
            return None
        gate_up, down, params = stacked
        if any(w is not p for w, p in zip((w for t in plain for w in t), params)):
            return None
        if not torch.compiler.is_compiling() and not _views_of(plain, gate_up, down):
            return None
        return gate_up, down

    def _apply(self, fn, recurse=True):
        self._stacked_weights = self._stacked_quantized_weights = self._one_token_stacked = None
        return super()._apply(fn, recurse)


# Experts' modules and layers -> the RoutedExperts whose ``_one_token_stacked`` record reads
# their weights. torch's global registration hooks see every module, parameter and
# buffer assignment (one dictionary lookup each), so a record never outlives the
# tensors it stacked, without per-expert checks in compiled code.
_WATCHED: weakref.WeakKeyDictionary[nn.Module, RoutedExperts] = weakref.WeakKeyDictionary()


def _watch_layers(experts: RoutedExperts) -> None:
    for module in experts.modules():  # the list itself too: a replaced expert
        _WATCHED[module] = experts


def _forget_stacking(module: nn.Module, name: str, value) -> None:
    try:
        experts = _WATCHED.get(module)
    except TypeError:  # a module class that defines __eq__ without __hash__: never watched
        return
    if experts is not None:
        experts._one_token_stacked = None


for _register in (
    torch.nn.modules.module.register_module_module_registration_hook,
    torch.nn.modules.module.register_module_parameter_registration_hook,
    torch.nn.modules.module.register_module_buffer_registration_hook,
):
    _register(_forget_stacking)


def _views(stacked: tuple[Stacked, Stacked]) -> tuple[torch.Tensor, ...]:
    return tuple(t for s in stacked for t in (s.weight, s.scale, s.zero) if t is not None)


def _layer_weights(expert: MLP) -> tuple[torch.Tensor, ...]:
    return expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight


def _views_of(plain, gate_up, down) -> bool:
    """Whether every expert's weights are still views of the stacked tensors (a
    ``load_state_dict`` copies into them; replacing a layer or a weight breaks this)."""
    inter = gate_up.shape[1] // 2
    return all(
        w[0].data_ptr() == gate_up[e].data_ptr()
        and w[1].data_ptr() == gate_up[e, inter:].data_ptr()
        and w[2].data_ptr() == down[e].data_ptr()
        for e, w in enumerate(plain)
    )


def _stack(plain: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts' (gate, up, down) weights -> gate/up (experts, 2 * inter, hidden) and down
    (experts, hidden, inter): copies, differentiable."""
    gate_up = torch.stack([torch.cat((gate, up)) for gate, up, _ in plain])
    return gate_up, torch.stack([down for _, _, down in plain])


def _grouped_fits(x: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether the grouped form runs here: ``F.grouped_mm`` exists and accepts rows of
    a multiple of 16 bytes (hidden and intermediate sizes of 4 fp32 or 8 bf16 values),
    and the step is not bf16/fp16 training on CPU, where oneDNN builds a kernel per new
    row count and grouped_mm's per-expert counts change every step (slower than
    transformers and 1 GiB more memory, docs/benchmarks.md); the loop pads rows to
    bounded shapes instead (``lean_backward.row_bucket``)."""
    hidden, inter = down.shape
    size = lean_backward.matmul_dtype(x).itemsize
    if not hasattr(F, "grouped_mm") or (hidden * size) % 16 or (inter * size) % 16:
        return False  # grouped_mm is in torch >= 2.9
    return not (torch.is_grad_enabled() and lean_backward.row_bucket(x) > 1)


# ``ds_model::routed_experts``: the eager routed sum of the ``RoutedExperts`` registered
# under ``key``, opaque to torch.compile. A custom op takes tensors and numbers only,
# so the layer is found by a key it registered at construction (weakly held: the table
# keeps no model alive). Compared with running the loop outside the graph, the op keeps
# a decode step one graph: a graph break inside the model's loop over layers makes
# dynamo give up on that loop, compile each layer apart and recompile past its limit.
_OP_KEYS = itertools.count()
_BY_OP_KEY: weakref.WeakValueDictionary[int, RoutedExperts] = weakref.WeakValueDictionary()
_LIB = torch.library.Library("ds_model", "FRAGMENT")
_LIB.define("routed_experts(Tensor x, Tensor weights, Tensor idx, int key) -> Tensor")


def _routed_experts_op(x, weights, idx, key):
    experts = _BY_OP_KEY.get(key)
    if experts is None:
        raise RuntimeError(f"ds_model::routed_experts: no live RoutedExperts has key {key}")
    with torch.no_grad():
        return experts._per_expert(x, weights, idx)


def _routed_experts_fake(x, weights, idx, key):
    torch._check(x.dim() == 2, lambda: f"x must be (tokens, hidden), got {x.dim()}-D")
    torch._check(idx.shape[0] == x.shape[0], lambda: "idx must have a row per token")
    return torch.empty_like(x)


_LIB.impl("routed_experts", _routed_experts_op, "CompositeExplicitAutograd")
torch.library.register_fake("ds_model::routed_experts", _routed_experts_fake, lib=_LIB)


def _outside_graph(fn):
    """``fn`` run eagerly between compiled graphs: the loop reads the routing on the
    host, which would break the graph and recompile at nearly every step."""
    return torch.compiler.disable(fn)


def _wrapped(expert: MLP) -> bool:
    """Whether any of the expert's layers is a LoRA layer: only those can be in a
    mixed-adapter batch, whose LoRA layers must then see only the expert's rows
    (``ds_lora.adapter_rows``). Plain and quantized layers skip that lookup (a pass over
    the expert's modules per call)."""
    return any(isinstance(layer, ds_lora.LoraLinear) for layer in expert._modules.values())


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
