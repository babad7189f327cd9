"""Checkpoints: atomic writes, SIGKILL during a write, exact resume."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
from ds_model.training import ByteTokenizer, CheckpointError, Trainer, find_latest_checkpoint
from ds_model.training.checkpoint import (
    list_checkpoints,
    load_weights,
    save_weights,
    write_checkpoint,
)
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()
single_thread = S.single_thread  # autouse fixture

OPTS = dict(
    optimizer="grouped_adamw",
    progress_bar=False,
    plot=False,
    max_seq_len=32,
    per_device_train_batch_size=4,
    learning_rate=3e-3,
    warmup_steps=2,
    max_steps=12,
    save_steps=4,
    save_total_limit=None,
)


def _run(out: Path, resume: str | None = None) -> list[float]:
    trainer = Trainer(
        model=S.real_lm(),
        train_dataset=S.make_texts(40),
        tokenizer=ByteTokenizer(),
        output_dir=str(out),
        **OPTS,
    )
    return trainer.train(resume_from=resume).losses


def _train_then_stall_at_step_8(out: Path, marker: Path) -> None:
    """In a forked child: train with checkpoints every 4 steps and stall inside the
    weights write of step 8, after part of the file is on disk, until SIGKILLed."""
    import ds_model.training.trainer as trainer_mod

    real_save = trainer_mod.ckpt.save_weights

    def stalling_save(state, path):
        if "checkpoint-8" in path:
            Path(path).write_bytes(b"partial")
            marker.touch()
            time.sleep(120)
        real_save(state, path)

    trainer_mod.ckpt.save_weights = stalling_save
    _run(out)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_during_checkpoint_write_then_exact_resume(tmp_path: Path) -> None:
    out, marker = tmp_path / "killed", tmp_path / "writing"
    # A forked child starts in milliseconds (torch is already imported) and dies
    # exactly as a crashed training process would.
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _train_then_stall_at_step_8(out, marker)
        finally:
            os._exit(1)
    reference = _run(tmp_path / "reference")  # the uninterrupted run, meanwhile
    deadline = time.monotonic() + 120
    while not marker.exists():
        done, status = os.waitpid(pid, os.WNOHANG)
        assert done == 0, f"the child exited early with status {status}"
        assert time.monotonic() < deadline, "the child never reached the checkpoint write"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    # The interrupted write is a temporary directory, never a checkpoint.
    assert (out / ".tmp-checkpoint-8").is_dir()
    assert not (out / "checkpoint-8").exists()
    assert [step for step, _ in list_checkpoints(str(out))] == [4]
    last_good = find_latest_checkpoint(str(out))
    assert last_good.endswith("checkpoint-4")
    weights = load_weights(os.path.join(last_good, "model.safetensors"))
    assert set(weights) == set(S.real_lm().state_dict())
    state = json.loads(Path(last_good, "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["losses"] == reference[:4]

    resumed = _run(out, resume=str(out))
    assert len(resumed) == 12
    assert resumed == reference  # bit-identical: same weights, optimizer, schedule, data
    assert not (out / ".tmp-checkpoint-8").exists()
    assert [step for step, _ in list_checkpoints(str(out))] == [4, 8, 12]
    metric_steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metric_steps == list(range(1, 13))


def test_lora_resume_with_dropout_is_exact(tmp_path: Path) -> None:
    from ds_model import LoraConfig

    def run(out: Path, steps: int, resume: str | None = None) -> list[float]:
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.2)
        trainer = Trainer(
            model=S.real_lm(),
            lora_config=lora,
            train_dataset=S.make_texts(24),
            tokenizer=ByteTokenizer(),
            output_dir=str(out),
            **{**OPTS, "max_steps": steps, "save_steps": 3},
        )
        return trainer.train(resume_from=resume).losses

    reference = run(tmp_path / "a", 6)
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.pt",
        "rng_state_0.pt",
        "trainer_state.json",
        "training_state.pt",
    ]
    assert run(tmp_path / "b", 6, resume=str(ckpt)) == reference


def test_failed_write_leaves_no_checkpoint(tmp_path: Path) -> None:
    def ok(tmp: str) -> None:
        save_weights({"w": torch.ones(2)}, os.path.join(tmp, "model.safetensors"))

    def broken(tmp: str) -> None:
        ok(tmp)
        raise OSError("disk full")

    write_checkpoint(str(tmp_path), 1, ok, {"global_step": 1})
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(str(tmp_path), 2, broken, {"global_step": 2})
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [1]
    assert not (tmp_path / "checkpoint-2").exists()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        find_latest_checkpoint(str(tmp_path / "nothing"))


def test_tied_weights_are_saved_once(tmp_path: Path) -> None:
    emb = torch.nn.Embedding(5, 3)
    state = {"embed.weight": emb.weight, "lm_head.weight": emb.weight, "b": torch.zeros(3)}
    save_weights(state, str(tmp_path / "w.safetensors"))
    back = load_weights(str(tmp_path / "w.safetensors"))
    assert torch.equal(back["lm_head.weight"], emb.weight.detach())
    assert back["lm_head.weight"] is back["embed.weight"]


class CheckpointDirectory(RuleBasedStateMachine):
    """Writes that succeed or crash midway, in any order: the visible checkpoints are
    always exactly the newest ``LIMIT`` successful ones, each complete."""

    LIMIT = 2

    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp()
        self.saved: list[int] = []

    @rule(step=st.integers(1, 6), crash=st.booleans())
    def write(self, step: int, crash: bool) -> None:
        def body(tmp: str) -> None:
            save_weights(
                {"w": torch.full((2,), float(step))}, os.path.join(tmp, "model.safetensors")
            )
            if crash:
                raise OSError("crash")

        try:
            write_checkpoint(self.root, step, body, {"global_step": step}, self.LIMIT)
        except OSError:
            return
        self.saved = sorted({*self.saved, step})[-self.LIMIT :]

    @invariant()
    def only_complete_newest_checkpoints(self) -> None:
        found = list_checkpoints(self.root)
        assert [s for s, _ in found] == self.saved
        for step, path in found:
            weights = load_weights(os.path.join(path, "model.safetensors"))
            assert weights["w"].tolist() == [float(step)] * 2

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


CheckpointDirectory.TestCase.settings = settings(max_examples=8, stateful_step_count=6)
test_checkpoint_directory_state_machine = CheckpointDirectory.TestCase


class _RunsCodeWhenUnpickled:
    """What a crafted checkpoint file holds: unpickling it calls ``open(marker, "w")``,
    standing for any code (``os.system``) an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved")
    trainer = Trainer(
        model=S.real_lm(),
        train_dataset=S.make_texts(8),
        tokenizer=ByteTokenizer(),
        output_dir=str(out),
        **{**OPTS, "max_steps": 2, "save_steps": 2},
    )
    trainer.train()
    return out / "checkpoint-2"


@pytest.mark.parametrize(
    "victim",
    [
        "optimizer.pt",
        "training_state.pt",
        "rng_state_0.pt",
        "model.safetensors",
        "trainer_state.json",
    ],
)
def test_malicious_pickle_in_a_checkpoint_file_is_refused_without_running(
    saved_checkpoint: Path, tmp_path: Path, victim: str
) -> None:
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(saved_checkpoint, ckpt)
    marker = tmp_path / "code-ran"
    if victim.endswith(".pt"):
        torch.save({"state": _RunsCodeWhenUnpickled(marker)}, ckpt / victim)
    else:
        import pickle

        (ckpt / victim).write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(marker)))
    trainer = Trainer(
        model=S.real_lm(),
        train_dataset=S.make_texts(8),
        tokenizer=ByteTokenizer(),
        output_dir=str(tmp_path / "out"),
        **{**OPTS, "max_steps": 4, "save_steps": 2},
    )
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        trainer.train(resume_from=str(ckpt))
    assert not marker.exists(), "unpickling the checkpoint ran code"


def test_intact_resume_state_loads_without_pickled_code(saved_checkpoint: Path) -> None:
    from ds_model.training.checkpoint import load_state_file

    for name in ("optimizer.pt", "training_state.pt", "rng_state_0.pt"):
        assert isinstance(load_state_file(str(saved_checkpoint / name)), dict)


def test_save_minutes_checkpoints_by_elapsed_time_and_resumes_exactly(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 7 * 60))  # every reading of the clock is 7 minutes later
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))

    def run(out: Path, resume: str | None = None) -> list[float]:
        trainer = Trainer(
            model=S.real_lm(),
            train_dataset=S.make_texts(24),
            tokenizer=ByteTokenizer(),
            output_dir=str(out),
            **{**OPTS, "max_steps": 6, "save_steps": 0, "save_minutes": 10},
        )
        return trainer.train(resume_from=resume).losses

    reference = run(tmp_path / "a")
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "a").glob("checkpoint-*"))
    assert saved == [2, 4, 6]  # 14 minutes after the last save at steps 2 and 4, and the end
    assert run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2")) == reference
