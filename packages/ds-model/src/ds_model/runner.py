"""The serving step: one mixed prefill/decode forward over a paged KV cache.

A serving engine (ds-serve, with ds-batching's scheduler) owns the block tables; the
runner owns the block pool and does the math. They meet through plain data, as
vLLM's scheduler and model runner do, so ds-model never imports ds-batching:

- ``token_ids[s]``: the tokens sequence ``s`` feeds this step (its whole prompt or a
  chunk of it for a prefill, one token for a decode);
- ``positions[s]``: the position of the first of them (tokens before it are cached);
- ``block_tables[s]``: the physical blocks holding the sequence, in order. Position
  ``p`` lives in slot ``block_tables[s][p // block_size] * block_size + p % block_size``.

All new tokens are packed into one batch of N rows (one token each), so every linear
layer runs once per step and LoRA can pick an adapter per row. Decode rows (sequences
feeding one token) come first and attend over the pool in place: each layer hands
ds-attention's ``paged_decode_attention`` the pool and the rows' block tables, nothing
is copied per sequence, and MLA runs its absorbed form over the cached latent (one kv
head of latent + rope key shared by all query heads; values = the latent). Prefill and
chunked-prefill rows attend over their gathered contexts through ds-attention's varlen
API (``cu_seqlens`` for their new tokens and contexts). Logits come back in the order
the sequences were given.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ds_model.cache import PagedKVCache, PagedWriter
from ds_model.config import ModelConfig
from ds_model.decode_buckets import DECODE_BUCKETS, DecodeBuckets
from ds_model.mlp import project

__all__ = ["ModelRunner", "SequenceBatch", "num_blocks_for_memory"]

# Attention patterns the paged pool serves: dense and sliding_window through
# ds-attention's paged decode / varlen calls, gated around them. The per-query patterns
# (dynamic_window, block_sparse, nsa) are refused at load.
PAGED_ATTENTION_KINDS = ("dense", "sliding_window", "gated")


def num_blocks_for_memory(
    config: ModelConfig,
    memory_bytes: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """How many KV blocks fit in ``memory_bytes``: budget // bytes per block, where a
    block holds ``block_size`` tokens of every layer (MLA: latent + rope key)."""
    if memory_bytes <= 0 or block_size <= 0:
        raise ValueError(
            f"memory_bytes={memory_bytes} and block_size={block_size} must be positive"
        )
    return memory_bytes // PagedKVCache.bytes_per_block(config, block_size, dtype)


@dataclass(frozen=True)
class SequenceBatch:
    """The plain data of one step (what ``step`` takes), as one value for engines that
    prefer to pass an object: ``runner.step(*batch)``."""

    token_ids: Sequence[Sequence[int]]
    positions: Sequence[int]
    block_tables: Sequence[Sequence[int]]

    def __iter__(self):
        return iter((self.token_ids, self.positions, self.block_tables))


class ModelRunner:
    """Satisfies ``ModelRunnerProtocol``. Give ``num_blocks`` or ``memory_bytes``.

    ``decode_steps``: ``"compile"`` or ``"cuda_graph"`` runs decode-only steps (no
    adapters, no prompt scoring) padded to the smallest of ``decode_buckets`` that
    holds them, through ``torch.compile`` or one CUDA graph per bucket (see
    ``ds_model.decode_buckets``); other steps, and batches beyond the largest bucket,
    run eagerly. The pool then keeps one extra scratch block for the padding rows.
    Compiled decode steps check torch.compile's guards on their first call after any
    other step (a new request's prefill) and skip them until the next: changing the
    model while requests decode is unsupported."""

    def __init__(
        self,
        model: Any,
        *,
        num_blocks: int | None = None,
        memory_bytes: int | None = None,
        block_size: int = 16,
        dtype: torch.dtype | None = None,
        decode_steps: str | None = None,
        decode_buckets: Sequence[int] = DECODE_BUCKETS,
    ) -> None:
        self.model = model.eval()
        self.config: ModelConfig = model.config
        kind = self.config.attention.kind
        if kind not in PAGED_ATTENTION_KINDS:
            raise ValueError(
                f"attention kind={kind!r} cannot run in the paged runner (its per-query "
                f"selection needs each sequence's keys as one tensor); paged attention "
                f"kinds: {', '.join(PAGED_ATTENTION_KINDS)}"
            )
        dtype = dtype or model.dtype
        if (num_blocks is None) == (memory_bytes is None):
            raise ValueError("give exactly one of num_blocks= or memory_bytes=")
        if num_blocks is None:
            num_blocks = num_blocks_for_memory(self.config, memory_bytes, block_size, dtype)
            if num_blocks == 0:
                need = PagedKVCache.bytes_per_block(self.config, block_size, dtype)
                raise ValueError(
                    f"memory_bytes={memory_bytes} is smaller than one KV block ({need} bytes)"
                )
        self.block_size = block_size
        self.device = model.device
        self._num_blocks = num_blocks
        scratch = 1 if decode_steps is not None else 0
        self.cache = PagedKVCache(self.config, num_blocks + scratch, block_size, dtype, self.device)
        self._offsets = torch.arange(block_size, device=self.device)
        self.decode_steps: DecodeBuckets | None = None
        self._in_place: bool | None = None  # _decodes_in_place(), kept between bucketed decodes
        if decode_steps is not None:
            if not self._decodes_in_place():
                raise ValueError(
                    f"decode_steps={decode_steps!r} needs decode rows that read the pool in "
                    "place: no sliding_window, and MLA's kv_b_proj a plain nn.Linear (not "
                    "LoRA-wrapped or quantized)"
                )
            self.decode_steps = DecodeBuckets(
                model, self.cache, num_blocks, mode=decode_steps, buckets=decode_buckets
            )

    @property
    def num_blocks(self) -> int:
        """Blocks sequences may use (the scratch block of bucketed decode steps excluded)."""
        return self._num_blocks

    def step(
        self,
        token_ids: Sequence[Sequence[int]],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        adapters: Sequence[str | None] | None = None,
        all_positions: Sequence[bool] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Run one step; returns each sequence's last-position logits (num_seqs, vocab).

        ``adapters``: per sequence, the name of a LoRA adapter loaded on the model (see
        ``ds_model.load_adapter``) or ``None`` for the base model; a mixed batch runs in
        one pass through ds-lora's ``adapter_batch``.

        ``all_positions``: per sequence, whether to also return the logits of every
        token it feeds this step (prompt scoring). When given, the result is
        ``(last_logits, per_sequence)`` where ``per_sequence[s]`` is
        (len(token_ids[s]), vocab) for flagged sequences and ``None`` for the others."""
        if kwargs:
            raise TypeError(f"step() got unexpected arguments: {', '.join(sorted(kwargs))}")
        n_seqs = len(token_ids)
        if n_seqs == 0:
            raise ValueError("token_ids is empty: a step needs at least one sequence")
        if len(positions) != n_seqs or len(block_tables) != n_seqs:
            raise ValueError(
                f"token_ids, positions and block_tables must have one entry per sequence; "
                f"got {n_seqs}, {len(positions)} and {len(block_tables)}"
            )
        if all_positions is not None and len(all_positions) != n_seqs:
            raise ValueError(
                f"all_positions must have one entry per sequence ({n_seqs}), "
                f"got {len(all_positions)}"
            )
        for s, (toks, start, table) in enumerate(zip(token_ids, positions, block_tables)):
            self._check(s, toks, start, table)
        # Decode rows (one token each) go first: they read the pool in place through
        # their block tables; the prefill rows after them read gathered contexts.
        in_place = self._in_place if self._in_place is not None else self._decodes_in_place()
        if (
            self.decode_steps is not None
            and in_place
            and adapters is None
            and all_positions is None
            and all(len(t) == 1 for t in token_ids)
        ):
            logits = self.decode_steps.run([t[0] for t in token_ids], positions, block_tables)
            if logits is not None:
                # Bucketed decodes skip the model's checks until the next other step, as
                # their compiled steps skip torch.compile's guards (see DecodeBuckets).
                self._in_place = in_place
                return logits
        if self.decode_steps is not None:
            self.decode_steps.recheck()  # a prefill: the model may have changed before it
            self._in_place = None
        decode = [s for s in range(n_seqs) if in_place and len(token_ids[s]) == 1]
        prefill = [s for s in range(n_seqs) if not (in_place and len(token_ids[s]) == 1)]
        order = decode + prefill
        permuted = order != list(range(n_seqs))
        if permuted:
            token_ids = [token_ids[s] for s in order]
            positions = [positions[s] for s in order]
            block_tables = [block_tables[s] for s in order]
            if adapters is not None and len(adapters) == n_seqs:
                adapters = [adapters[s] for s in order]
        writer, ids, pos, (cu_q, cu_k), new_lens, ctx_lens = self._writer(
            token_ids, positions, block_tables, len(decode)
        )
        dev = self.device
        # kv_b_proj's context rows are the gathered contexts: the prefill sequences'.
        token_rows, seq_rows, context_rows = self._adapter_rows(
            adapters, new_lens, ctx_lens[len(decode) :], len(decode)
        )
        with torch.inference_mode():
            with token_rows, context_rows:
                hidden = self.model.model(
                    ids,
                    pos,
                    cu_seqlens=(cu_q, cu_k),
                    cache=writer,
                    history=any(p > 0 for p in positions),
                )
            # Each sequence's last row; a decode-only step's rows are exactly those.
            last = hidden[:, 0] if len(decode) == n_seqs else hidden[cu_q[1:].long() - 1, 0]
            with seq_rows:
                logits = project(self.model.lm_head, last)
            if permuted:
                logits = logits[torch.tensor(order, device=dev).argsort()]
            if all_positions is None:
                return logits
            flags = [all_positions[s] for s in order]
            per_sequence: list[torch.Tensor | None] = [None] * n_seqs
            for s, block in zip(order, self._all_logits(hidden, flags, new_lens, adapters)):
                per_sequence[s] = block
            return logits, per_sequence

    def _all_logits(self, hidden, flags, new_lens: list[int], adapters) -> list:
        """The logits of every new token of the flagged sequences (one lm_head call)."""
        starts = [0, *_cumsum(new_lens)]
        picked = [s for s, flag in enumerate(flags) if flag]
        out: list[torch.Tensor | None] = [None] * len(flags)
        if not picked:
            return out
        rows = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in picked])
        rows_adapters = contextlib.nullcontext()
        if adapters is not None:
            import ds_lora

            names = [adapters[s] for s in picked for _ in range(new_lens[s])]
            rows_adapters = ds_lora.adapter_batch(self.model, names)
        with rows_adapters:
            logits = self.model.lm_head(hidden[rows.to(hidden.device), 0])
        for s, block in zip(picked, logits.split([new_lens[s] for s in picked])):
            out[s] = block
        return out

    def _decodes_in_place(self) -> bool:
        """Whether decode rows may attend over the pool in place: not under a sliding
        window (ds-attention's paged decode has none), and for MLA only where every layer
        can run the absorbed form (a LoRA or quantized ``kv_b_proj`` must be applied to
        each cached latent, so those decode rows read gathered contexts instead)."""
        if self.config.sliding_window is not None:
            return False
        return all(layer.self_attn.can_absorb() for layer in self._mla_layers())

    def _mla_layers(self) -> list[Any]:
        return list(self.model.model.layers) if self.config.is_mla else []

    def _writer(self, token_ids, positions, block_tables, num_decode: int):
        """The step's ``PagedWriter`` and its packed rows: token ids and positions (N, 1),
        the varlen boundaries (cu_q, cu_k), new and context lengths per sequence.
        Sequences ``[0, num_decode)`` are decode rows.

        Every index tensor of the step is a view of one tensor built from one flat list
        (int64, on the CPU) or of two (int64, and int32 for the Triton kernels, on CUDA):
        one or two ``torch.tensor`` calls (host-to-device copies on CUDA) per step instead
        of one per index. The decode rows' shortest and longest context go to the writer
        as ints, so no layer reads them back."""
        dev, bs = self.device, self.block_size
        flat_tokens: list[int] = []
        flat_pos: list[int] = []
        new_lens, ctx_lens = [], []
        for toks, start in zip(token_ids, positions):
            flat_tokens.extend(toks)
            flat_pos.extend(range(start, start + len(toks)))
            new_lens.append(len(toks))
            ctx_lens.append(start + len(toks))
        decode_slots, widths = [], []
        for s in range(num_decode):
            p, table = positions[s], block_tables[s]
            decode_slots.append(table[p // bs] * bs + p % bs)
            widths.append(-(-ctx_lens[s] // bs))
        width = max(widths, default=0)
        table_rows: list[int] = []
        for s, w in enumerate(widths):
            table_rows.extend(block_tables[s][:w])
            table_rows.extend([0] * (width - w))
        prefill_new, prefill_ctx = new_lens[num_decode:], ctx_lens[num_decode:]
        longs = [flat_tokens, flat_pos, decode_slots]
        ints = [
            [0, *_cumsum(new_lens)],
            [0, *_cumsum(ctx_lens)],
            ctx_lens[:num_decode],
            [0, *_cumsum(prefill_new)] if prefill_new else [],
            [0, *_cumsum(prefill_ctx)] if prefill_ctx else [],
            table_rows,
        ]
        if dev.type == "cuda":
            # int32 block tables, lengths and boundaries for the Triton kernels.
            ids, pos, decode_write = _views(longs, torch.long, dev)
            index = _views(ints, torch.int32, dev)
        else:
            # The CPU paths take int64 indices (ds-attention's torch path indexes with
            # them): one tensor holds the step's every index, one host copy per step.
            ids, pos, decode_write, *index = _views(longs + ints, torch.long, dev)
        cu_q, cu_k, decode_lens, prefill_cu_q, prefill_cu_k, tables = index
        write = [decode_write]
        read = []
        for s in range(num_decode, len(token_ids)):
            blocks = torch.as_tensor(list(block_tables[s]), dtype=torch.long, device=dev)
            slots = (blocks[:, None] * bs + self._offsets).reshape(-1)
            read.append(slots[: ctx_lens[s]])
            write.append(slots[positions[s] : ctx_lens[s]])
        decode_tables = context_lens = prefill_cu = context_range = None
        if num_decode:
            decode_tables = tables.view(num_decode, width)
            context_lens = decode_lens
            context_range = (min(ctx_lens[:num_decode]), max(ctx_lens[:num_decode]))
        if num_decode < len(token_ids):
            prefill_cu = (prefill_cu_q, prefill_cu_k)
        writer = PagedWriter(
            self.cache,
            torch.cat(write) if len(write) > 1 else write[0],
            torch.cat(read) if read else write[0][:0],
            block_tables=decode_tables,
            context_lens=context_lens,
            prefill_cu_seqlens=prefill_cu,
            prefill_history=any(p > 0 for p in positions[num_decode:]),
            context_range=context_range,
        )
        return writer, ids[:, None], pos[:, None], (cu_q, cu_k), new_lens, ctx_lens

    def _adapter_rows(self, adapters, new_lens: list[int], ctx_lens: list[int], skip: int):
        """Context managers giving each new-token row, each sequence row, and each context
        row its adapter. The last is for MLA's ``kv_b_proj``, the one projection applied
        to every gathered context token (the naive path expands the latents of the packed
        contexts) rather than to the step's new tokens; ``ctx_lens`` are the gathered
        contexts' lengths, those of the sequences after the first ``skip``."""
        none = contextlib.nullcontext()
        if adapters is None:
            return none, none, none
        if len(adapters) != len(new_lens):
            raise ValueError(
                f"adapters must have one entry per sequence ({len(new_lens)}), got {len(adapters)}"
            )
        import ds_lora

        per_token = [name for name, n in zip(adapters, new_lens) for _ in range(n)]
        context_rows = none
        if any(isinstance(layer, ds_lora.LoraLinear) for layer in self._kv_b_projs()):
            per_context = [name for name, n in zip(adapters[skip:], ctx_lens) for _ in range(n)]
            context_rows = ds_lora.adapter_batch(self.model, per_context, only=["kv_b_proj"])
        return (
            ds_lora.adapter_batch(self.model, per_token),
            ds_lora.adapter_batch(self.model, list(adapters)),
            context_rows,
        )

    def _kv_b_projs(self) -> list[Any]:
        if not self.config.is_mla:
            return []
        return [layer.self_attn.kv_b_proj for layer in self.model.model.layers]

    def _check(self, s: int, toks: Sequence[int], start: int, table: Sequence[int]) -> None:
        if len(toks) == 0:
            raise ValueError(f"sequence {s}: token_ids is empty")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"sequence {s}: position={start!r} must be an int >= 0")
        end = start + len(toks)
        if end > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence {s}: position {end - 1} is beyond the model's context "
                f"(max_position_embeddings={self.config.max_position_embeddings})"
            )
        need = -(-end // self.block_size)
        if len(table) < need:
            raise ValueError(
                f"sequence {s}: block table has {len(table)} blocks but positions up to "
                f"{end - 1} need {need} (block_size={self.block_size})"
            )
        bad = []
        if table and not (0 <= min(table) and max(table) < self.num_blocks):
            bad = [b for b in table if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(
                f"sequence {s}: block ids {bad[:5]} are outside the pool [0, {self.num_blocks})"
            )
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in toks):
            raise ValueError(f"sequence {s}: token ids must be in [0, {vocab})")


def _views(parts: list[list[int]], dtype: torch.dtype, device: torch.device):
    """One tensor of ``dtype`` from the concatenated ``parts``; a view per part."""
    flat = list(itertools.chain.from_iterable(parts))
    return torch.tensor(flat, dtype=dtype, device=device).split_with_sizes([len(p) for p in parts])


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out
