"""Pipeline parallelism's single-process parts: how layers are split, what each stage
keeps, and that the stages' forwards compose to the whole model's. The 2-rank runs
(losses, resume, export) are in test_train_distributed.py."""

from __future__ import annotations

import ds_model
import pytest
import torch
from ds_model.training import TrainingConfig
from ds_model.training.pipeline import _Stage, keep_stage, keep_stages, split_layers
from hypothesis import given
from hypothesis import strategies as st

V3 = {**ds_model.ModelConfig.from_preset("tiny").to_hf_dict(), "num_hidden_layers": 3}


@given(st.integers(1, 64), st.integers(1, 64))
def test_split_layers_is_contiguous_and_balanced(layers, stages) -> None:
    if layers < stages:
        with pytest.raises(ValueError, match=f"{stages} stages .* has {layers}"):
            split_layers(layers, stages)
        return
    ranges = split_layers(layers, stages)
    assert len(ranges) == stages
    assert [i for r in ranges for i in r] == list(range(layers))
    sizes = [len(r) for r in ranges]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # earlier stages take the extra layers


@pytest.mark.parametrize("stages", [2, 3])
def test_stages_partition_the_model_and_compose_to_its_logits(stages) -> None:
    full = ds_model.from_config(V3, seed=0)
    names = {n for n, _ in full.named_parameters()}
    ids = torch.randint(0, V3["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = full(ids).logits
    kept: list[set[str]] = []
    h = ids
    for stage in range(stages):
        model = ds_model.from_config(V3, seed=0)
        params = dict(model.named_parameters())
        layers = keep_stage(model, stage, stages)
        own = dict(model.named_parameters())
        assert all(own[n] is params[n] for n in own)  # kept in place, not copied
        assert all(n.split(".")[2] in {str(i) for i in layers} for n in own if ".layers." in n)
        kept.append(set(own))
        module = _Stage(model, layers, stage == 0, stage == stages - 1, torch.no_grad)
        h = module(h)
    assert set().union(*kept) == names
    assert sum(len(k) for k in kept) == len(names)  # each weight on one stage only
    torch.testing.assert_close(h, expected, rtol=0, atol=1e-5)


def test_interleaved_stages_compose_and_own_disjoint_parameters() -> None:
    # 2 ranks x 2 stages each over 4 layers: rank 0 runs stages 0 and 2, rank 1 runs 1, 3.
    config = {**V3, "num_hidden_layers": 4}
    full = ds_model.from_config(config, seed=0)
    ids = torch.randint(0, config["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = full(ids).logits
    ranks = [ds_model.from_config(config, seed=0) for _ in range(2)]
    chunks = {}
    for rank, model in enumerate(ranks):
        stage_ids = [rank, rank + 2]
        ranges = keep_stages(model, stage_ids, 4)
        assert [list(r) for r in ranges] == [[rank], [rank + 2]]
        for sid, layers in zip(stage_ids, ranges, strict=True):
            chunks[sid] = _Stage(model, layers, sid == 0, sid == 3, torch.no_grad)
        # The rank's stages share its model's modules and split its parameters.
        mine = [{id(p) for p in chunks[sid].parameters()} for sid in stage_ids]
        assert not mine[0] & mine[1]
        assert mine[0] | mine[1] == {id(p) for p in model.parameters()}
    h = ids
    for sid in range(4):
        h = chunks[sid](h)
    torch.testing.assert_close(h, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="pp_virtual_stages=0: expected an integer >= 1"):
        TrainingConfig(distributed_strategy="pipeline", pp_virtual_stages=0)
    with pytest.raises(ValueError, match="pp_virtual_stages=2 needs pipeline stages"):
        TrainingConfig(distributed_strategy="3d_parallel", pp_virtual_stages=2)


def test_a_dropped_module_says_where_it_went() -> None:
    model = ds_model.from_config(V3, seed=0)
    keep_stage(model, 1, 2)
    with pytest.raises(RuntimeError, match=r"model\.embed_tokens lives on another pipeline stage"):
        model.model.embed_tokens(torch.zeros(1, 1, dtype=torch.long))


def test_pipeline_refuses_tied_embeddings_and_other_models() -> None:
    tied = ds_model.from_config({**V3, "tie_word_embeddings": True}, seed=0)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        keep_stage(tied, 0, 2)
    with pytest.raises(ValueError, match=r"DeepSeekForCausalLM.*got Linear"):
        keep_stage(torch.nn.Linear(2, 2), 0, 2)
    with pytest.raises(ValueError, match="4 stages need at least one decoder layer each"):
        keep_stage(ds_model.from_config(V3, seed=0), 0, 4)
    split = ds_model.from_config(V3, seed=0)
    keep_stage(split, 1, 2)
    with pytest.raises(ValueError, match="already one stage of a split model"):
        keep_stage(split, 1, 2)


def test_pipeline_is_a_strategy_without_compile_or_fp16() -> None:
    assert TrainingConfig(distributed_strategy="pipeline").distributed_strategy == "pipeline"
    with pytest.raises(ValueError, match="torch_compile=True with distributed_strategy='pipeline'"):
        TrainingConfig(distributed_strategy="pipeline", torch_compile=True)
    # Each stage's GradScaler would skip steps on its own: refused, bf16 allowed.
    with pytest.raises(ValueError, match="precision='fp16' with pipeline stages"):
        TrainingConfig(distributed_strategy="pipeline", precision="fp16")
    with pytest.raises(ValueError, match="precision='fp16' with pipeline stages"):
        TrainingConfig(distributed_strategy="3d_parallel", pp_size=2, precision="fp16")
    assert TrainingConfig(distributed_strategy="pipeline", precision="bf16").precision == "bf16"
    assert TrainingConfig(distributed_strategy="3d_parallel", precision="fp16").pp_size == 0


def test_pp_size_needs_a_pipelined_strategy() -> None:
    assert TrainingConfig(distributed_strategy="3d_parallel", pp_size=2).pipelined
    assert TrainingConfig(distributed_strategy="pipeline").pipelined
    assert not TrainingConfig(distributed_strategy="3d_parallel", pp_size=1).pipelined
    with pytest.raises(ValueError, match="pp_size=2 with distributed_strategy='fsdp'"):
        TrainingConfig(distributed_strategy="fsdp", pp_size=2)
    with pytest.raises(ValueError, match="pp_size=1 with distributed_strategy='pipeline'"):
        TrainingConfig(distributed_strategy="pipeline", pp_size=1)
    with pytest.raises(ValueError, match="pp_size=-1: expected >= 0"):
        TrainingConfig(distributed_strategy="pipeline", pp_size=-1)


def test_mesh_shape_errors_name_the_sizes(monkeypatch) -> None:
    from ds_model.training.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    # Checked before any process group is joined.
    with pytest.raises(ValueError, match="pp_size=3 does not divide the world size 4"):
        init_distributed("pipeline", pp_size=3, device="cpu")
    with pytest.raises(ValueError, match="tp_size=4 does not divide world size / pp_size = 4 / 2"):
        init_distributed("3d_parallel", tp_size=4, pp_size=2, device="cpu")


def test_tensor_parallel_refuses_lora_wrapped_layers_by_name() -> None:
    import ds_lora
    from ds_model.training.distributed import tensor_parallel

    model = ds_model.from_config(V3, seed=0)
    ds_lora.inject(model, ds_lora.LoraConfig(r=4, target_modules="all-linear"))
    # Refused before the mesh is touched, naming LoRA and what to use instead.
    with pytest.raises(ValueError, match=r"tensor parallelism with LoRA adapters .* tp_size=1"):
        tensor_parallel(model, tp_mesh=None)
