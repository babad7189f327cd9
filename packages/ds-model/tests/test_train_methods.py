"""deepseek-train's --method (sft, dpo, distill) and the optimizer options
(--optimizer_grouping, --zero_stage) against the Python API, in one process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from ds_model.training import Trainer, TrainingConfig, cli
from ds_model.training.checkpoint import load_state_file, load_weights

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()
single_thread = S.single_thread  # autouse fixture

PAIRS = [
    {"prompt": "the cat", "chosen": " sat on the mat.", "rejected": " ran to big ball."},
    {"prompt": "a dog", "chosen": " ran to the ball.", "rejected": " sat on a red mat."},
]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    S.real_lm().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--data", str(data), "--tokenizer", "bytes",
        "--batch_size", "4", "--learning_rate", "1e-2", "--seq_len", "48",
        "--max_steps", "2", "--output", str(out), "--no_progress", *extra,
    ]  # fmt: skip


def _summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["sft", "dpo", "distill"])
def test_each_method_trains_from_the_command_line_and_writes_a_loadable_model(
    method: str, base: Path, tmp_path: Path, capsys
) -> None:
    import ds_model

    if method == "dpo":
        data = S.write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
        extra = ["--beta", "0.2", "--ref_model", str(base)]
    else:
        data = S.write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in S.make_texts(16)])
        extra = []
    if method == "distill":
        S.real_lm(seed=1).save_pretrained(tmp_path / "teacher")
        extra = ["--teacher", str(tmp_path / "teacher"), "--temperature", "1.5", "--alpha", "0.7"]
    out = tmp_path / "out"
    assert cli.main(_argv(base, data, out, "--method", method, *extra)) == 0
    summary = _summary(capsys)
    assert summary["steps"] == 2 and summary["checkpoint"].endswith("checkpoint-2")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if method == "dpo":
        assert "reward_margin" in history[-1]  # the DPO loss ran, not the LM loss
    if method == "distill":
        assert "kl" in history[-1] and "ce" in history[-1]
    trained = ds_model.from_pretrained(summary["checkpoint"], dtype=torch.float32)
    before = ds_model.from_pretrained(str(base), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        logits = trained(ids).logits
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits, before(ids).logits)


def test_method_flags_are_checked_and_named(base: Path, tmp_path: Path, capsys) -> None:
    data = S.write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in S.make_texts(8)])
    argv = _argv(base, data, tmp_path / "o")
    cases = [
        (["--beta", "0.1"], "--beta applies to --method dpo only"),
        (["--method", "dpo", "--teacher", str(base)], "--teacher applies to --method distill"),
        (["--method", "distill"], "--method distill needs --teacher"),
        (["--method", "dpo", "--alpha", "0.3"], "--alpha applies to --method distill"),
        (["--method", "distill", "--teacher", str(tmp_path / "nope")], "--teacher"),
        (["--zero_stage", "1"], "zero_stage=1 with distributed_strategy='none'"),
        (
            ["--distributed_strategy", "fsdp", "--optimizer_grouping", "sensitivity"],
            "optimizer_grouping='sensitivity' with distributed_strategy='fsdp'",
        ),
        (["--optimizer", "adamw", "--optimizer_grouping", "sensitivity"], "grouped_adamw"),
    ]
    for extra, message in cases:
        assert cli.main([*argv, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)


def test_optimizer_options_are_validated() -> None:
    with pytest.raises(ValueError, match=r"optimizer_grouping='tiered'.*static"):
        TrainingConfig(optimizer_grouping="tiered")
    with pytest.raises(ValueError, match=r"zero_stage=2: expected one of \[0, 1\]"):
        TrainingConfig(zero_stage=2, distributed_strategy="ddp")
    with pytest.raises(ValueError, match="zero_stage=1 with distributed_strategy='pipeline'"):
        TrainingConfig(zero_stage=1, distributed_strategy="pipeline")
    with pytest.raises(ValueError, match="zero_stage=1 with optimizer_grouping='sensitivity'"):
        TrainingConfig(zero_stage=1, distributed_strategy="ddp", optimizer_grouping="sensitivity")
    with pytest.raises(ValueError, match="regroup_every=0"):
        TrainingConfig(regroup_every=0)
    # ddp in one process (no WORLD_SIZE): ZeRO-1 has nothing to shard; the optimizer is
    # the plain GroupedAdamW.
    from ds_model.training.optimizer import build_optimizer
    from ds_optim import GroupedAdamW, SensitivityRegrouper

    zero = build_optimizer(S.real_lm(), TrainingConfig(zero_stage=1, distributed_strategy="ddp"))
    assert type(zero) is GroupedAdamW and zero.regrouper is None
    tiers = build_optimizer(S.real_lm(), TrainingConfig(optimizer_grouping="sensitivity"))
    assert isinstance(tiers.regrouper, SensitivityRegrouper)


def _groups(checkpoint: Path) -> dict[str, list[str]]:
    state = load_state_file(str(checkpoint / "optimizer.pt"))
    return {g["name"]: sorted(g["param_names"]) for g in state["param_groups"]}


def test_sensitivity_grouping_from_the_cli_equals_the_python_api_and_resumes(
    base: Path, tmp_path: Path, capsys
) -> None:
    texts = S.make_texts(24)
    data = S.write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    flags = ["--optimizer_grouping", "sensitivity", "--regroup_every", "2", "--max_steps", "4"]
    flags += ["--save_steps", "2"]
    assert cli.main(_argv(base, data, tmp_path / "cli", *flags)) == 0
    capsys.readouterr()
    trainer = Trainer(
        model_path=str(base),
        tokenizer="bytes",
        output_dir=str(tmp_path / "api"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_seq_len=48,
        max_steps=4,
        progress_bar=False,
        optimizer_grouping="sensitivity",
        regroup_every=2,
    )
    trainer.train(data_path=str(data))
    cli_final, api_final = tmp_path / "cli" / "checkpoint-4", tmp_path / "api" / "checkpoint-4"
    cli_weights = load_weights(str(cli_final / "model.safetensors"))
    api_weights = load_weights(str(api_final / "model.safetensors"))
    for name, tensor in api_weights.items():
        torch.testing.assert_close(cli_weights[name], tensor, rtol=0, atol=0)
    groups = _groups(cli_final)
    assert groups == _groups(api_final)
    # ds-optim's tiers, and the regrouping moved tensors out of the starting tier.
    assert {n.split("/")[-1] for n in groups} == {"tier0", "tier1", "tier2"}
    assert any(members for n, members in groups.items() if not n.endswith("tier1"))

    # Resumed at step 2, the run regroups at step 4 exactly as the uninterrupted one.
    resume = ["--resume", str(tmp_path / "cli" / "checkpoint-2")]
    assert cli.main(_argv(base, data, tmp_path / "resumed", *flags, *resume)) == 0
    resumed = tmp_path / "resumed" / "checkpoint-4"
    assert _groups(resumed) == groups
    resumed_weights = load_weights(str(resumed / "model.safetensors"))
    for name, tensor in cli_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=0)

    # The grouping is really in effect: static groups train to other weights.
    assert cli.main(_argv(base, data, tmp_path / "static", "--max_steps", "4")) == 0
    static = load_weights(str(tmp_path / "static" / "checkpoint-4" / "model.safetensors"))
    assert any(not torch.equal(static[n], t) for n, t in cli_weights.items())
