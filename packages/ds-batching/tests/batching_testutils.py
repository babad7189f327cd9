"""A fake paged model runner and a sequential reference, shared by the scheduler tests.

``FakePagedModel`` does what a real runner does with a ``SchedulerOutput``: it writes
every fed token into its KV slot through the block table, and for a request that
samples it *reads the whole context back through the block table* and derives the
next token from it. So a wrong block table, a wrong position, a prefix-cache hit on
the wrong blocks or a lost preemption shows up as a different token stream than the
sequential reference ``generate_reference`` produces.
"""

from __future__ import annotations

from collections.abc import Sequence

from ds_batching import FinishReason, SchedulerOutput, slot_of

VOCAB = 23


def next_token(context: Sequence[int], lora_name: str | None) -> int:
    """A deterministic 'model': the next token is a function of the whole context."""
    acc = 7 if lora_name is None else 11 + len(lora_name)
    for i, token in enumerate(context):
        acc = (acc * 31 + token * (i + 3)) % 1_000_003
    return acc % VOCAB


def generate_reference(
    prompt: Sequence[int],
    max_tokens: int,
    eos_token_id: int | None,
    stop_token_ids: Sequence[int],
    lora_name: str | None,
) -> tuple[list[int], FinishReason]:
    tokens = list(prompt)
    output: list[int] = []
    while True:
        token = next_token(tokens, lora_name)
        tokens.append(token)
        output.append(token)
        if token == eos_token_id or token in stop_token_ids:
            return output, FinishReason.STOP
        if len(output) >= max_tokens:
            return output, FinishReason.LENGTH


class KVMismatch(AssertionError):
    pass


class FakePagedModel:
    """KV 'cache' of slot -> (lora_name, position, token)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.kv: dict[int, tuple[str | None, int, int]] = {}

    def write(self, output: SchedulerOutput) -> None:
        """Store every fed token in its slot, as the attention layers' KV write does."""
        bs = self.block_size
        if output.block_size != bs:
            raise KVMismatch(f"output.block_size {output.block_size} != runner's {bs}")
        written: set[int] = set()
        for item in output.scheduled:
            table = item.block_table
            end = item.start_position + len(item.token_ids)
            if len(table) * bs < end:
                raise KVMismatch(f"{item.request_id}: block table {table} too short for {end}")
            for offset, token in enumerate(item.token_ids):
                pos = item.start_position + offset
                slot = slot_of(table, pos, bs)
                if slot in written:
                    raise KVMismatch(f"slot {slot} written twice in one step")
                written.add(slot)
                self.kv[slot] = (item.lora_name, pos, token)

    def step(self, output: SchedulerOutput) -> dict[str, int]:
        """Write the step's tokens, then sample from the context read back from the slots."""
        self.write(output)
        sampled: dict[str, int] = {}
        for item in output.scheduled:
            if item.sample:
                end = item.start_position + len(item.token_ids)
                context = self.read(item.request_id, item.block_table, end, item.lora_name)
                sampled[item.request_id] = next_token(context, item.lora_name)
        return sampled

    def read(
        self, request_id: str, table: Sequence[int], end: int, lora_name: str | None
    ) -> list[int]:
        """Tokens at positions [0, end) read back from the KV slots."""
        context = []
        for pos in range(end):
            entry = self.kv.get(slot_of(table, pos, self.block_size))
            if entry is None or entry[0] != lora_name or entry[1] != pos:
                raise KVMismatch(f"{request_id}: slot for position {pos} holds {entry}")
            context.append(entry[2])
        return context
