"""The deepseek-train command line (run in-process; --gpus N checked up to the launch)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from ds_model.training import cli

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()
single_thread = S.single_thread  # autouse fixture


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    S.real_lm().save_pretrained(tmp_path / "base")
    data = S.write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in S.make_texts(24)])
    return tmp_path / "base", data


def test_lora_run_from_the_command_line(setup, tmp_path: Path, capsys) -> None:
    base, data = setup
    out = tmp_path / "out"
    argv = [
        "--model",
        str(base),
        "--dataset",
        str(data),
        "--tokenizer",
        "bytes",
        "--batch_size",
        "4",
        "--learning_rate",
        "1e-2",
        "--lora_rank",
        "4",
        "--lora_alpha",
        "8",
        "--lora_targets",
        "q_proj,v_proj",
        "--max_steps",
        "3",
        "--grad_accum",
        "2",
        "--seq_len",
        "32",
        "--precision",
        "bf16",
        "--eval_data",
        str(data),
        "--output",
        str(out),
        "--no_progress",
    ]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["checkpoint"].endswith("checkpoint-3")
    assert "eval_loss" in summary and Path(summary["plot"]).is_file()
    assert (out / "checkpoint-3" / "adapter_model.safetensors").is_file()
    config = json.loads((out / "checkpoint-3" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    # --resume continues from the last checkpoint to the new --max_steps.
    assert cli.main([*argv, "--resume", str(out), "--max_steps", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4


def test_missing_tokenizer_is_a_clear_error(setup, tmp_path: Path, capsys) -> None:
    base, data = setup
    argv = ["--model", str(base), "--data", str(data), "--output", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "has no tokenizer.json or tokenizer.model" in err[0]
    with pytest.raises(ValueError, match=r"has no tokenizer\.json or tokenizer\.model"):
        cli.main([*argv, "--debug"])


def test_bad_flags_exit_with_usage(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--model", "tiny", "--data", "x.jsonl", "--distributed_strategy", "zero9"])
    assert "invalid choice: 'zero9'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs --lora_rank"):
        cli.main(["--model", "tiny", "--data", "x.jsonl", "--quantization", "int4"])


def test_gpus_launches_torchrun_with_n_local_processes(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(cli, "run_forwarding_signals", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["--model", "tiny", "--data", "d.jsonl", "--gpus", "2", "--epochs", "3"]
    assert cli.main(argv) == 0
    (cmd,) = calls
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in cmd and "--master_addr=127.0.0.1" in cmd
    rest = cmd[cmd.index("ds_model.training.cli") + 1 :]
    assert rest == [
        "--model",
        "tiny",
        "--data",
        "d.jsonl",
        "--epochs",
        "3",
        "--distributed_strategy",
        "ddp",
    ]
    calls.clear()
    cli.main([*argv, "--distributed_strategy", "3d_parallel"])
    assert calls[0][-2:] == ["--distributed_strategy", "3d_parallel"]


def test_parser_has_the_seed_flags() -> None:
    flags = {a for action in cli.build_parser()._actions for a in action.option_strings}
    seed = {
        "--model",
        "--dataset",
        "--data",
        "--batch_size",
        "--learning_rate",
        "--lora_rank",
        "--gpus",
        "--distributed_strategy",
        "--epochs",
        "--output",
        "--resume",
        "--grad_accum",
        "--precision",
        "--lora_alpha",
        "--lora_targets",
        "--quantization",
        "--eval_data",
        "--max_steps",
    }
    assert seed <= flags


def test_max_restarts_launches_torchrun_with_restarts_on_fresh_rendezvous(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(cli, "run_forwarding_signals", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0")  # restored after the test
    argv = ["--model", "tiny", "--data", "d.jsonl", "--gpus", "2", "--max_restarts", "3"]
    assert cli.main([*argv, "--resume", "auto"]) == 0
    (cmd,) = calls
    launcher, rest = cmd[: cmd.index("-m", 3)], cmd[cmd.index("ds_model.training.cli") + 1 :]
    assert "--max-restarts=3" in launcher and "--rdzv-backend=c10d" in launcher
    assert os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert "--max_restarts" not in rest and rest[-4:-2] == ["--resume", "auto"]
    with pytest.raises(SystemExit, match=r"--max_restarts 3: .*only with --gpus > 1"):
        cli.main(["--model", "tiny", "--data", "d.jsonl", "--max_restarts", "3"])
