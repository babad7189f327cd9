"""Shared helpers of ds-model's tests (no tests here): the tiny model configs several
test modules build, a tiny llama-shaped causal LM with the ds-model forward contract,
generated text data, and a loader for this module (test modules are imported by path,
so they load it with ``support()``)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.input_layernorm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.post_attention_layernorm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        # -1 heads: works when tensor parallelism shards the projections' columns.
        q = self.q_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLM(nn.Module):
    """forward(input_ids (batch, seqlen), attention_mask=None, labels=None) -> .logits
    (batch, seqlen, vocab) and, with labels, .loss (shifted cross-entropy, -100 ignored)."""

    tp_plan = None  # set per instance to shard attention too

    def __init__(self, vocab: int = 259, dim: int = 32, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab)
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, 2 * dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, labels=None):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return SimpleNamespace(logits=logits, loss=loss)


def tiny_lm(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kw)


LLAMA_TINY = {
    "model_type": "llama",
    "vocab_size": 259,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "bos_token_id": 256,
    "eos_token_id": 257,
}


def real_lm(seed: int = 0, **overrides):
    """ds-model's own DeepSeekForCausalLM (llama-shaped), small enough for CPU tests,
    with the byte tokenizer's vocabulary."""
    import ds_model

    return ds_model.from_config({**LLAMA_TINY, **overrides}, seed=seed)


# A llama with grouped-query attention (4 query heads over 2 key/value heads): the
# GQA model of the cache, runner and quantization tests, beside the ``tiny`` V3 preset.
LLAMA_GQA = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def gqa_llama(seed: int = 0, **overrides):
    """ds-model's DeepSeekForCausalLM built from ``LLAMA_GQA`` with ``overrides``."""
    import ds_model

    return ds_model.from_config({**LLAMA_GQA, **overrides}, seed=seed)


def tiny_v3(seed: int = 0, **overrides):
    """The ``tiny`` preset (DeepSeek-V3 layout: MLA, layer 0 dense, layer 1 MoE with 8
    routed experts, top-2, a shared expert) with ``overrides``."""
    import ds_model

    return ds_model.from_config(ds_model.ModelConfig.from_preset("tiny", **overrides), seed=seed)


WORDS = "the cat sat on a mat and dog ran to big red ball".split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Short sentences from a 13-word vocabulary with a repeating structure: learnable."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        subject = rng.choice(["the cat", "a dog", "the red ball"])
        out.append(f"{subject} sat on the mat and {subject} ran to the big dog.")
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def support():
    """This module, imported once under a stable name."""
    name = "ds_model_train_support"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models train fastest on one thread, and the CI machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------- distributed worker
DIST_OPTS = dict(
    optimizer="grouped_adamw",
    progress_bar=False,
    plot=False,
    max_seq_len=32,
    learning_rate=3e-3,
    max_steps=4,
    save_final=False,
)


def varied_texts(n: int = 24) -> list[str]:
    """Texts of different lengths, so ranks see different token counts."""
    return [t + " and more" * (i % 4) for i, t in enumerate(make_texts(n))]


def lora_config():
    from ds_lora import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


def single_process_reference(out: Path) -> dict:
    """What the 2-rank runs must reproduce: one process, the same global batch of 4."""
    from ds_model.training import ByteTokenizer, Trainer

    trained = {}

    def run(layers: int = 2, **kw):
        trainer = Trainer(
            model=real_lm(num_hidden_layers=layers),
            train_dataset=varied_texts(),
            tokenizer=ByteTokenizer(),
            output_dir=str(out / "ref"),
            **{**DIST_OPTS, **kw},
        )
        result = trainer.train()
        trained["model"] = trainer.model
        trained["evals"] = [e["eval_loss"] for e in result.eval_history]
        return result.losses

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        real_logits = real_lm()(ids).logits
        tiny_logits = tiny_lm()(ids).logits
    accum = run(**PIPELINE_RUN)
    with torch.no_grad():
        accum_logits = trained["model"](ids).logits
    accum_evals = trained["evals"]
    lora = run(per_device_train_batch_size=4, lora_config=lora_config())
    with torch.no_grad():
        lora_logits = trained["model"](ids).logits
    four = dict(layers=4, eval_dataset=varied_texts(6), eval_steps=2)
    interleaved = run(per_device_train_batch_size=4, **four)
    interleaved_evals = trained["evals"]
    return {
        "interleaved": interleaved,
        "interleaved_evals": interleaved_evals,
        "looped": run(per_device_train_batch_size=5, **four),
        "lora": lora,
        "lora_logits": lora_logits.tolist(),
        "qlora": run(per_device_train_batch_size=4, lora_config=lora_config(), quantization="int4"),
        "dp": run(per_device_train_batch_size=4),
        "accum": accum,
        "accum_logits": accum_logits.tolist(),
        "accum_evals": accum_evals,
        "real_logits": real_logits.tolist(),
        "tiny_logits": tiny_logits.tolist(),
        "ids": ids.tolist(),
    }


def join_gloo(rank: int, world: int, port: int) -> None:
    """Make this forked child rank ``rank`` of a gloo group on 127.0.0.1, one thread,
    with the environment torchrun would set."""
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)


def forked_runs(out: Path, world: int, worker, reference) -> dict:
    """Fork ``world`` ranks of ``worker(rank, world, port, out)`` and, meanwhile, run
    ``reference(out)`` here, one thread each; returns the reference's result after
    every rank exited cleanly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    pids = fork_ranks(world, worker, str(out))
    try:
        result = reference(out)
    except BaseException:
        wait_pids(pids, timeout=0)  # kills them: their results would go unread
        raise
    finally:
        torch.set_num_threads(before)
    codes = wait_pids(pids, timeout=400)
    assert codes == [0] * world, "a rank failed; its traceback is in the captured stderr"
    return result


def distributed_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: DDP (plain, accumulating, 4-bit hook), FSDP2 (with a sharded
    checkpoint and resume), and tensor parallel logits/training, all on gloo."""
    import os

    import torch.distributed as dist
    from ds_model.training import ByteTokenizer, Trainer, TrainingConfig
    from ds_model.training.distributed import init_distributed, wrap_model

    join_gloo(rank, world, port)
    results: dict = {}

    def run(name: str, strategy: str, resume: str | None = None, input_major=False, **kw) -> None:
        model = real_lm()
        if input_major:  # weights as a compiled CPU generate leaves them: FSDP2 still trains
            from ds_model.layout import input_major_weights

            assert input_major_weights(model) > 0
        trainer = Trainer(
            model=model,
            train_dataset=varied_texts(),
            tokenizer=ByteTokenizer(),
            output_dir=os.path.join(out, name),
            distributed_strategy=strategy,
            **{**DIST_OPTS, **kw},
        )
        results[name] = trainer.train(resume_from=resume).losses
        if name == "fsdp_lora":  # export from the sharded model (a collective)
            trainer.save_model(os.path.join(out, "fsdp_lora_export"))

    run("ddp", "ddp", per_device_train_batch_size=2)
    run(
        "fsdp_lora",
        "fsdp",
        per_device_train_batch_size=2,
        lora_config=lora_config(),
        save_final=True,
    )
    lora_ckpt = os.path.join(out, "fsdp_lora", "checkpoint-4")
    results["fsdp_lora_files"] = sorted(os.listdir(lora_ckpt)) if rank == 0 else []
    export = os.path.join(out, "fsdp_lora_export")
    results["fsdp_lora_export"] = sorted(os.listdir(export)) if rank == 0 else []
    run("ddp_accum", "ddp", per_device_train_batch_size=1, gradient_accumulation_steps=2)
    run("ddp_int4", "ddp", per_device_train_batch_size=2, compress_gradients=True)
    run(
        "fsdp",
        "fsdp",
        per_device_train_batch_size=2,
        save_steps=2,
        save_total_limit=None,
        input_major=True,
    )
    run(
        "fsdp_resumed",
        "fsdp",
        resume=os.path.join(out, "fsdp", "checkpoint-2"),
        per_device_train_batch_size=2,
    )
    # 3d_parallel on 2 ranks: tp=2, dp=1, so one "device" batch is the global batch.
    run("tp_train", "3d_parallel", per_device_train_batch_size=4)
    pipeline_worker(rank, out, results)

    ctx = init_distributed("3d_parallel")
    ids = torch.tensor(single_ids())
    for name, model in (("real", real_lm()), ("tiny", tiny_lm())):
        if name == "tiny":
            model.tp_plan = {
                f"layers.{i}.{p}": "rowwise" if p in ("o_proj", "down_proj") else "colwise"
                for i in range(2)
                for p in (
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                )
            }
        sharded = wrap_model(model, "3d_parallel", ctx, TrainingConfig())
        with torch.no_grad():
            results[f"{name}_tp_logits"] = torch.as_tensor(sharded(ids).logits).tolist()
        layer = model.layers[0] if name == "tiny" else model.model.layers[0].self_attn
        mlp = model.layers[0] if name == "tiny" else model.model.layers[0].mlp
        # FSDP2 makes every parameter a DTensor; tensor-parallel ones live on the 2-D mesh.
        results[f"{name}_attention_mesh_dims"] = layer.q_proj.weight.device_mesh.ndim
        results[f"{name}_mlp_mesh_dims"] = mlp.down_proj.weight.device_mesh.ndim
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def pipeline_worker(rank: int, out: str, results: dict) -> None:
    """Pipeline runs (2 stages, one layer each; every rank reads the same batches): 1F1B
    over two accumulation micro-batches with checkpoints, a resume, an export; GPipe
    with one micro-batch; refused configurations."""
    import os

    import ds_model
    from ds_model.training import ByteTokenizer, DPOTrainer, Trainer

    def run(name: str, resume: str | None = None, layers: int = 2, **kw) -> Trainer:
        trainer = Trainer(
            model=real_lm(num_hidden_layers=layers),
            train_dataset=varied_texts(),
            tokenizer=ByteTokenizer(),
            output_dir=os.path.join(out, name),
            distributed_strategy="pipeline",
            **{**DIST_OPTS, **kw},
        )
        results[name] = trainer.train(resume_from=resume).losses
        return trainer

    trainer = run("pipeline", save_steps=2, save_total_limit=None, **PIPELINE_RUN)
    results["pipeline_eval"] = [r["eval_loss"] for r in trainer.log_history if "eval_loss" in r]
    # The same trainer again, resuming: it reuses its split model.
    again = trainer.train(resume_from=os.path.join(out, "pipeline", "checkpoint-2"))
    results["pipeline_again"] = again.losses
    stages: list = [None, None]
    torch.distributed.all_gather_object(
        stages, sorted(n for n, _ in trainer.model.named_parameters())
    )
    results["pipeline_params"] = stages
    export = os.path.join(out, "pipeline_export")
    trainer.save_model(export)  # a collective: every stage sends its weights to rank 0
    if rank == 0:
        with torch.no_grad():
            logits = ds_model.from_pretrained(export)(torch.tensor(single_ids())).logits
        results["pipeline_export_logits"] = logits.tolist()
    run(
        "pipeline_resumed",
        resume=os.path.join(out, "pipeline", "checkpoint-2"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    run("pipeline_gpipe", per_device_train_batch_size=4)
    # Interleaved: 4 layers, 2 stages per rank (rank 0 runs layers 0 and 2).
    interleaved = run("pipeline_interleaved", save_steps=2, save_total_limit=None, **INTERLEAVED)
    evals = [e["eval_loss"] for e in interleaved.log_history if "eval_loss" in e]
    results["pipeline_interleaved_evals"] = evals
    # 5 micro-batches do not split into whole rounds of 2: the looped BFS order.
    looped = run("pipeline_looped", **{**INTERLEAVED, "gradient_accumulation_steps": 5})
    ickpt = os.path.join(out, "pipeline_interleaved", "checkpoint-2")
    run("pipeline_interleaved_resumed", resume=ickpt, **INTERLEAVED)
    try:  # one stage per rank gives rank 0 layers 0-1 where it had 0 and 2
        run("pipeline_uninterleaved", resume=ickpt, **{**INTERLEAVED, "pp_virtual_stages": 1})
    except ValueError as e:
        results["pipeline_uninterleaved_error"] = f"{type(e).__name__}: {e}"
    # LoRA on layers 1-3 only: rank 0's first stage (layer 0) has nothing to train.
    from ds_lora import LoraConfig

    later = LoraConfig(r=4, target_modules=r"model\.layers\.[123]\..*_proj")
    try:
        run("pipeline_frozen_stage", lora_config=later, **INTERLEAVED)
    except ValueError as e:
        results["pipeline_frozen_stage_error"] = str(e)
    results["pipeline_schedule_kinds"] = [
        sorted({type(s).__name__ for s in t.setup.pipeline._schedules.values()})
        for t in (interleaved, looped)
    ]
    # LoRA: each stage trains its layers' adapters; checkpoints and exports hold them all.
    lora = run("pipeline_lora", save_steps=2, save_total_limit=None, **PIPELINE_LORA)
    base = {n: p for n, p in real_lm().named_parameters()}
    kept = all(
        torch.equal(p, base[n.replace(".base_layer", "")])
        for n, p in lora.model.named_parameters()
        if "lora_" not in n
    )
    results["pipeline_lora_base_kept"] = [None, None]
    torch.distributed.all_gather_object(results["pipeline_lora_base_kept"], kept)
    lora_export = os.path.join(out, "pipeline_lora_export")
    lora.save_model(lora_export)
    if rank == 0:
        from ds_lora import load_adapter

        with torch.no_grad():
            logits = load_adapter(real_lm(), lora_export)(torch.tensor(single_ids())).logits
        results["pipeline_lora_export_logits"] = logits.tolist()
    run(
        "pipeline_lora_resumed",
        resume=os.path.join(out, "pipeline_lora", "checkpoint-2"),
        **PIPELINE_LORA,
    )
    run("pipeline_qlora", quantization="int4", **PIPELINE_LORA)
    try:
        DPOTrainer(model=real_lm(), **_pp_args(out, PAIRS)).train()
    except ValueError as e:
        results["pipeline_refused_dpo"] = str(e)


# Per-device batch 2, two accumulation micro-batches (the pipeline's), evaluated at steps
# 2 and 4: the pipeline run and its single-process reference.
PIPELINE_RUN = dict(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    eval_dataset=varied_texts(6),
    eval_steps=2,
)
INTERLEAVED = dict(
    layers=4,
    pp_virtual_stages=2,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=4,
    eval_dataset=varied_texts(6),
    eval_steps=2,
)
PIPELINE_LORA = dict(
    lora_config=lora_config(), per_device_train_batch_size=2, gradient_accumulation_steps=2
)
PAIRS = [{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " ran"}] * 8


def _pp_args(out: str, data=None) -> dict:
    import os

    from ds_model.training import ByteTokenizer

    return dict(
        train_dataset=data if data is not None else varied_texts(),
        tokenizer=ByteTokenizer(),
        output_dir=os.path.join(out, "refused"),
        distributed_strategy="pipeline",
        **DIST_OPTS,
    )


# The 4-rank mesh runs: a global batch of 8 per step (2 sequences x 2 micro-batches x
# 2 replicas, or 4 x 2 x 1 with tensor parallelism), evaluated at steps 2 and 4.
MESH_RUN = dict(gradient_accumulation_steps=2, eval_dataset=varied_texts(6), eval_steps=2)


# Evaluation in micro-batches of 2 over 6 texts: the second leaves replica 1 without a
# text (it runs one padded row of zero weight), a batch shape only it has not seen.
UNEVEN = dict(per_device_eval_batch_size=2)


def mesh_reference(out: Path) -> dict:
    """One process, the global batch of the mesh runs: their losses, evals, logits."""
    from ds_model.training import ByteTokenizer, Trainer

    def run(layers: int = 2, **kw):
        trainer = Trainer(
            model=real_lm(num_hidden_layers=layers),
            train_dataset=kw.pop("train_dataset", varied_texts()),
            tokenizer=ByteTokenizer(),
            output_dir=str(out / "mesh_ref"),
            **{**DIST_OPTS, **MESH_RUN, "per_device_train_batch_size": 4, **kw},
        )
        result = trainer.train()
        with torch.no_grad():
            logits = trainer.model(torch.tensor(single_ids())).logits
        return result, logits.tolist()

    full, logits = run()
    lora, _ = run(lora_config=lora_config())
    uneven, _ = run(**UNEVEN)
    four, _ = run(layers=4)
    return {
        "four_layers": four.losses,
        "uneven_evals": [e["eval_loss"] for e in uneven.eval_history],
        "full": full.losses,
        "evals": [e["eval_loss"] for e in full.eval_history],
        "logits": logits,
        "lora": lora.losses,
    }


def mesh_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of 4 ranks: 2 pipeline stages x 2 FSDP2 replicas (strategy pipeline,
    pp_size=2), with LoRA, checkpoints, an export and a resume on a mesh of another
    shape: 2 stages x tensor parallel 2 (3d_parallel, pp_size=2, tp_size=2); and
    3d_parallel without a pipeline on a 2 x 2 (dp x tp) mesh."""
    import os

    import torch.distributed as dist
    from ds_model.training import ByteTokenizer, Trainer

    join_gloo(rank, world, port)
    results: dict = {}

    def run(name: str, strategy: str, resume: str | None = None, model=None, **kw) -> Trainer:
        model = model if model is not None else real_lm()
        if name == "pp_dp":  # weights as a compiled CPU generate leaves them
            from ds_model.layout import input_major_weights

            assert input_major_weights(model) > 0
        trainer = Trainer(
            model=model,
            train_dataset=kw.pop("train_dataset", varied_texts()),
            tokenizer=ByteTokenizer(),
            output_dir=os.path.join(out, name),
            distributed_strategy=strategy,
            **{**DIST_OPTS, **MESH_RUN, "pp_size": 2, **kw},
        )
        result = trainer.train(resume_from=resume)
        results[name] = result.losses
        results[f"{name}_evals"] = [e["eval_loss"] for e in result.eval_history]
        return trainer

    replicas = dict(per_device_train_batch_size=2)
    trainer = run("pp_dp", "pipeline", save_steps=2, save_total_limit=None, **replicas)
    ctx = trainer.setup.ctx
    results[f"coords_{rank}"] = [ctx.pp_rank, ctx.dp_rank, ctx.tp_rank]
    export = os.path.join(out, "pp_dp_export")
    trainer.save_model(export)
    if rank == 0:
        import ds_model

        with torch.no_grad():
            logits = ds_model.from_pretrained(export)(torch.tensor(single_ids())).logits
        results["pp_dp_export_logits"] = logits.tolist()
    ckpt2 = os.path.join(out, "pp_dp", "checkpoint-2")
    run("pp_dp_resumed", "pipeline", resume=ckpt2, **replicas)
    run("pp_dp_lora", "pipeline", lora_config=lora_config(), **replicas)
    run("pp_dp_qlora", "pipeline", lora_config=lora_config(), quantization="int4", **replicas)
    run("pp_dp_uneven", "pipeline", **replicas, **UNEVEN)
    # Interleaved stages (2 per rank), each its own FSDP2 root over the replicas.
    deep = real_lm(num_hidden_layers=4)
    run("pp_dp_interleaved", "pipeline", model=deep, pp_virtual_stages=2, **replicas)
    tensor = dict(tp_size=2, per_device_train_batch_size=4)
    run("pp_tp", "3d_parallel", **tensor)
    run("pp_tp_resumed", "3d_parallel", resume=ckpt2, **tensor)  # from the pp x dp run
    # No pipeline: 2 FSDP2 replicas x 2-way tensor parallel, the 2-D mesh.
    run("dp_tp", "3d_parallel", pp_size=0, tp_size=2, **replicas)
    # Problems one stage finds stop every rank (none is left waiting on the others).
    from ds_lora import LoraConfig

    first_layer = LoraConfig(r=4, target_modules=r"model\.layers\.0\..*_proj")
    deeper = real_lm(num_hidden_layers=4)  # stage 1 holds layers 2-3, not in ckpt2
    for name, kw in (
        ("untrainable_stage", dict(lora_config=first_layer)),
        ("foreign_checkpoint", dict(resume=ckpt2, model=deeper)),
    ):
        try:
            run(name, "pipeline", **replicas, **kw)
        except ValueError as e:  # CheckpointError is a ValueError
            results[f"{name}_{rank}"] = f"{type(e).__name__}: {e}"
    gathered: list = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        merged = {k: v for part in gathered for k, v in part.items()}
        Path(out, "mesh_results.json").write_text(json.dumps(merged))
    dist.barrier()
    dist.destroy_process_group()


def cube_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of 8 ranks: the full (pp, dp, tp) = (2, 2, 2) mesh of 3d_parallel."""
    import os

    import torch.distributed as dist
    from ds_model.training import ByteTokenizer, Trainer

    join_gloo(rank, world, port)
    trainer = Trainer(
        model=real_lm(),
        train_dataset=varied_texts(),
        tokenizer=ByteTokenizer(),
        output_dir=os.path.join(out, "cube"),
        distributed_strategy="3d_parallel",
        **{**DIST_OPTS, **MESH_RUN, "pp_size": 2, "tp_size": 2},
        per_device_train_batch_size=2,
    )
    result = trainer.train()
    ctx = trainer.setup.ctx
    mine = {
        "losses": result.losses,
        "evals": [e["eval_loss"] for e in result.eval_history],
        "coords": [ctx.pp_rank, ctx.dp_rank, ctx.tp_rank],
    }
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out, "cube_results.json").write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def single_ids() -> list[list[int]]:
    torch.manual_seed(0)
    return torch.randint(0, 256, (2, 12)).tolist()


def fork_ranks(world: int, worker, *args) -> list[int]:
    """Start ``worker(rank, world, port, *args)`` in ``world`` forked children and return
    their pids. Forking (not spawning) reuses this process's imported torch and
    ds_model: a spawned rank spends most of a minute importing on a busy 2-core box."""
    import os
    import socket
    import traceback

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Import once here what every rank needs, instead of once per child.
    import torch._dynamo
    import torch.distributed.checkpoint.state_dict
    import torch.distributed.fsdp
    import torch.distributed.tensor.parallel
    import torch.nn.parallel  # noqa: F401

    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - a child
            code = 1
            try:
                worker(rank, world, port, *args)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    return pids


def wait_pids(pids: list[int], timeout: float) -> list[int]:
    """Exit codes of the children; kills them all if they outlive ``timeout`` seconds."""
    import os
    import signal
    import time

    deadline = time.monotonic() + timeout
    codes: dict[int, int] = {}
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    codes[pid] = -9
            break
        time.sleep(0.05)
    return [codes[p] for p in pids]
