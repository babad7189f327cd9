"""DeepSeekMoE models trained on 4 gloo ranks equal one process with the same global
batch: FSDP2 over 4 replicas (full and LoRA), FSDP2 replicas x tensor parallelism
(``3d_parallel``, dp 2 x tp 2) and pipeline stages x FSDP2 replicas (``pipeline``,
pp 2 x dp 2, full and LoRA).

A rank whose tokens leave an expert idle still runs that expert (on no rows) while
training, so every rank reduces the same gradients; otherwise FSDP2 reduce-scatters
only the experts that have a gradient, and the ranks' collectives no longer match.
Tolerance as in test_train_distributed.py: 1e-5 relative on losses."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

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

# A global batch of 8 per step: 1 sequence x 2 micro-batches x 4 replicas, 2 x 2 x 2
# with tensor parallelism or pipeline replicas, 4 x 2 in one process.
MOE_RUN = dict(gradient_accumulation_steps=2)


def moe_lm():
    """The ``tiny`` preset: DeepSeek-V3 layout (MLA; layer 0 dense, layer 1 MoE with 8
    routed experts, top-2, and a shared expert)."""
    import ds_model

    model = ds_model.from_config("tiny", seed=0)
    assert model.config.n_routed_experts > 1
    return model


def moe_reference(out: Path) -> dict:
    from ds_model.training import ByteTokenizer, Trainer

    def run(**kw) -> list[float]:
        trainer = Trainer(
            model=moe_lm(),
            train_dataset=S.varied_texts(),
            tokenizer=ByteTokenizer(),
            output_dir=str(out / "moe_ref"),
            **{**S.DIST_OPTS, **MOE_RUN, "per_device_train_batch_size": 4, **kw},
        )
        return trainer.train().losses

    return {"full": run(), "lora": run(lora_config=S.lora_config())}


def moe_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from ds_model.training import ByteTokenizer, Trainer

    S.join_gloo(rank, world, port)
    results: dict = {}

    def run(name: str, strategy: str, **kw) -> None:
        trainer = Trainer(
            model=moe_lm(),
            train_dataset=S.varied_texts(),
            tokenizer=ByteTokenizer(),
            output_dir=os.path.join(out, name),
            distributed_strategy=strategy,
            **{**S.DIST_OPTS, **MOE_RUN, **kw},
        )
        results[name] = trainer.train().losses

    lora = dict(lora_config=S.lora_config())
    run("fsdp", "fsdp", per_device_train_batch_size=1)
    run("fsdp_lora", "fsdp", per_device_train_batch_size=1, **lora)
    run("dp_tp", "3d_parallel", tp_size=2, per_device_train_batch_size=2)
    run("pp_dp", "pipeline", pp_size=2, per_device_train_batch_size=2)
    run("pp_dp_lora", "pipeline", pp_size=2, per_device_train_batch_size=2, **lora)
    if rank == 0:
        Path(out, "moe_results.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("moe_mesh")
    reference = S.forked_runs(out, 4, moe_worker, moe_reference)
    return json.loads((out / "moe_results.json").read_text()), reference


@pytest.mark.parametrize("name", ["fsdp", "dp_tp", "pp_dp"])
def test_full_moe_training_matches_one_process(runs, name) -> None:
    dist, ref = runs
    assert ref["full"][-1] < ref["full"][0]
    assert dist[name] == pytest.approx(ref["full"], rel=REL)


@pytest.mark.parametrize("name", ["fsdp_lora", "pp_dp_lora"])
def test_lora_over_moe_matches_one_process(runs, name) -> None:
    dist, ref = runs
    assert dist[name] == pytest.approx(ref["lora"], rel=REL)


@pytest.mark.parametrize("lean", [True, False])
def test_idle_experts_get_zero_gradients(lean) -> None:
    """One token routes to 2 of 8 experts; every expert still has a gradient, zero for
    the idle ones, with and without the hand-written backward."""
    import torch
    from ds_model import lean_backward

    model = moe_lm()
    lean_backward.enable(model, lean)
    model(torch.tensor([[5]])).logits.sum().backward()
    experts = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    for routed in experts:
        grads = [expert.down_proj.weight.grad for expert in routed]
        assert all(g is not None for g in grads)
        used = sum(bool(g.abs().sum() > 0) for g in grads)
        assert used == model.config.num_experts_per_tok
