"""The serving runner's decode steps, compiled or CUDA-graph captured per batch-size bucket.

A decode-only step of ``ModelRunner`` (every sequence feeds one token, no adapters, no
prompt scoring) is padded up to the smallest bucket that holds it, so a handful of
shapes cover every batch size, the way vLLM and nano-vllm capture their decode graphs:

- ``mode="compile"``: the step runs through ``torch.compile``. The block-table width
  and the batch (a bucket size) are dynamic dimensions: one graph for batch 1, one for
  every larger bucket, whatever the context lengths; a float32 model on a CPU where
  ds-quant's kernel is built has a third, for the buckets of 2 to ``fp32_rows()`` (4)
  rows, whose float32 layers run ``fp32_gemv`` instead of MKL's matmul (through
  ds-serve's in-process engine on the built-in model, compiled steps at 2 clients made
  1.14-1.23x the tokens/s, at 4 clients 1.25-1.30x; EPYC-512, alternating processes).
  On CPU the compiled step fuses the many small element-wise ops of a decode
  step, which is what a small model's step is made of.
- ``mode="cuda_graph"``: one CUDA graph per bucket, recorded on first use over static
  input buffers whose block table spans the model's whole context; a replay is one
  launch. Larger batches than the largest bucket run eagerly.

In ``"compile"`` mode a bucket's graph checks torch.compile's guards (about 1,400 for
the built-in model: every module attribute and weight the step reads, 0.2-0.3 ms a
step) on its first call after ``recheck()``, and skips them on later calls, as
``generate`` skips them after a generation's first step
(``ds_model.cuda_graph.SKIP_GUARDS``). ``ModelRunner`` calls ``recheck()`` on every
step that does not run here, which each new request's prefill is: the model may change
between requests, not while they decode. Measured through ds-serve's in-process engine
on the built-in model (float32, one thread, EPYC-512, quiet, interleaved rounds): one
client 325.7 against 305.2 tokens/s with guards checked every step (1.055x, median of 9),
8 clients 831.8 against 800.5.

Padding rows feed token 0 at position 0 with a context of one token held in the
pool's scratch block, a block the runner keeps out of the scheduler's pool, so they
never touch a real sequence's cache. Inside the step ds-attention's paged decode does not
read the context lengths on the host (see ``paged_decode_attention``); routed experts
take their grouped form (no routing read back), as in ``ds_model.cuda_graph``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ds_quant.kernels import cpu_gemv

from ds_model.cache import PagedKVCache, PagedWriter
from ds_model.cuda_graph import run_skipping_guards
from ds_model.layout import input_major_weights
from ds_model.matvec import MatVecLinears
from ds_model.moe import RoutedExperts

__all__ = ["DECODE_BUCKETS", "DecodeBuckets", "pick_bucket"]

DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
STEP_MODES = ("compile", "cuda_graph")
# The compiled step's table has at least this many blocks: torch.compile specialises a
# dimension of size 1, and the width is meant to stay dynamic.
MIN_TABLE_WIDTH = 2


def pick_bucket(num_rows: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding ``num_rows`` rows; None when none does (run eagerly)."""
    for size in buckets:
        if size >= num_rows:
            return size
    return None


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """``buckets`` as a sorted tuple of distinct positive ints, or a ValueError."""
    if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
        raise ValueError(f"decode buckets must be positive ints, got {list(buckets)!r}")
    return tuple(sorted(set(buckets)))


class DecodeBuckets:
    """Runs decode-only steps of ``model`` over ``cache`` padded to a bucket.

    ``scratch_block``: a pool block no sequence owns; padding rows write and read there.
    ``run(token_ids, positions, block_tables)`` (one token per sequence) returns the
    (num_seqs, vocab) logits, or None when the batch is larger than every bucket (the
    caller runs its eager step)."""

    def __init__(
        self,
        model,
        cache: PagedKVCache,
        scratch_block: int,
        *,
        mode: str = "compile",
        buckets: Sequence[int] = DECODE_BUCKETS,
    ) -> None:
        if mode not in STEP_MODES:
            raise ValueError(f"mode={mode!r} must be one of {STEP_MODES}")
        if mode == "cuda_graph" and model.device.type != "cuda":
            raise ValueError(f"mode='cuda_graph' needs a CUDA model, got {model.device}")
        self.buckets = check_buckets(buckets)
        self.mode = mode
        self.model, self.cache, self.scratch = model, cache, scratch_block
        self.device = model.device
        # The grouped form of routed experts reads them in place, stacked.
        stacked = [m.stack_weights() for m in model.modules() if isinstance(m, RoutedExperts)]
        if mode == "cuda_graph" and not all(stacked):
            raise ValueError(
                "mode='cuda_graph' needs routed experts that can be stacked for their grouped "
                "form (no wrapped, quantized or hooked experts: their loop reads the routing "
                "on the host)"
            )
        if self.device.type == "cpu" and mode == "compile":
            input_major_weights(model)  # faster few-row matmuls; see ds_model.layout
        self._compiled = torch.compile(self._matvec_forward) if mode == "compile" else None
        # Buckets of 2 to fp32_rows() rows of a float32 CPU model, where ds-quant's kernel
        # is built, share a graph of their own whose float32 layers run the kernel on the
        # input-major weights (MatVecLinears(few_rows=True)); the larger buckets' graph
        # keeps MKL's matmul, faster at many rows.
        float32_cpu = self.device.type == "cpu" and model.dtype == torch.float32
        self._few_rows = cpu_gemv.fp32_rows() if self._compiled is not None and float32_cpu else 0
        self._compiled_few = torch.compile(self._few_rows_forward) if self._few_rows > 1 else None
        self._checked: set[int] = set()  # buckets whose guards passed since recheck()
        self._graphs: dict[int, _Graph] = {}
        self._pool = None  # the captured graphs' shared memory pool (replays never overlap)
        # The captured steps' table spans the model's whole context.
        bs = cache.block_size
        self.max_width = -(-model.config.max_position_embeddings // bs)

    def inputs(
        self,
        token_ids: Sequence[int],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        bucket: int,
        width: int,
    ) -> tuple[torch.Tensor, ...]:
        """The padded step inputs on the host: ids (bucket, 1), positions (bucket, 1),
        write slots (bucket,), block tables (bucket, width), context lengths (bucket,).

        All are views of one int64 tensor made from one flat list (tables and lengths
        int32 on CUDA, for the Triton kernel): one tensor a step, not one per input."""
        bs, scratch = self.cache.block_size, self.scratch
        pad = bucket - len(token_ids)
        slots, tables = [], []
        for p, table in zip(positions, block_tables):
            used = p // bs + 1
            slots.append(table[used - 1] * bs + p % bs)
            tables += table[:used]
            tables += [scratch] * (width - used)
        flat = [
            *token_ids,
            *[0] * pad,
            *positions,
            *[0] * pad,
            *slots,
            *[scratch * bs] * pad,
            *[p + 1 for p in positions],
            *[1] * pad,
            *tables,
            *[scratch] * (width * pad),
        ]
        ids, pos, slot, lens, table = torch.tensor(flat, dtype=torch.long).split_with_sizes(
            [bucket, bucket, bucket, bucket, bucket * width]
        )
        table = table.view(bucket, width)
        if self.device.type == "cuda":
            table, lens = table.to(torch.int32), lens.to(torch.int32)
        return ids[:, None], pos[:, None], slot, table, lens

    def warm_up(self) -> None:
        """Compile (or capture) the step of every bucket now, on padding rows only (they
        touch nothing but the scratch block), so that no request waits for it."""
        width = self.max_width if self.mode == "cuda_graph" else MIN_TABLE_WIDTH
        # Largest first: the captured graphs share one memory pool, sized by the first.
        for bucket in reversed(self.buckets):
            self._call(self.inputs([], [], [], bucket, width), bucket)

    def recheck(self) -> None:
        """Check torch.compile's guards again on each bucket's next call (recompiling
        what the model's changes need)."""
        self._checked.clear()

    def run(
        self,
        token_ids: Sequence[int],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> torch.Tensor | None:
        n = len(token_ids)
        bucket = pick_bucket(n, self.buckets)
        if bucket is None:
            return None
        bs = self.cache.block_size
        if self.mode == "cuda_graph":
            width = self.max_width
        else:
            width = max(MIN_TABLE_WIDTH, max(p // bs + 1 for p in positions))
        inputs = self.inputs(token_ids, positions, block_tables, bucket, width)
        return self._call(inputs, bucket)[:n]

    def _call(self, inputs: tuple[torch.Tensor, ...], bucket: int) -> torch.Tensor:
        with torch.inference_mode():
            if self.mode == "cuda_graph":
                graph = self._graphs.get(bucket)
                if graph is None:
                    if self._pool is None:
                        self._pool = torch.cuda.graph_pool_handle()
                    graph = self._graphs[bucket] = _Graph(self._forward, inputs, self._pool)
                return graph.replay(inputs).clone()
            if self.device.type != "cpu":
                inputs = [t.to(self.device) for t in inputs]
            compiled = self._compiled_few if 1 < bucket <= self._few_rows else self._compiled
            if bucket in self._checked:
                return run_skipping_guards(compiled, *inputs)
            # One graph for every context length, and one for every bucket above 1
            # (torch.compile specialises a size of 1, so batch 1 gets its own).
            # mark_dynamic is torch's documented way to say so up front (under torch._dynamo):
            # without it the first new width or bucket recompiles, mid-request. With it the
            # warm-up builds every graph (tests/test_decode_buckets.py counts them). Only a
            # call that checks the guards can compile; the others need no marks.
            torch._dynamo.mark_dynamic(inputs[3], 1)
            if bucket > 1:
                for t in inputs:
                    torch._dynamo.mark_dynamic(t, 0)
            logits = compiled(*inputs)
            self._checked.add(bucket)
            return logits

    def _matvec_forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        with MatVecLinears():  # one-row 16-bit float linears as multiply-and-sum
            return self._forward(*inputs)

    def _few_rows_forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        # Only buckets of at most fp32_rows() rows come here: their float32 layers may
        # take the kernel whatever the (dynamic) row count.
        with MatVecLinears(few_rows=True):
            return self._forward(*inputs)

    def _forward(self, ids, positions, slots, tables, context_lens) -> torch.Tensor:
        writer = PagedWriter(
            self.cache, slots, slots[:0], block_tables=tables, context_lens=context_lens
        )
        hidden = self.model.model(ids, positions, cache=writer, history=True)
        return self.model.lm_head(hidden[:, 0])


class _Graph:
    """One captured decode step: static inputs, one CUDA graph, a static logits buffer."""

    def __init__(self, forward, example: tuple[torch.Tensor, ...], pool) -> None:
        self.inputs = [t.to("cuda") for t in example]
        # Warm up on a side stream (lazy initialisations, cuBLAS workspaces) before the
        # capture, as torch.cuda.graphs documents. Every write lands in the slots the
        # real step writes next anyway.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = forward(*self.inputs)

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for static, new in zip(self.inputs, inputs):
            static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.logits
