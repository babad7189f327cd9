"""Datasets for training: packed language-model blocks and preference pairs.

Layouts: a language-model batch is ``input_ids``, ``labels`` and ``attention_mask``,
each ``(batch, seqlen)`` int64, with ``labels`` aligned to ``input_ids`` (the loss
shifts them) and ``-100`` where no loss is taken. A preference batch stacks the chosen
sequences then the rejected ones: ``(2 * batch, seqlen)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from ds_model.training.records import BadRecordError, Record, check_record, iter_records
from ds_model.training.tokenize import IGNORE_INDEX, encode_record, encode_text

__all__ = [
    "DataReport",
    "LMBlocks",
    "PreferenceDataset",
    "build_lm_dataset",
    "build_preference_dataset",
    "check_data_file",
    "collate_lm",
    "micro_batch_indices",
]

LM_KINDS = ("text", "prompt_completion", "chat")


@dataclass
class DataReport:
    """What happened to the records: counts, and every skipped record's ``path:line``."""

    records: int = 0
    skipped: list[str] = field(default_factory=list)
    tokens: int = 0  # in the examples (packing's one-token block overlaps not counted twice)
    trained_tokens: int = 0
    truncated_tokens: int = 0


class LMBlocks(Dataset):
    """Fixed-length token blocks; item ``i`` is a dict of three ``(seqlen,)`` tensors."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
        self.input_ids, self.labels, self.attention_mask = input_ids, labels, mask

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "labels": self.labels[i],
            "attention_mask": self.attention_mask[i],
        }


def _usable(
    source: Any, allowed: tuple[str, ...], skip_bad_records: bool, report: DataReport
) -> Iterable[tuple[Record, str]]:
    for record in iter_records(source):
        try:
            kind = check_record(record.data, allowed)
        except ValueError as e:
            _bad(record.source, str(e), skip_bad_records, report)
            continue
        yield record, kind


def check_data_file(source: Any, allowed: tuple[str, ...], skip_bad_records: bool) -> None:
    """Parse and check every record of a data file (UTF-8, JSON, record content) so that
    bad data is reported before a model is loaded; in-memory data is checked as it is
    built (an iterator can be read once only)."""
    import os

    if not isinstance(source, (str, os.PathLike)):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped records are reported when building
        for _ in _usable(source, allowed, skip_bad_records, DataReport()):
            pass


def _bad(where: str, reason: str, skip: bool, report: DataReport) -> None:
    if not skip:
        raise BadRecordError(
            where, reason + " (pass skip_bad_records=True / --skip_bad_records to skip it)"
        )
    report.skipped.append(f"{where}: {reason}")
    warnings.warn(f"skipping bad record {where}: {reason}", stacklevel=3)


def build_lm_dataset(
    source: Any,
    tokenizer: Any,
    *,
    max_seq_len: int,
    packing: bool = True,
    skip_bad_records: bool = False,
    pad_token_id: int | None = None,
) -> tuple[LMBlocks, DataReport]:
    """Tokenize ``source`` (path or iterable of records) into an :class:`LMBlocks`.

    With ``packing`` all examples are concatenated and cut into blocks of
    ``max_seq_len`` that overlap by one token, so every token after the first is a
    target exactly once and nothing is dropped (the last block is padded). Without
    packing each example is its own block, truncated (counted in the report) and padded.
    A ready ``LMBlocks`` or a ``Dataset`` of such dicts is passed through unchanged.
    """
    if isinstance(source, Dataset) and not isinstance(source, PreferenceDataset):
        if len(source) == 0:  # type: ignore[arg-type]
            raise ValueError("train dataset is empty: it has no examples")
        return source, DataReport(records=len(source))  # type: ignore[arg-type,return-value]
    report = DataReport()
    examples: list[tuple[list[int], list[int]]] = []
    for record, kind in _usable(source, LM_KINDS, skip_bad_records, report):
        try:
            ids, labels = encode_record(tokenizer, record.data, kind)
        except ValueError as e:
            _bad(record.source, str(e), skip_bad_records, report)
            continue
        report.records += 1
        examples.append((ids, labels))
    if not examples:
        raise ValueError(
            f"dataset {_describe(source)} has no usable records"
            + (f" ({len(report.skipped)} skipped as bad)" if report.skipped else "")
        )
    pad = _pad_id(tokenizer, pad_token_id)
    blocks = _pack(examples, max_seq_len) if packing else _one_per_block(examples, max_seq_len)
    n = len(blocks)
    input_ids = torch.full((n, max_seq_len), pad, dtype=torch.long)
    labels = torch.full((n, max_seq_len), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, max_seq_len), dtype=torch.long)
    for i, (ids, lab) in enumerate(blocks):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    report.tokens = sum(len(e[0]) for e in examples)
    # The first position of a block is never a target of the shifted loss.
    report.trained_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    if not packing:
        report.truncated_tokens = sum(max(0, len(e[0]) - max_seq_len) for e in examples)
        if report.truncated_tokens:
            warnings.warn(
                f"{report.truncated_tokens} tokens beyond max_seq_len={max_seq_len} were "
                "truncated (packing=False)",
                stacklevel=2,
            )
    return LMBlocks(input_ids, labels, mask), report


def _pack(examples: list[tuple[list[int], list[int]]], seq_len: int) -> list[tuple[list, list]]:
    if seq_len < 2:
        raise ValueError(f"max_seq_len={seq_len}: packing needs at least 2")
    ids = [t for e in examples for t in e[0]]
    labels = [t for e in examples for t in e[1]]
    blocks = []
    stride = seq_len - 1
    start = 0
    while True:
        chunk_ids = ids[start : start + seq_len]
        chunk_labels = labels[start : start + seq_len]
        if start > 0:  # that token was the last target of the previous block
            chunk_labels[0] = IGNORE_INDEX
        blocks.append((chunk_ids, chunk_labels))
        if start + seq_len >= len(ids):
            return blocks
        start += stride


def _one_per_block(examples, seq_len):
    return [(ids[:seq_len], labels[:seq_len]) for ids, labels in examples]


def _pad_id(tokenizer: Any, pad_token_id: int | None) -> int:
    for value in (
        pad_token_id,
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if value is not None:
            return int(value)
    return 0


def _describe(source: Any) -> str:
    return repr(source) if isinstance(source, str) else f"<{type(source).__name__}>"


def collate_lm(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([it[key] for it in items]) for key in items[0]}


class PreferenceDataset(Dataset):
    """Tokenized ``prompt`` / ``chosen`` / ``rejected`` triples (optionally with the
    reference model's summed log-probs ``ref_chosen_logp`` / ``ref_rejected_logp``)."""

    def __init__(self, items: list[dict[str, Any]], pad_token_id: int, max_seq_len: int):
        self.items, self.pad_token_id, self.max_seq_len = items, pad_token_id, max_seq_len

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """``input_ids``/``labels``/``attention_mask``: (2B, T), chosen rows first."""
        rows = [(it["prompt_ids"], it["chosen_ids"]) for it in items]
        rows += [(it["prompt_ids"], it["rejected_ids"]) for it in items]
        width = max(len(p) + len(r) for p, r in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            seq = p + r
            input_ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(r)
            mask[i, : len(seq)] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
        if all("ref_chosen_logp" in it for it in items):
            batch["ref_logps"] = torch.tensor(
                [it["ref_chosen_logp"] for it in items] + [it["ref_rejected_logp"] for it in items],
                dtype=torch.float32,
            )
        return batch


def build_preference_dataset(
    source: Any,
    tokenizer: Any,
    *,
    max_seq_len: int,
    skip_bad_records: bool = False,
    pad_token_id: int | None = None,
) -> tuple[PreferenceDataset, DataReport]:
    """Tokenize preference records; the prompt is cut from the left when too long."""
    if isinstance(source, PreferenceDataset):
        return source, DataReport(records=len(source))
    report = DataReport()
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    items = []
    for record, _ in _usable(source, ("preference",), skip_bad_records, report):
        d = record.data
        prompt = ([bos] if bos is not None else []) + encode_text(tokenizer, d["prompt"])
        tail = [eos] if eos is not None else []
        chosen = encode_text(tokenizer, d["chosen"]) + tail
        rejected = encode_text(tokenizer, d["rejected"]) + tail
        longest = max(len(chosen), len(rejected))
        if longest >= max_seq_len:
            _bad(
                record.source,
                f"a response of {longest} tokens does not fit max_seq_len={max_seq_len}",
                skip_bad_records,
                report,
            )
            continue
        keep = max_seq_len - longest
        report.truncated_tokens += max(0, len(prompt) - keep)
        item = {"prompt_ids": prompt[-keep:], "chosen_ids": chosen, "rejected_ids": rejected}
        for key in ("ref_chosen_logp", "ref_rejected_logp"):
            if key in d:
                item[key] = float(d[key])
        items.append(item)
        report.records += 1
    if not items:
        raise ValueError(f"preference dataset {_describe(source)} has no usable records")
    return PreferenceDataset(items, _pad_id(tokenizer, pad_token_id), max_seq_len), report


def micro_batch_indices(
    order: list[int], micro: int, per_device: int, world: int, rank: int
) -> list[int]:
    """Sample indices of one rank in global micro-batch ``micro`` of an epoch ``order``.

    A global micro-batch is ``per_device * world`` consecutive samples of ``order``;
    rank ``r`` takes the ``r``-th slice. The last one may be short, so a rank can get
    fewer (or zero) samples; the trainer weights the loss by real token counts.
    """
    start = micro * per_device * world + rank * per_device
    return order[start : start + per_device]
