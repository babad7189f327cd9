"""The optimizer options on 2 gloo ddp ranks. ZeRO-1 (``zero_stage=1``): the same
training as ``zero_stage=0``, each rank checkpointing its own optimizer shard, and a
resume that continues exactly. Sensitivity grouping: the same losses, weights and tier
membership as one process with the same global batch.

Tolerance: ZeRO-1 runs the same AdamW arithmetic on each tensor, only on the rank
that owns it, and broadcasts the result, so weights and losses agree to 1e-5.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("_s", Path(__file__).with_name("train_testutils.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
S = S.support()
single_thread = S.single_thread  # autouse fixture

TOL = 1e-5
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
OPTS = {**S.DIST_OPTS, "save_final": True, "per_device_train_batch_size": 2}


def zero_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from ds_model.training import ByteTokenizer, CheckpointError, Trainer, cli

    S.join_gloo(rank, world, port)
    results: dict = {}

    def run(name: str, resume: str | None = None, **kw) -> list[float]:
        trainer = Trainer(
            model=S.real_lm(),
            train_dataset=S.varied_texts(),
            tokenizer=ByteTokenizer(),
            output_dir=os.path.join(out, name),
            distributed_strategy="ddp",
            **{**OPTS, **kw},
        )
        return trainer.train(resume_from=resume).losses

    results["zero0"] = run("zero0")
    results["zero1"] = run("zero1", zero_stage=1, save_steps=2, save_total_limit=None)
    results["zero1_resumed"] = run(
        "zero1_resumed", resume=os.path.join(out, "zero1", "checkpoint-2"), zero_stage=1
    )
    results["sensitivity"] = run("sensitivity", optimizer_grouping="sensitivity", regroup_every=2)
    try:
        run("mixed", resume=os.path.join(out, "zero1", "checkpoint-2"))
    except CheckpointError as exc:
        results["zero0_from_zero1"] = str(exc)
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(results))
    dist.barrier()
    # The command line last: it ends the process group when done.
    argv = [
        "--model", os.path.join(out, "base"), "--data", os.path.join(out, "d.jsonl"),
        "--tokenizer", "bytes", "--batch_size", "2", "--learning_rate", "3e-3",
        "--seq_len", "32", "--max_steps", "4", "--output", os.path.join(out, "cli"),
        "--no_progress", "--distributed_strategy", "ddp", "--zero_stage", "1",
    ]  # fmt: skip
    assert cli.main(argv) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("zero")
    S.real_lm().save_pretrained(out / "base")
    S.write_jsonl(out / "d.jsonl", [{"text": t} for t in S.varied_texts()])
    reference = S.forked_runs(out, 2, zero_worker, one_process_sensitivity)
    results = json.loads((out / "results.json").read_text())
    results["one_process_sensitivity"] = reference
    return results, out


def one_process_sensitivity(out: Path) -> list[float]:
    """The sensitivity-grouped run in one process with the 2 ranks' global batch."""
    from ds_model.training import ByteTokenizer, Trainer

    trainer = Trainer(
        model=S.real_lm(),
        train_dataset=S.varied_texts(),
        tokenizer=ByteTokenizer(),
        output_dir=str(out / "sensitivity_one"),
        **{**OPTS, "per_device_train_batch_size": 4},
        optimizer_grouping="sensitivity",
        regroup_every=2,
    )
    return trainer.train().losses


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from ds_model.training.checkpoint import load_weights

    return load_weights(str(path / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=TOL, atol=TOL, msg=name)


def test_zero1_trains_as_zero0(runs) -> None:
    results, out = runs
    assert results["zero1"] == pytest.approx(results["zero0"], rel=TOL)
    assert results["zero0"][-1] < results["zero0"][0]
    _assert_same_weights(out / "zero1" / "checkpoint-4", out / "zero0" / "checkpoint-4")


def test_zero1_checkpoints_one_optimizer_shard_per_rank(runs) -> None:
    from ds_model.training.checkpoint import load_state_file

    _, out = runs
    ckpt = out / "zero1" / "checkpoint-2"
    shards = [load_state_file(str(ckpt / f"optimizer_shard_{r}.pt"))["state"] for r in (0, 1)]
    whole = load_state_file(str(out / "zero0" / "checkpoint-4" / "optimizer.pt"))["state"]
    # Each rank holds the moments of its share only; together, every tensor's.
    assert all(0 < len(s) < len(whole) for s in shards)
    assert len(shards[0]) + len(shards[1]) == len(whole)
    header = load_state_file(str(ckpt / "optimizer.pt"))
    assert header["world_size"] == 2 and "state" not in header


def test_zero1_resume_on_two_ranks_equals_the_uninterrupted_run(runs) -> None:
    results, out = runs
    assert results["zero1_resumed"] == pytest.approx(results["zero1"], rel=TOL)
    _assert_same_weights(out / "zero1_resumed" / "checkpoint-4", out / "zero1" / "checkpoint-4")


def test_zero1_checkpoint_does_not_resume_without_zero1(runs) -> None:
    results, _ = runs
    assert "resume it with zero_stage=1" in results["zero0_from_zero1"]


def test_sensitivity_grouping_on_two_ddp_ranks_equals_one_process(runs) -> None:
    from ds_model.training.checkpoint import load_state_file

    results, out = runs
    assert results["sensitivity"] == pytest.approx(results["one_process_sensitivity"], rel=TOL)
    _assert_same_weights(
        out / "sensitivity" / "checkpoint-4", out / "sensitivity_one" / "checkpoint-4"
    )

    def groups(run: str) -> dict:
        state = load_state_file(str(out / run / "checkpoint-4" / "optimizer.pt"))
        return {g["name"]: sorted(g["param_names"]) for g in state["param_groups"]}

    assert groups("sensitivity") == groups("sensitivity_one")
    assert any(members for name, members in groups("sensitivity").items() if "tier1" not in name)


def test_zero_stage_flag_equals_the_python_api(runs) -> None:
    _, out = runs
    _assert_same_weights(out / "cli" / "checkpoint-4", out / "zero1" / "checkpoint-4")
