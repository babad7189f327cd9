"""DPO (loss against a hand computation, margins grow) and distillation (KL falls)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from ds_model import DistillationTrainer, DPOTrainer
from ds_model.training import ByteTokenizer, dpo_loss
from ds_model.training.data import build_preference_dataset
from ds_model.training.loss import distillation_loss_sums, sequence_logps
from hypothesis import given, settings
from hypothesis import strategies as st

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()
single_thread = S.single_thread  # autouse fixture

TOK = ByteTokenizer()
OPTS = dict(progress_bar=False, plot=False, max_seq_len=48, save_final=False, tokenizer=TOK)
PAIRS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    {"prompt": "the cat sat on the", "chosen": " mat", "rejected": " dog"},
    {"prompt": "red, green, ", "chosen": "blue", "rejected": "ball"},
    {"prompt": "a b c ", "chosen": "d", "rejected": "z"},
]


def test_dpo_loss_equals_hand_computation() -> None:
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.0, -2.5])
    losses, margins = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 0: 0.1 * ((-1 + 1.5) - (-2 + 1)) = 0.15; pair 1: 0.1 * ((-3 + 2) - (-1 + 2.5)) = -0.25
    assert margins.tolist() == pytest.approx([0.15, -0.25])
    expected = [math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.25))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)


@settings(max_examples=25)
@given(
    batch=st.integers(1, 3),
    seqlen=st.integers(2, 7),
    vocab=st.integers(2, 9),
    seed=st.integers(0, 99),
)
def test_sequence_logps_sums_labelled_token_logprobs(batch, seqlen, vocab, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seqlen, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, seqlen), generator=g)
    labels[torch.rand(batch, seqlen, generator=g) < 0.3] = -100
    got = sequence_logps(logits, labels)
    for b in range(batch):
        want = 0.0
        for t in range(seqlen - 1):
            if labels[b, t + 1] != -100:
                want += torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]].item()
        assert got[b].item() == pytest.approx(want, abs=1e-5)


def test_dpo_margin_grows_on_a_toy_preference_set(tmp_path: Path) -> None:
    trainer = DPOTrainer(
        model=S.real_lm(),
        beta=0.5,
        train_dataset=PAIRS * 4,
        learning_rate=5e-3,
        per_device_train_batch_size=4,
        max_steps=25,
        output_dir=str(tmp_path),
        **OPTS,
    )
    result = trainer.train()
    margins = [r["reward_margin"] for r in trainer.log_history if "reward_margin" in r]
    assert margins[0] == pytest.approx(0.0, abs=1e-4)  # policy == reference at the start
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert sum(margins[-5:]) / 5 > 1.0
    assert trainer.log_history[-1]["reward_accuracy"] == 1.0
    assert result.losses[-1] < 0.4


def test_dpo_uses_precomputed_reference_logps(tmp_path: Path) -> None:
    model = S.real_lm()
    ds, _ = build_preference_dataset(PAIRS, TOK, max_seq_len=48)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        logps = sequence_logps(model(batch["input_ids"]).logits, batch["labels"])
    n = len(PAIRS)
    # Reference log-probs 1 nat below the policy's on chosen answers: margin = beta * 1.
    rows = [
        {**p, "ref_chosen_logp": float(logps[i]) - 1.0, "ref_rejected_logp": float(logps[n + i])}
        for i, p in enumerate(PAIRS)
    ]
    trainer = DPOTrainer(
        model=model,
        beta=0.2,
        train_dataset=rows,
        shuffle=False,
        per_device_train_batch_size=n,
        max_steps=1,
        output_dir=str(tmp_path),
        **OPTS,
    )
    result = trainer.train()
    assert trainer.ref_model is None  # nothing copied: the data carried the reference
    assert result.losses[0] == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-5)


def test_dpo_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="beta=0"):
        DPOTrainer(model=S.real_lm(), beta=0)
    with pytest.raises(TypeError, match=r"teacher must be an nn\.Module"):
        DistillationTrainer(model=S.real_lm(), teacher="big-model")
    with pytest.raises(ValueError, match=r"alpha=1\.5"):
        DistillationTrainer(model=S.real_lm(), teacher=S.real_lm(), alpha=1.5)


def test_distillation_kl_term_matches_definition() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    kl, ce, n = distillation_loss_sums(s, t, labels, temperature=2.0)
    p_t = torch.softmax(t[:, :-1] / 2, -1)
    want = (p_t * (p_t.log() - torch.log_softmax(s[:, :-1] / 2, -1))).sum() * 4
    assert n == 8 and kl.item() == pytest.approx(want.item(), rel=1e-5)
    want_ce = torch.nn.functional.cross_entropy(
        s[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), reduction="sum"
    )
    assert ce.item() == pytest.approx(want_ce.item(), rel=1e-5)


def test_distillation_kl_falls(tmp_path: Path) -> None:
    teacher = S.real_lm(seed=1)
    with torch.no_grad():  # a confident teacher, so there is something to learn
        teacher.lm_head.weight.mul_(20)
    trainer = DistillationTrainer(
        model=S.real_lm(seed=2),
        teacher=teacher,
        temperature=2.0,
        alpha=0.9,
        train_dataset=S.make_texts(32),
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        max_steps=30,
        output_dir=str(tmp_path),
        **{**OPTS, "max_seq_len": 32},
    )
    trainer.train()
    kls = [r["kl"] for r in trainer.log_history if "kl" in r]
    assert len(kls) == 30
    assert sum(kls[-5:]) / 5 < 0.5 * sum(kls[:3]) / 3
