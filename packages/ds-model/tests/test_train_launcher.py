"""Stopping distributed runs: a SIGTERM to the ``--gpus`` launcher stops every rank, and
a collective that a rank never joins fails within the timeout, naming rank and
operation, instead of hanging."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()
single_thread = S.single_thread  # autouse fixture

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads processes from /proc"
)


def _processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_rank(tmp_path: Path) -> None:
    S.real_lm().save_pretrained(tmp_path / "base")
    data = S.write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in S.make_texts(16)])
    out = tmp_path / "run-under-sigterm-test"
    cmd = [
        sys.executable, "-m", "ds_model.training.cli",
        "--gpus", "2", "--model", str(tmp_path / "base"), "--data", str(data),
        "--tokenizer", "bytes", "--batch_size", "2", "--max_steps", "1000000",
        "--seq_len", "32", "--output", str(out), "--no_progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().strip()):
            assert launcher.poll() is None, launcher.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the ranks never started training"
            time.sleep(0.5)
        ranks = [p for p in _processes_mentioning(str(out)) if p != launcher.pid]
        assert len(ranks) >= 3  # torchrun's agent and two ranks
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=120)
        assert code != 0
        deadline = time.monotonic() + 60
        while _processes_mentioning(str(out)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _processes_mentioning(str(out)) == [], "a rank outlived the launcher"
    finally:
        for pid in _processes_mentioning(str(out)):  # never leave a run behind
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()


def _barrier_without_peer(rank: int, world: int, port: int, out: str) -> None:
    from ds_model.training.distributed import CollectiveError, init_distributed

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    ctx = init_distributed("ddp", device="cpu", timeout_s=3)
    if rank == 1:
        time.sleep(30)  # hangs: never joins the barrier
        return
    started = time.monotonic()
    try:
        ctx.barrier()
        result = {"error": None}
    except CollectiveError as exc:
        result = {"error": str(exc)}
    result["seconds"] = time.monotonic() - started
    Path(out).write_text(json.dumps(result))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_collective_that_cannot_complete_fails_in_bounded_time(tmp_path: Path) -> None:
    out = tmp_path / "rank0.json"
    pids = S.fork_ranks(2, _barrier_without_peer, str(out))
    S.wait_pids(pids[:1], timeout=60)
    S.wait_pids(pids[1:], timeout=0)  # the hanging rank is killed
    result = json.loads(out.read_text())
    assert result["error"] is not None and result["seconds"] < 30
    assert result["error"].startswith("rank 0: collective barrier did not complete")
