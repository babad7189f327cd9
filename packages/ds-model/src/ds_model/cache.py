"""KV caches: a static contiguous one for ``generate`` and a paged block pool for serving.

What a layer caches depends on its attention (``cache_entry_shapes``):

- MLA (V2/V3): one tensor per token, ``(kv_lora_rank + qk_rope_head_dim,)``: the
  normalised compressed latent followed by the rotated shared rope key. Nothing else.
- MHA/GQA (llama): key and value, ``(kv_heads, head_dim)`` each.

A forward pass talks to a cache through a small writer object built for that pass:
``update(layer_idx, new)`` stores the new tokens' entries and returns everything the
new tokens may attend to, in the layout the attention call needs.
"""

from __future__ import annotations

import torch

from ds_model.config import ModelConfig

__all__ = [
    "ContiguousWriter",
    "PagedKVCache",
    "PagedWriter",
    "StaticKVCache",
    "cache_entry_shapes",
]


def cache_entry_shapes(config: ModelConfig) -> list[tuple[int, ...]]:
    """Per-token shapes of the tensors one layer caches."""
    if config.is_mla:
        return [(config.kv_lora_rank + config.qk_rope_head_dim,)]
    return [(config.num_key_value_heads, config.head_dim)] * 2


class StaticKVCache:
    """Preallocated (batch, max_len, ...) tensors per layer; positions fill left to right.

    Rows of a left-padded batch share slot indices, so one write per layer serves the
    whole batch and the decode loop allocates nothing per step.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shapes = cache_entry_shapes(config)
        self.layers = [
            [torch.zeros(batch_size, max_len, *s, dtype=dtype, device=device) for s in shapes]
            for _ in range(config.num_hidden_layers)
        ]
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0  # tokens written so far

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies over all layers."""
        return self.nbytes // (self.batch_size * self.max_len)

    def writer(self, num_new: int) -> ContiguousWriter:
        if self.length + num_new > self.max_len:
            raise ValueError(
                f"the KV cache holds max_len={self.max_len} tokens; {self.length} are used "
                f"and {num_new} more do not fit"
            )
        return ContiguousWriter(self, self.length, num_new)


class ContiguousWriter:
    def __init__(self, cache: StaticKVCache, start: int, num_new: int) -> None:
        self.cache, self.start, self.end = cache, start, start + num_new

    def update(self, layer_idx: int, new: list[torch.Tensor]) -> list[torch.Tensor]:
        """``new``: (batch, num_new, ...) each -> (batch, start + num_new, ...) each."""
        stores = self.cache.layers[layer_idx]
        for store, t in zip(stores, new):
            store[:, self.start : self.end] = t
        return [store[:, : self.end] for store in stores]


class PagedKVCache:
    """A pool of fixed-size blocks per layer: (num_blocks, block_size, ...) tensors.

    A sequence's token at position ``p`` lives in slot
    ``block_table[p // block_size] * block_size + p % block_size`` of the flattened pool.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"num_blocks={num_blocks} and block_size={block_size} must be positive"
            )
        self.shapes = cache_entry_shapes(config)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.layers = [
            [
                torch.zeros(num_blocks, block_size, *s, dtype=dtype, device=device)
                for s in self.shapes
            ]
            for _ in range(config.num_hidden_layers)
        ]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        per_token = sum(int(torch.Size(s).numel()) for s in cache_entry_shapes(config))
        itemsize = torch.empty((), dtype=dtype).element_size()
        return per_token * itemsize * block_size * config.num_hidden_layers


class PagedWriter:
    """One serving step's access to the block pool. The step's new tokens are packed
    rows (N, 1, ...); the first ``num_decode`` rows are decode rows (one token per
    sequence, attending over the pool in place through ``block_tables``), the rest
    belong to prefill (or chunked-prefill) sequences, which read their gathered context.

    ``write_slots`` (N,): pool slot of each new token. ``block_tables`` (num_decode,
    max_blocks) and ``context_lens`` (num_decode,), int32 on CUDA and int64 on the CPU:
    the decode rows' blocks and context lengths (their new token included), as ds-attention's
    ``paged_decode_attention`` takes them. ``read_slots``: pool slots of every prefill
    sequence's context, sequence after sequence; ``prefill_cu_seqlens`` (cu_q, cu_k):
    the prefill rows' varlen boundaries; ``prefill_history``: whether any prefill
    sequence has cached tokens before its new ones (a chunked prefill).
    ``context_range``: the decode rows' (shortest, longest) context as Python ints, when
    the step was built from host values: every layer's paged decode uses it instead of
    reading ``context_lens`` back (``None`` in a compiled or captured step).
    """

    def __init__(
        self,
        cache: PagedKVCache,
        write_slots: torch.Tensor,
        read_slots: torch.Tensor,
        *,
        block_tables: torch.Tensor | None = None,
        context_lens: torch.Tensor | None = None,
        prefill_cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None,
        prefill_history: bool = False,
        context_range: tuple[int, int] | None = None,
    ) -> None:
        self.cache, self.write_slots, self.read_slots = cache, write_slots, read_slots
        self.block_tables, self.context_lens = block_tables, context_lens
        self.num_decode = 0 if context_lens is None else int(context_lens.shape[0])
        self.prefill_cu_seqlens = prefill_cu_seqlens
        self.prefill_history = prefill_history
        self.context_range = context_range

    def _slots(self, layer_idx: int) -> list[torch.Tensor]:
        """The layer's pool tensors as (num_blocks * block_size, ...) slots.

        Views made per call, not once: views kept on the cache would enter a compiled
        step as inputs of their own aliasing the pool, and torch.compile's
        functionalization then copies the whole pool at every step that writes to it
        (ds-serve's compiled decode step took 154 ms instead of 1.8 ms with its default
        8,192-block pool, built-in model, EPYC-512)."""
        return [
            pool.view(-1, *s) for pool, s in zip(self.cache.layers[layer_idx], self.cache.shapes)
        ]

    def write(self, layer_idx: int, new: list[torch.Tensor]) -> None:
        """Store the new rows' entries (N, 1, ...) each in their slots."""
        for flat, t, shape in zip(self._slots(layer_idx), new, self.cache.shapes):
            if t.dtype != flat.dtype:
                t = t.to(flat.dtype)
            flat.index_copy_(0, self.write_slots, t.reshape(-1, *shape))

    def pages(self, layer_idx: int) -> list[torch.Tensor]:
        """The layer's pool tensors, (num_blocks, block_size, ...) each: read in place."""
        return self.cache.layers[layer_idx]

    def context(self, layer_idx: int) -> list[torch.Tensor]:
        """The prefill sequences' packed contexts, (1, sum(context_lens), ...) each."""
        return [
            flat.index_select(0, self.read_slots).unsqueeze(0) for flat in self._slots(layer_idx)
        ]

    def update(self, layer_idx: int, new: list[torch.Tensor]) -> list[torch.Tensor]:
        """``write`` then ``context``: for a step without decode rows."""
        if self.num_decode:
            raise RuntimeError(
                f"this step has {self.num_decode} decode rows that read the pool in place "
                "(block_tables); the attention layer must use write/pages/context"
            )
        self.write(layer_idx, new)
        return self.context(layer_idx)
