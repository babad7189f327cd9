"""2-rank gloo runs on CPU (127.0.0.1) against one process with the same global batch.

Tolerance: the trainer normalizes every loss by the global token count, so a data-
parallel step computes the same quantity as one process; only the order of float
additions differs (gradient all-reduce, sharded reductions). Losses must agree to
1e-5 relative over 4 steps; tensor-parallel logits to 1e-5 absolute. The 4-bit
compressed all-reduce is lossy by design: within 2% over 4 steps.
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

REL = 1e-5
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("dist")
    reference = S.forked_runs(out, 2, S.distributed_worker, S.single_process_reference)
    results = json.loads((out / "results.json").read_text())
    results["out"] = str(out)
    return results, reference


def test_ddp_matches_one_process(runs) -> None:
    dist, ref = runs
    assert dist["ddp"] == pytest.approx(ref["dp"], rel=REL)
    assert ref["dp"][-1] < ref["dp"][0]


def test_ddp_with_accumulation_matches_one_process(runs) -> None:
    dist, ref = runs
    assert dist["ddp_accum"] == pytest.approx(ref["accum"], rel=REL)
    assert ref["accum"] == pytest.approx(ref["dp"], rel=REL)


def test_ddp_int4_gradient_hook_stays_close(runs) -> None:
    dist, ref = runs
    assert dist["ddp_int4"][0] == pytest.approx(ref["dp"][0], rel=REL)  # before any update
    assert dist["ddp_int4"] == pytest.approx(ref["dp"], rel=2e-2)
    assert dist["ddp_int4"] != dist["ddp"]  # the hook really ran


def test_fsdp2_matches_one_process_and_resumes(runs) -> None:
    dist, ref = runs
    assert dist["fsdp"] == pytest.approx(ref["dp"], rel=REL)
    # Resumed from the gathered (full) checkpoint of step 2, sharded again.
    assert len(dist["fsdp_resumed"]) == 4
    assert dist["fsdp_resumed"] == pytest.approx(dist["fsdp"], rel=REL)


def test_fsdp2_with_lora_matches_one_process(runs) -> None:
    dist, ref = runs
    assert dist["fsdp_lora"] == pytest.approx(ref["lora"], rel=REL)
    assert ref["lora"][-1] < ref["lora"][0]
    # The sharded adapter is gathered into one PEFT-format file.
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(dist["fsdp_lora_files"])
    assert dist["fsdp_lora_export"] == ["adapter_config.json", "adapter_model.safetensors"]


def test_tensor_parallel_matches_single_process_logits(runs) -> None:
    dist, ref = runs
    assert dist["real_mlp_mesh_dims"] == 2  # MLP projections tensor-parallel by default
    assert dist["real_attention_mesh_dims"] == 1  # attention left whole (data-parallel only)
    assert dist["tiny_mlp_mesh_dims"] == 2
    assert dist["tiny_attention_mesh_dims"] == 2  # attention too, via the model's tp_plan
    for name in ("real", "tiny"):
        torch.testing.assert_close(
            torch.tensor(dist[f"{name}_tp_logits"]),
            torch.tensor(ref[f"{name}_logits"]),
            rtol=0,
            atol=1e-5,
        )
    assert dist["tp_train"] == pytest.approx(ref["dp"], rel=REL)


def test_pipeline_matches_one_process_resumes_and_exports(runs) -> None:
    dist, ref = runs
    # 2 stages, 1F1B over the step's two accumulation micro-batches of 2 sequences.
    assert dist["pipeline"] == pytest.approx(ref["accum"], rel=REL)
    assert dist["pipeline_resumed"] == pytest.approx(dist["pipeline"], rel=REL)
    assert dist["pipeline_again"] == pytest.approx(dist["pipeline"], rel=REL)
    # Evaluation through the stages (steps 2 and 4) as in one process.
    assert len(ref["accum_evals"]) == 2
    assert dist["pipeline_eval"] == pytest.approx(ref["accum_evals"], rel=REL)
    # GPipe: one micro-batch of 4 per step (fewer micro-batches than stages).
    assert dist["pipeline_gpipe"] == pytest.approx(ref["dp"], rel=REL)
    # Interleaved 1F1B (2 stages per rank, 4 micro-batches), and the looped BFS order
    # for 5 micro-batches, as one process with the same global batch.
    assert dist["pipeline_interleaved"] == pytest.approx(ref["interleaved"], rel=REL)
    assert len(ref["interleaved_evals"]) == 2
    assert dist["pipeline_interleaved_evals"] == pytest.approx(ref["interleaved_evals"], rel=REL)
    assert dist["pipeline_looped"] == pytest.approx(ref["looped"], rel=REL)
    assert dist["pipeline_interleaved_resumed"] == pytest.approx(ref["interleaved"], rel=REL)
    # Resuming with another interleaving would give ranks other layers' optimizer state.
    error = dist["pipeline_uninterleaved_error"]
    assert error.startswith("CheckpointError: pipeline rank 0:")
    assert "resume with the same pp_size and pp_virtual_stages" in error
    # Checked per stage: rank 0 trains layer 2, but its stage 0 has nothing to train.
    assert dist["pipeline_frozen_stage_error"].startswith(
        "pipeline rank 0: stage 0 has no trainable parameters"
    )
    # Training steps and evaluation (one micro-batch) both interleave at 4; 5 loops.
    assert dist["pipeline_schedule_kinds"] == [
        ["ScheduleInterleaved1F1B"],
        ["ScheduleInterleaved1F1B", "ScheduleLoopedBFS"],
    ]
    # Each rank holds its own stage only; together, the whole model, each weight once.
    first, last = (set(names) for names in dist["pipeline_params"])
    assert not first & last
    assert "model.embed_tokens.weight" in first and "lm_head.weight" in last
    assert "model.norm.weight" in last
    assert first | last == {n for n, _ in S.real_lm().named_parameters()}
    assert not any(n.startswith("model.layers.1.") for n in first)
    assert not any(n.startswith("model.layers.0.") for n in last)
    # save_model gathers the stages into one checkpoint that loads as the trained model.
    torch.testing.assert_close(
        torch.tensor(dist["pipeline_export_logits"]),
        torch.tensor(ref["accum_logits"]),
        rtol=0,
        atol=1e-4,
    )


def test_pipeline_trains_lora_adapters_per_stage(runs) -> None:
    dist, ref = runs
    # Two accumulation micro-batches of 2 through the stages = one batch of 4 at once.
    assert dist["pipeline_lora"] == pytest.approx(ref["lora"], rel=REL)
    assert dist["pipeline_lora_resumed"] == pytest.approx(dist["pipeline_lora"], rel=REL)
    assert dist["pipeline_qlora"] == pytest.approx(ref["qlora"], rel=REL)
    assert ref["qlora"] != ref["lora"]  # the int4 base really differs
    # Only adapters trained, on both stages.
    assert dist["pipeline_lora_base_kept"] == [True, True]
    # The exported adapter (both stages' halves in one PEFT file) is the trained one.
    torch.testing.assert_close(
        torch.tensor(dist["pipeline_lora_export_logits"]),
        torch.tensor(ref["lora_logits"]),
        rtol=0,
        atol=1e-4,
    )


def test_pipeline_refuses_what_it_cannot_run(runs) -> None:
    assert "DPOTrainer" in runs[0]["pipeline_refused_dpo"]


def test_pipeline_checkpoint_needs_a_pipeline_to_resume(runs, tmp_path) -> None:
    from ds_model.training import ByteTokenizer, CheckpointError, Trainer

    out = Path(runs[0]["out"])
    trainer = Trainer(
        model=S.real_lm(),
        train_dataset=S.varied_texts(),
        tokenizer=ByteTokenizer(),
        output_dir=str(tmp_path),
        **{**S.DIST_OPTS, "per_device_train_batch_size": 4},
    )
    with pytest.raises(CheckpointError, match="2-rank pipeline"):
        trainer.train(resume_from=str(out / "pipeline" / "checkpoint-2"))
