"""DDP communication hooks that move 4-bit (or 8-bit) gradients instead of fp32.

``ddp_model.register_comm_hook(state, int4_allreduce_hook)``. DDP calls the hook once
per gradient bucket as soon as the bucket is ready, while backward still runs for
the earlier layers. The hook hands the bucket to the state's worker thread
(quantize, exchange, dequantize, average) and returns a Future at once, so the
exchange overlaps the rest of backward as DDP's own all-reduce does; DDP waits on
the Futures at the end of backward.

Why one worker thread: every rank must issue its collectives in the same order.
Chaining the second collective of a bucket onto the first one's Future (as
PowerSGD's hook does) makes that order depend on which bucket's first collective
finishes first, which differs between ranks and deadlocked gloo with several
buckets. A single FIFO thread processes buckets in the order DDP submits them,
which is the same on every rank.

Codes are never summed in 4 bits (sums would overflow and scales differ per rank).
Two exchange patterns, chosen by ``QuantizedAllreduceState(mode=...)``:

``"reduce_scatter"`` (default, ZeRO++ qgZ style). The bucket is split into one chunk
per rank. Each rank quantizes its whole bucket, ``all_to_all`` sends chunk j to rank
j, rank j dequantizes the world's copies of its chunk and averages them in fp32,
quantizes that average again and ``all_gather`` returns every rank's averaged chunk.
Per rank this moves ``2 (W-1) * chunk_bytes``, against ``2 (W-1) * 4 n / W`` for a
ring fp32 all-reduce: 7.76x fewer bytes at any world size (block 128, bf16 scales).
The error is one quantization of each input plus one of the average.

``"all_gather"``. Each rank quantizes its bucket once and all-gathers the payloads;
every rank dequantizes all of them and averages. One quantization error only, but
``(W-1) * payload`` bytes per rank: the saving shrinks as ``15.5 / W``.

Either way every rank decodes the same bytes in the same order, so all replicas get
bit-identical gradients and stay in sync.

Gradient accumulation: inside ``ddp_model.no_sync()`` DDP does not call the hook;
gradients accumulate locally in ``param.grad``. On the next synchronizing backward
the bucket holds the accumulated sum and is compressed once, so an accumulation
window of k micro-batches costs one compressed exchange and adds one quantization
error, not k. Error-feedback residuals advance only on synchronizing steps.
"""

# No `from __future__ import annotations`: DDP checks the hooks' annotations at runtime
# (the bucket must be annotated dist.GradBucket, not the string).

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from ds_optim.blockquant import QuantizedTensor
from ds_optim.compressor import (
    BlockwiseGradientCompressor,
    Int4GradientCompressor,
    Int8GradientCompressor,
)

__all__ = [
    "CommStats",
    "QuantizedAllreduceState",
    "int4_allreduce_hook",
    "int8_allreduce_hook",
    "quantized_allreduce_hook",
]

_MODES = ("reduce_scatter", "all_gather")


@dataclass
class CommStats:
    """What the hook sent, counted per rank. ``fp32_allreduce_bytes`` is what a ring
    fp32 all-reduce of the same buckets would have sent: ``2 (W-1) / W * 4 n``."""

    calls: int = 0
    elements: int = 0
    bytes_sent: int = 0
    fp32_allreduce_bytes: int = 0

    @property
    def reduction(self) -> float:
        return self.fp32_allreduce_bytes / self.bytes_sent if self.bytes_sent else float("nan")


class QuantizedAllreduceState:
    """Hook state: the compressor (with its residuals), the process group and stats.

    Picklable (the process group is dropped and re-bound to the default group on
    unpickling, like PowerSGD's state) and checkpointable via ``state_dict()``.
    The compressor's seed is offset by the rank so that stochastic rounding errors of
    different ranks are independent and average out.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        bits: int = 4,
        block_size: int = 128,
        stochastic_rounding: bool = True,
        error_feedback: bool = True,
        scale_dtype: torch.dtype = torch.bfloat16,
        mode: str = "reduce_scatter",
        seed: int = 0,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode={mode!r} is not supported; allowed: {_MODES}")
        classes = {4: Int4GradientCompressor, 8: Int8GradientCompressor}
        if bits not in classes:
            raise ValueError(f"bits={bits!r} is not supported; allowed: (4, 8)")
        self.process_group = process_group
        self.mode = mode
        rank = dist.get_rank(process_group) if dist.is_initialized() else 0
        self.compressor: BlockwiseGradientCompressor = classes[bits](
            block_size,
            stochastic_rounding,
            error_feedback,
            scale_dtype=scale_dtype,
            seed=seed + rank,
        )
        self.stats = CommStats()
        self._pool: ThreadPoolExecutor | None = None

    def _executor(self) -> ThreadPoolExecutor:
        # One thread: buckets are exchanged strictly in the order DDP submits them.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ds-optim-comm")
        return self._pool

    @property
    def bits(self) -> int:
        return self.compressor.bits

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "compressor": self.compressor.state_dict(),
            "stats": asdict(self.stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] not in _MODES:
            raise ValueError(f"mode={state['mode']!r} is not supported; allowed: {_MODES}")
        self.mode = state["mode"]
        self.compressor.load_state_dict(state["compressor"])
        self.stats = CommStats(**state["stats"])

    def __getstate__(self) -> dict[str, Any]:
        return {"bits": self.bits, "state": self.state_dict()}

    def __setstate__(self, pickled: dict[str, Any]) -> None:
        self.__init__(None, bits=pickled["bits"])  # type: ignore[misc]
        self.load_state_dict(pickled["state"])


def _to_bytes(q: QuantizedTensor, num_chunks: int) -> torch.Tensor:
    """uint8 ``(num_chunks, chunk_bytes)``: row j = codes then scales of chunk j."""
    codes = q.codes.view(num_chunks, -1)
    scales = q.scales.view(num_chunks, -1).view(torch.uint8).view(num_chunks, -1)
    return torch.cat((codes, scales), dim=1)


def _from_bytes(
    row: torch.Tensor, numel: int, comp: BlockwiseGradientCompressor
) -> QuantizedTensor:
    code_bytes = numel * comp.bits // 8
    codes = row[:code_bytes]
    scales = row[code_bytes:].contiguous().view(comp.scale_dtype)
    return QuantizedTensor(
        codes, scales, torch.Size((numel,)), torch.float32, comp.bits, comp.block_size
    )


def quantized_allreduce_hook(
    state: QuantizedAllreduceState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` across ranks through quantized payloads; see the module doc.

    The exchange runs on the state's single worker thread, so backward continues
    while it runs; buckets are processed in the order DDP hands them over, which
    is the same on every rank, so every rank issues its collectives in the same order.
    """
    buffer = bucket.buffer()
    index = bucket.index()
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()

    def job() -> None:
        try:
            _exchange(state, buffer, index)
        except BaseException as exc:  # hand any failure to DDP, which raises it
            future.set_exception(exc)
        else:
            future.set_result(buffer)

    state._executor().submit(job)
    return future


def _exchange(state: QuantizedAllreduceState, buffer: torch.Tensor, index: int) -> None:
    """Blocking compressed average of ``buffer`` (flat bucket) in place."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    n = buffer.numel()
    comp = state.compressor
    block = comp.block_size
    parts = world if state.mode == "reduce_scatter" else 1
    chunk = -(-max(n, 1) // (parts * block)) * block
    padded = torch.zeros(parts * chunk, dtype=torch.float32, device=buffer.device)
    padded[:n] = buffer.detach().reshape(-1)
    rows = _to_bytes(comp.compress(padded, key=(index, "input")), parts)
    chunk_bytes = rows.shape[1]
    gathered = torch.empty(world * chunk_bytes, dtype=torch.uint8, device=buffer.device)

    if state.mode == "all_gather":
        dist.all_gather_into_tensor(gathered, rows.reshape(-1), group=group)
        full = torch.zeros(chunk, dtype=torch.float32, device=buffer.device)
        for row in gathered.view(world, chunk_bytes):
            full += comp.decompress(_from_bytes(row, chunk, comp))
        full /= world
    else:
        received = torch.empty_like(rows)
        dist.all_to_all_single(received, rows, group=group)
        mine = torch.zeros(chunk, dtype=torch.float32, device=buffer.device)
        for row in received:
            mine += comp.decompress(_from_bytes(row, chunk, comp))
        mine /= world
        reduced = _to_bytes(comp.compress(mine, key=(index, "reduced")), 1)
        dist.all_gather_into_tensor(gathered, reduced.reshape(-1), group=group)
        full = torch.cat(
            [comp.decompress(_from_bytes(row, chunk, comp)) for row in gathered.view(world, -1)]
        )
    buffer.copy_(full[:n].view_as(buffer))

    state.stats.calls += 1
    state.stats.elements += n
    state.stats.fp32_allreduce_bytes += 2 * (world - 1) * 4 * n // world
    state.stats.bytes_sent += (world - 1) * chunk_bytes * (2 if parts > 1 else 1)


def _checked(state: QuantizedAllreduceState, bits: int) -> None:
    if not isinstance(state, QuantizedAllreduceState):
        raise TypeError(f"state must be a QuantizedAllreduceState, got {type(state)!r}")
    if state.bits != bits:
        raise ValueError(
            f"this hook exchanges {bits}-bit codes but state holds a {state.bits}-bit compressor; "
            f"build the state with QuantizedAllreduceState(bits={bits})"
        )


def int4_allreduce_hook(
    state: QuantizedAllreduceState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: 4-bit block-quantized gradient averaging (see the module doc)."""
    _checked(state, 4)
    return quantized_allreduce_hook(state, bucket)


def int8_allreduce_hook(
    state: QuantizedAllreduceState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: 8-bit block-quantized gradient averaging (see the module doc)."""
    _checked(state, 8)
    return quantized_allreduce_hook(state, bucket)
