"""Recovery by restart: ``deepseek-train --gpus 2 --max_restarts 1 --resume auto``, one
of whose ranks dies mid-run, is restarted by torch's elastic agent, continues from the
newest complete checkpoint and ends with the weights of a run that was never
interrupted."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ds_model.training.checkpoint import load_weights, resume_checkpoint

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()
single_thread = S.single_thread  # autouse fixture

# Loaded at start-up by every Python process the test launches (it is first on their
# PYTHONPATH); acts in torchrun's ranks only. Each rank notes where its first step
# starts; rank 1 of the first attempt dies before step CRASH_AT_STEP, as a killed
# process would: no exception, no cleanup, a non-zero status.
CRASH_HOOK = """
import os

if "LOCAL_RANK" in os.environ and os.environ.get("CRASH_AT_STEP"):
    from ds_model.training.trainer import Trainer

    _attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    _rank = int(os.environ["RANK"])
    _one_step = Trainer.train_step
    _noted = []

    def train_step(self):
        step = self.setup.position.step
        if not _noted:
            _noted.append(step)
            with open(os.environ["STARTS_LOG"], "a") as f:
                f.write(f"{_attempt} {_rank} {step}\\n")
        if _attempt == 0 and _rank == 1 and step + 1 == int(os.environ["CRASH_AT_STEP"]):
            os._exit(17)
        return _one_step(self)

    Trainer.train_step = train_step
"""

# Each launch takes ~20 s of two cores (five Python start-ups, torch imported in each);
# the bound leaves room for a loaded machine but stops a hung rendezvous.
LAUNCH_TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="torch's elastic agent on Linux"
)


@pytest.mark.slow
def test_a_killed_rank_restarts_and_the_job_ends_with_uninterrupted_weights(tmp_path):
    S.real_lm().save_pretrained(tmp_path / "base")
    data = S.write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in S.make_texts(12)])
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_HOOK)

    def run(name: str, crash_at_step: int) -> Path:
        out = tmp_path / name
        cmd = [
            sys.executable, "-m", "ds_model.training.cli",
            "--gpus", "2", "--max_restarts", "1", "--resume", "auto",
            "--model", str(tmp_path / "base"), "--data", str(data), "--tokenizer", "bytes",
            "--batch_size", "2", "--max_steps", "5", "--save_steps", "2", "--seq_len", "32",
            "--output", str(out), "--no_progress",
        ]  # fmt: skip
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
            "CRASH_AT_STEP": str(crash_at_step),
            "STARTS_LOG": str(tmp_path / f"{name}-starts.log"),
        }
        launcher = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            _, err = launcher.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            launcher.send_signal(signal.SIGTERM)  # passed on to torchrun, which stops its ranks
            _, err = launcher.communicate(timeout=60)
            pytest.fail(f"{name}: no result within {LAUNCH_TIMEOUT_S} s\n{err[-3000:]}")
        assert launcher.returncode == 0, err[-4000:]
        return out

    whole = run("uninterrupted", crash_at_step=0)
    restarted = run("restarted", crash_at_step=4)  # after checkpoint-2 and step 3

    starts = (tmp_path / "restarted-starts.log").read_text().split("\n")
    # First attempt: both ranks from step 0; the restart: both from checkpoint-2.
    assert sorted(s for s in starts if s) == ["0 0 0", "0 1 0", "1 0 2", "1 1 2"]
    final = "checkpoint-5"
    want = load_weights(str(whole / final / "model.safetensors"))
    got = load_weights(str(restarted / final / "model.safetensors"))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    history = [
        json.loads((out / final / "trainer_state.json").read_text())["losses"]
        for out in (whole, restarted)
    ]
    assert len(history[0]) == 5 and history[0] == history[1]


def test_resume_auto_takes_the_newest_complete_checkpoint_or_none(tmp_path):
    out = tmp_path / "run"
    assert resume_checkpoint("auto", str(out)) is None  # no output directory yet
    out.mkdir()
    assert resume_checkpoint("auto", str(out)) is None
    for step in (2, 10):
        (out / f"checkpoint-{step}").mkdir()
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (out / ".tmp-checkpoint-12").mkdir()  # a save cut short
    (out / "checkpoint-14").mkdir()  # no trainer_state.json: not complete
    assert resume_checkpoint("auto", str(out)) == str(out / "checkpoint-10")
    assert resume_checkpoint(None, str(out)) is None
    assert resume_checkpoint(str(out), "elsewhere") == str(out / "checkpoint-10")
