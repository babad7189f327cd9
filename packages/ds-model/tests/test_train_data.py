"""The training data pipeline: records with file:line, formats, masking, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ds_model.training import BadRecordError, ByteTokenizer, build_lm_dataset
from ds_model.training.data import _pack, build_preference_dataset, micro_batch_indices
from ds_model.training.records import iter_records
from ds_model.training.tokenize import IGNORE_INDEX, encode_record
from hypothesis import given, settings
from hypothesis import strategies as st

TOK = ByteTokenizer()


def test_jsonl_broken_line_is_reported_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(BadRecordError, match=r"d\.jsonl:3: invalid JSON") as info:
        build_lm_dataset(path, TOK, max_seq_len=16)
    assert info.value.where.endswith("d.jsonl:3")


def test_json_array_records_carry_their_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(
        '[\n  {"text": "a"},\n\n  {"prompt": "p", "completion": 3},\n  {"text": "c"}\n]\n'
    )
    assert [r.source for r in iter_records(path)] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    with pytest.raises(BadRecordError, match=r"d\.json:4: 'completion' must be a non-empty"):
        build_lm_dataset(path, TOK, max_seq_len=16)


def test_bad_records_are_skipped_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hello"}\n{"txt": "typo"}\n{"text": ""}\n{"text": "world"}\n')
    with pytest.raises(BadRecordError, match=r"d\.jsonl:2: record has keys \['txt'\]"):
        build_lm_dataset(path, TOK, max_seq_len=16)
    with pytest.warns(UserWarning, match="skipping bad record"):
        ds, report = build_lm_dataset(path, TOK, max_seq_len=16, skip_bad_records=True)
    assert report.records == 2
    assert [s.split(": ")[0] for s in report.skipped] == [f"{path}:2", f"{path}:3"]
    assert len(ds) >= 1


def test_empty_dataset_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="has no usable records"):
        build_lm_dataset(path, TOK, max_seq_len=16)
    with pytest.raises(ValueError, match="has no usable records"):
        build_lm_dataset([], TOK, max_seq_len=16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_lm_dataset(tmp_path / "missing.jsonl", TOK, max_seq_len=16)


def test_prompt_tokens_are_masked() -> None:
    ids, labels = encode_record(
        TOK, {"prompt": "Q: hi", "completion": " A: yo"}, "prompt_completion"
    )
    assert ids[0] == TOK.bos_token_id and ids[-1] == TOK.eos_token_id
    n_prompt = 1 + len("Q: hi")
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert TOK.decode(ids[n_prompt:]) == " A: yo"


def test_chat_trains_on_assistant_turns_only() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    ids, labels = encode_record(TOK, {"messages": messages}, "chat")
    trained = TOK.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    # The two assistant contents (with the template's newline after each) and the EOS.
    assert trained == "hello\nciao\n"
    full = TOK.decode(ids)
    assert "<|user|>\nhi\n" in full and "<|assistant|>\nhello\n" in full


def test_chat_uses_the_tokenizers_template() -> None:
    class Templated(ByteTokenizer):
        chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"

    ids, labels = encode_record(
        Templated(),
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "chat",
    )
    assert TOK.decode(ids) == "[user]q[assistant]a"
    assert TOK.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == "[assistant]a"


def test_chat_without_assistant_turn_is_bad() -> None:
    with pytest.raises(BadRecordError, match="#0: 'messages' has no assistant turn"):
        build_lm_dataset([{"messages": [{"role": "user", "content": "x"}]}], TOK, max_seq_len=8)


@settings(max_examples=40)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    seq_len=st.integers(2, 33),
)
def test_packing_targets_every_token_once(lengths: list[int], seq_len: int) -> None:
    examples, offset = [], 0
    for n in lengths:
        ids = list(range(offset, offset + n))
        examples.append((ids, ids))
        offset += n
    blocks = _pack(examples, seq_len)
    targets = []
    for ids, labels in blocks:
        assert len(ids) <= seq_len and len(ids) == len(labels)
        targets += [lab for lab in labels[1:] if lab != IGNORE_INDEX]
    assert targets == list(range(1, offset))  # each token after the first, once, in order
    assert len(blocks) == max(1, -(-(offset - 1) // (seq_len - 1)))


def test_packed_dataset_layout_and_counts() -> None:
    texts = ["abc", "defgh", "ij"]
    ds, report = build_lm_dataset(texts, TOK, max_seq_len=6)
    total = sum(len(t) + 2 for t in texts)  # BOS + text + EOS each
    assert report.tokens == total
    assert report.trained_tokens == total - len(texts)  # all but the BOS of each example
    item = ds[len(ds) - 1]
    assert item["input_ids"].shape == (6,) and item["input_ids"].dtype == torch.long
    pad = item["attention_mask"] == 0
    assert (item["labels"][pad] == IGNORE_INDEX).all()


def test_unpacked_truncation_is_reported() -> None:
    with pytest.warns(UserWarning, match="truncated"):
        ds, report = build_lm_dataset(["x" * 20, "y"], TOK, max_seq_len=8, packing=False)
    assert len(ds) == 2 and report.truncated_tokens == 22 - 8


def test_preference_dataset_collates_chosen_then_rejected(tmp_path: Path) -> None:
    path = tmp_path / "pref.jsonl"
    rows = [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {
            "prompt": "hi",
            "chosen": "hello",
            "rejected": "go",
            "ref_chosen_logp": -1.0,
            "ref_rejected_logp": -2.0,
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds, report = build_preference_dataset(path, TOK, max_seq_len=32)
    assert report.records == 2
    batch = ds.collate([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 4
    assert "ref_logps" not in batch  # only one record has them
    trained = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert TOK.decode(trained) == "4" and trained[-1] == TOK.eos_token_id
    assert ds.collate([ds[1]])["ref_logps"].tolist() == [-1.0, -2.0]


@settings(max_examples=30)
@given(n=st.integers(1, 50), per_device=st.integers(1, 5), world=st.integers(1, 4))
def test_micro_batches_partition_the_epoch(n: int, per_device: int, world: int) -> None:
    order = list(range(n))
    seen = []
    for m in range(-(-n // (per_device * world))):
        for rank in range(world):
            idx = micro_batch_indices(order, m, per_device, world, rank)
            assert len(idx) <= per_device
            seen += idx
    assert seen == order


def test_chat_template_with_its_own_bos_gets_no_second_one() -> None:
    class BosTemplate(ByteTokenizer):
        chat_template = "<B>{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}"

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            head = [self.bos_token_id] if text.startswith("<B>") else []
            return head + list(text.removeprefix("<B>").encode())

    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ids, _ = encode_record(BosTemplate(), {"messages": messages}, "chat")
    assert ids.count(TOK.bos_token_id) == 1 and ids[0] == TOK.bos_token_id
