"""4-rank gloo runs on a mesh, against one process with the same global batch: 2
pipeline stages x 2 FSDP2 replicas (``pipeline``, ``pp_size=2``), 2 stages x 2-way
tensor parallelism (``3d_parallel``, ``pp_size=2``, ``tp_size=2``), and 2 FSDP2
replicas x 2-way tensor parallelism (``3d_parallel``, no pipeline); and on 8 ranks the
full (pp, dp, tp) = (2, 2, 2) mesh. Tolerance as
in test_train_distributed.py: 1e-5 relative on losses (only the order of float
additions differs), 1e-4 absolute on the exported model's logits."""

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
pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("mesh")
    reference = S.forked_runs(out, 4, S.mesh_worker, S.mesh_reference)
    return json.loads((out / "mesh_results.json").read_text()), reference


def test_ranks_sit_on_the_mesh_stage_major(runs) -> None:
    dist, _ = runs
    # rank = (pp_rank * dp_size + dp_rank) * tp_size + tp_rank, here with tp = 1.
    assert [dist[f"coords_{r}"] for r in range(4)] == [[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 0]]


def test_pipeline_with_fsdp_replicas_matches_one_process(runs) -> None:
    dist, ref = runs
    assert ref["full"][-1] < ref["full"][0]
    assert dist["pp_dp"] == pytest.approx(ref["full"], rel=REL)
    assert len(ref["evals"]) == 2
    assert dist["pp_dp_evals"] == pytest.approx(ref["evals"], rel=REL)
    assert dist["pp_dp_resumed"] == pytest.approx(ref["full"], rel=REL)
    assert dist["pp_dp_lora"] == pytest.approx(ref["lora"], rel=REL)
    # The stages' shards gathered into one checkpoint that loads as the trained model.
    torch.testing.assert_close(
        torch.tensor(dist["pp_dp_export_logits"]),
        torch.tensor(ref["logits"]),
        rtol=0,
        atol=1e-4,
    )


def test_interleaved_stages_with_fsdp_replicas_match_one_process(runs) -> None:
    dist, ref = runs
    assert dist["pp_dp_interleaved"] == pytest.approx(ref["four_layers"], rel=REL)


def test_replicas_agree_on_shapes_and_qlora_trains(runs) -> None:
    dist, ref = runs
    # Uneven evaluation batches: the replicas pad to one shape (else only one of them
    # would build a new stage object); the evaluation equals one process's.
    assert len(ref["uneven_evals"]) == 2
    assert dist["pp_dp_uneven_evals"] == pytest.approx(ref["uneven_evals"], rel=REL)
    # QLoRA's int4 base under FSDP2 stages: trains.
    assert dist["pp_dp_qlora"][-1] < dist["pp_dp_qlora"][0]
    assert dist["pp_dp_qlora"] != dist["pp_dp_lora"]


def test_a_problem_on_one_stage_stops_every_rank(runs) -> None:
    dist, _ = runs
    for rank in range(4):
        # Stage 1 (ranks 2 and 3) holds no targeted layer; every rank says so.
        untrainable = dist[f"untrainable_stage_{rank}"]
        assert "ValueError: pipeline rank 2: stage 1 has no trainable parameters" in untrainable
        foreign = dist[f"foreign_checkpoint_{rank}"]
        assert foreign.startswith("CheckpointError: pipeline rank 2:")
        assert "missing weights ['model.layers.2." in foreign


def test_pipeline_with_tensor_parallel_stages_matches_and_resumes_across_shapes(runs) -> None:
    dist, ref = runs
    assert dist["pp_tp"] == pytest.approx(ref["full"], rel=REL)
    assert dist["pp_tp_evals"] == pytest.approx(ref["evals"], rel=REL)
    # Resumed from the 2 x 2 (pp x dp) run's step-2 checkpoint on a 2 x 2 (pp x tp) mesh.
    assert dist["pp_tp_resumed"] == pytest.approx(ref["full"], rel=REL)


def test_fsdp_replicas_with_tensor_parallel_match_one_process(runs) -> None:
    dist, ref = runs
    assert dist["dp_tp"] == pytest.approx(ref["full"], rel=REL)
    assert dist["dp_tp_evals"] == pytest.approx(ref["evals"], rel=REL)


def test_the_full_3d_mesh_matches_one_process(runs, tmp_path_factory) -> None:
    # 8 ranks: 2 stages x 2 FSDP2 replicas x 2-way tensor parallel.
    out = tmp_path_factory.mktemp("cube")
    S.forked_runs(out, 8, S.cube_worker, lambda _: None)
    ranks = json.loads((out / "cube_results.json").read_text())
    ref = runs[1]
    assert [r["coords"] for r in ranks] == [
        [pp, dp, tp] for pp in range(2) for dp in range(2) for tp in range(2)
    ]
    for r in ranks:  # every rank logs the global loss
        assert r["losses"] == pytest.approx(ref["full"], rel=REL)
        assert r["evals"] == pytest.approx(ref["evals"], rel=REL)
