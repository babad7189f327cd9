"""The fixed-shape decode step: captured as one CUDA graph, compiled, or both.

At batch 1 a decode step is hundreds of small kernels; on a GPU launching them from
Python costs far more than running them, so ``GraphedDecoder`` records the step once
(as gpt-fast and vLLM do) and replays it with one launch. It captures by hand
(``torch.cuda.graph``) rather than through ``torch.compile(mode="reduce-overhead")``
because ``generate`` captures by default on CUDA, where a capture costs a few eager
steps and a compile seconds per batch size; ``compile=True`` compiles the same step
first (and only that, on CPU). A fixed-shape step differs from the eager step in three
ways:

- the new token's KV entry is written at a slot held in a device tensor, and attention
  reads the whole ``StaticKVCache`` (``capacity`` slots) under a (batch, capacity) bool
  visibility mask: real tokens written so far (left padding excluded);
- routed experts take their grouped form (``ds_model.moe``: no routing read back to
  the host while compiling or capturing), over weights stacked once beforehand;
- the step's inputs (token, position, slot) are copied into static buffers, and its
  output is a static logits buffer, valid until the next replay.

Models with a sliding window or a forced attention backend keep the eager step.
Measured speeds: docs/benchmarks.md ("Generation", "Decode paths").
"""

from __future__ import annotations

import threading
import weakref

import torch
from ds_quant.kernels import cpu_gemv

from ds_model.cache import StaticKVCache
from ds_model.layout import input_major_weights
from ds_model.matvec import MatVecLinears
from ds_model.moe import RoutedExperts

# Compiled steps after a generation's first skip torch.compile's guards: without that,
# bench_decode_cpu_time.py's compiled/eager ratio drops 4-12% (docs/benchmarks.md,
# "Decode paths"). The serving runner's compiled decode steps skip them after each
# request's first (ds_model.decode_buckets). torch's stance is process-wide, so compiled
# code in other threads skips its guards meanwhile too: set False in a process where
# such code may need to recompile.
SKIP_GUARDS = True
_STANCE_LOCK = threading.Lock()

__all__ = ["GraphedDecoder", "graphable", "static_step_supported"]

# The fixed-shape step attends over every slot of its cache, masked or not, so each
# spare slot is read at every step: for a llama-type model its K and V per layer (18.9 MB
# a row for a 134M llama at 256 slots, more than its INT8 weights). Capacities are
# powers of two from MIN_CAPACITY up to CAPACITY_STEP, then multiples of it: a short
# generation reads at most twice the slots it fills, and nearby lengths share one
# compiled or captured step. Against 256 slots, a 33-token llama generation decoded
# 1.03-1.15x (INT8) and 1.10-1.11x (INT4) faster at batch 1, 1.23-1.43x at batch 8; the
# 110M V3 (MLA) model's compiled step, against its eager one in the same process with
# eager and compiled interleaved, 1.05x (INT8) and 1.08x (fp32) faster at batch 1,
# 1.18x and 1.08x at batch 8 (docs/benchmarks.md, "CPU decode by weight format").
MIN_CAPACITY = 64
CAPACITY_STEP = 256


def decode_capacity(needed: int, limit: int) -> int:
    """The cache slots of a fixed-shape step for a generation needing ``needed``, at
    most ``limit``: powers of two from ``MIN_CAPACITY`` to ``CAPACITY_STEP``, then its
    multiples."""
    capacity = MIN_CAPACITY
    while capacity < needed and capacity < CAPACITY_STEP:
        capacity *= 2
    if capacity < needed:
        capacity = -(-needed // CAPACITY_STEP) * CAPACITY_STEP
    return min(capacity, limit)


def static_step_supported(model) -> bool:
    """Whether ``model`` can decode with the fixed-shape step: no sliding window and no
    forced attention backend (the step attends through a mask; see above)."""
    config = model.config
    plain = config.sliding_window is None and config.attention_backend is None
    return plain and not config.attention.masked  # a per-query pattern has no mask form


def graphable(model) -> bool:
    """Whether ``model``'s decode step can be captured: the fixed-shape step, on CUDA,
    with routed experts that can take their grouped form (plain layers: wrapped or
    hooked experts run a loop that reads the routing on the host)."""
    return (
        model.device.type == "cuda"
        and static_step_supported(model)
        and all(m.stack_weights() for m in model.modules() if isinstance(m, RoutedExperts))
    )


class _SlotWriter:
    """Writes each layer's new (batch, 1, ...) entries at cache slot ``slot`` (a (1,)
    device tensor) and returns the whole (batch, capacity, ...) cache."""

    def __init__(self, cache: StaticKVCache, slot: torch.Tensor) -> None:
        self.cache, self.slot = cache, slot

    def update(self, layer_idx: int, new: list[torch.Tensor]) -> list[torch.Tensor]:
        stores = self.cache.layers[layer_idx]
        for store, t in zip(stores, new):
            store.index_copy_(1, self.slot, t.to(store.dtype))
        return stores


class GraphedDecoder:
    """A captured decode step for ``batch`` rows over a cache of ``capacity`` slots.

    Use: prefill into ``decoder.cache`` (reset its ``length`` first) with the model's
    ordinary forward, call ``start(key_valid)`` with the prompt's (batch, prompt_len)
    real-token mask, then per step ``step(token (batch,), positions (batch, 1))`` ->
    logits (batch, vocab), which writes the token at slot ``cache.length`` and advances
    it. ``capture`` (default: on CUDA) records the step as a CUDA graph on first use;
    without it the same step runs eagerly (what the CPU tests check). ``compile`` runs
    the step through ``torch.compile`` (compiled on first use, before any capture): its
    fixed shapes compile once, and fusing the step's many small element-wise ops is
    what a decode step of a small model needs on CPU and GPU alike.
    """

    def __init__(
        self,
        model,
        batch: int,
        capacity: int,
        capture: bool | None = None,
        compile: bool = False,
    ) -> None:
        if capture is None:
            capture = model.device.type == "cuda"
        self.compiled = compile
        self._run = torch.compile(self._matvec_forward, dynamic=False) if compile else self._forward
        # A weak reference: generation keeps decoders in a WeakKeyDictionary keyed by
        # the model, which a strong one would keep alive forever.
        self._model = weakref.ref(model)
        self.batch, self.capture = batch, capture
        config = model.config
        self.capacity = decode_capacity(capacity, config.max_position_embeddings)
        device = model.device
        for module in model.modules():
            if isinstance(module, RoutedExperts):
                module.stack_weights()
        if device.type == "cpu" and not (batch == 1 and cpu_gemv.fp32_rows()):
            # Few-row matmuls read (in, out) weights faster: without it, batch-8
            # compiled/eager drops 7-17% (measured in docs/benchmarks.md, "Decode paths").
            # One row reads row-major float32 weights faster still, on ds-quant's
            # fp32_gemv (MatVecLinears).
            input_major_weights(model)
        self.cache = StaticKVCache(model.config, batch, self.capacity, model.dtype, device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.visible = torch.zeros(batch, self.capacity, dtype=torch.bool, device=device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self._guards_checked = False
        self.in_use = False  # set by generation while a generate/stream call runs on it
        self._built_for = _fingerprint(model)  # after stacking, which renews parameters

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the model this decode step was captured for is gone")
        return model

    def fits(self, model, batch: int, needed: int, capture: bool, compile: bool) -> bool:
        """Whether this step serves a generation of ``batch`` rows needing ``needed``
        cache slots, with these settings, on ``model`` as it was built for: the same
        weight addresses, modules and hooks (a captured graph reads exactly those)."""
        return (
            (batch, capture, compile) == (self.batch, self.capture, self.compiled)
            and needed <= self.capacity
            and self._built_for == _fingerprint(model)
        )

    def start(self, key_valid: torch.Tensor) -> None:
        """After prefill: ``key_valid`` (batch, cache.length) marks real prompt slots."""
        self.visible.zero_()
        self.visible[:, : key_valid.shape[1]] = key_valid
        self._guards_checked = False

    def _forward(self) -> torch.Tensor:
        self.visible.index_fill_(1, self.slot, True)
        hidden = self.model.model(
            self.tokens,
            self.positions,
            mask=self.visible[:, None, None, :],
            cache=_SlotWriter(self.cache, self.slot),
            history=True,
        )
        return self.model.lm_head(hidden[:, -1])

    def _matvec_forward(self) -> torch.Tensor:
        # One-row 16-bit float linears as multiply-and-sum, float32 ones of up to
        # fp32_rows() rows on ds-quant's fp32_gemv (the step's sizes are static).
        with MatVecLinears(few_rows=True):
            return self._forward()

    def step(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.cache.length >= self.capacity:
            raise ValueError(f"the graphed decode cache holds {self.capacity} slots; all are used")
        self.tokens.copy_(token.view(self.batch, 1))
        self.positions.copy_(positions)
        self.slot.fill_(self.cache.length)
        if not self.capture:
            logits = self._run_step()
        else:
            if self.graph is None:
                self._record()
            self.graph.replay()
            logits = self.logits
        self.cache.length += 1
        return logits

    def _run_step(self) -> torch.Tensor:
        # The first step of each generation checks torch.compile's guards (~1,600 for a
        # 4-layer V3: every module attribute and weight the step reads), recompiling if
        # anything changed; later steps of the same generation skip them, as replaying a
        # CUDA graph does (see SKIP_GUARDS). Changing the model while a generation is
        # under way is unsupported on either path.
        if self.compiled and self._guards_checked:
            return run_skipping_guards(self._run)
        logits = self._run()
        self._guards_checked = True
        return logits

    def _record(self) -> None:
        # Warm up on a side stream (lazy initialisations, cuBLAS workspaces) before
        # capture, as torch.cuda.graphs documents; the warm-up writes the same slot the
        # replay then writes again, so the cache ends up as if the step ran once.
        visible = self.visible.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()
        self.visible.copy_(visible)


def run_skipping_guards(compiled, *args):
    """``compiled(*args)`` without evaluating torch.compile's guards, for a caller that
    has checked them on an earlier call and knows nothing they cover changed since
    (``SKIP_GUARDS``). Runs with the guards where the skip cannot be taken: turned off,
    a stance the caller set, or another thread inside the process-wide stance (the lock
    keeps two threads from nesting it: one leaving would restore the other's)."""
    if SKIP_GUARDS and _default_stance() and _STANCE_LOCK.acquire(blocking=False):
        try:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return compiled(*args)
        finally:
            _STANCE_LOCK.release()
    return compiled(*args)


def _default_stance() -> bool:
    """Whether torch.compile is in its default stance: ``set_stance`` (how guards are
    skipped) replaces the whole stance, and must not undo one the caller chose, such as
    ``force_eager``."""
    # Private: torch has no public getter for the stance; needed by SKIP_GUARDS' skip.
    import torch._dynamo.eval_frame as eval_frame

    stance = getattr(eval_frame, "_stance", None)
    return (
        stance is not None
        and stance.stance == "default"
        and stance.backend is None
        and not stance.skip_guard_eval_unsafe
    )


def _fingerprint(model) -> tuple:
    """What a built step depends on: every weight's and buffer's address and every
    module with its hook counts (a moved weight, a replaced or hooked module needs a new
    step)."""
    return (
        tuple(t.data_ptr() for t in model.parameters()),
        tuple(t.data_ptr() for t in model.buffers()),
        tuple((id(m), len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()),
    )
