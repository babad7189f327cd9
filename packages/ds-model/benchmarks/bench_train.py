"""Training throughput and peak memory: ds-model's Trainer vs Hugging Face Trainer
(+ PEFT for LoRA) on the same llama-shaped model size, the same packed data and the same
hardware, in the same run; and tokens/s of 1 vs 2 data-parallel processes (DDP, gloo).

Each measurement runs in a fresh process (so peak RSS belongs to that run alone) and is
repeated; the table shows medians. Throughput is steady state: tokens of the steps after
the first ``--warmup`` ones divided by their wall time. Memory is reported twice:

- peak tensor memory: the most bytes held at once by tensors allocated during
  ``train()`` (optimizer state, gradients, activations, temporaries), from the
  profiler's allocation events in one short extra run per side; the CPU counterpart of
  ``torch.cuda.max_memory_allocated``, and what a larger model or batch scales.
- peak RSS: the process's peak resident memory minus its RSS just before training
  (imports, the data and the model excluded). It adds what malloc keeps of freed
  memory, which moves it by 10-25 MiB from run to run at this size.

    uv run --frozen python packages/ds-model/benchmarks/bench_train.py [--repeats 3]
        [--arch llama|v3] [--compile none|ds|both] [--no-scaling | --only-scaling]

``--arch llama`` (default): a small llama shape, where both trainers run the same torch
kernels. ``--arch v3``: the architecture of the model this stack ships
(models/ds-tiny-coder: MLA + DeepSeekMoE, 8 routed experts top-2) with the byte-level
vocabulary; transformers' ``DeepseekV3ForCausalLM`` loads ds-model's initial weights, so
both start from the same parameters. LoRA there targets the same modules on both sides
(attention, dense and shared-expert MLPs; not routed experts, which transformers 5 fuses
into tensors PEFT's ``target_modules`` cannot reach). ``--compile ds`` trains ds-model
with ``torch_compile=True``; ``both`` also sets HF's ``torch_compile=True`` (the first,
compiling steps fall in the warm-up, which must cover them).

The scaling runs (llama shape) compare 1 and 2 processes under DDP (batch 8 per
process) and under the 2-rank pipeline (one batch of 8 per step in 4 micro-batches,
against the same run in one process), with one stage per rank (1F1B) and with two
(interleaved 1F1B).

Every process uses one intra-op thread (torch.set_num_threads(1)), so that 1 vs 2
processes on a 2-core machine compares like with like and runs are less noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = {
    "model_type": "llama",
    "vocab_size": 259,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "bos_token_id": 256,
    "eos_token_id": 257,
}
V3_CONFIG = {
    **json.loads(
        (Path(__file__).parents[3] / "models" / "ds-tiny-coder" / "config.json").read_text()
    ),
    "vocab_size": 259,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
    "torch_dtype": "float32",
}
# PEFT's full-match regex form, understood by ds-lora too: the same layers on both sides.
V3_LORA_TARGETS = (
    r".*\.(self_attn\.(q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj))"
)
SEQ, BATCH = 128, 8


def _texts(n: int) -> list[str]:
    import random

    rng = random.Random(0)
    words = "the a cat dog sat ran on to big red mat ball and then over under".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) for _ in range(n)]


def _preimport(compiled: bool = False) -> None:
    """Modules imported lazily on the first optimizer step (torch._dynamo, ~110 MiB of
    Python objects): transformers imports them at import time, ds-model on first use.
    Import them before the RSS baseline on both sides so peak memory is training's.
    A compiled run also imports the compiler (torch._inductor, ~50 MiB) on its first
    step, on either side: imported before the baseline too."""
    import torch._dynamo
    import torch.distributed.checkpoint.state_dict

    if compiled:
        import torch._inductor.codecache
        import torch._inductor.compile_fx  # noqa: F401


def peak_tensor_mib(train) -> float:
    """Run ``train()`` under the profiler's memory tracking and return the peak of the
    bytes held by tensors allocated during it (``Total Allocated`` in the trace): the
    CPU counterpart of ``torch.cuda.max_memory_allocated``, independent of how malloc
    caches freed memory (which moves peak RSS by tens of MiB from run to run)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0) / 2**20


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _blocks():
    from ds_model.training import ByteTokenizer, build_lm_dataset

    ds, _ = build_lm_dataset(_texts(600), ByteTokenizer(), max_seq_len=SEQ)
    return ds


def run_ds(
    mode: str,
    steps: int,
    warmup: int,
    arch: str = "llama",
    compile: bool = False,
    memory: bool = False,
    precision: str = "fp32",
    lean_backward: bool = True,
) -> dict:
    import ds_model
    import torch
    from ds_model.training import ByteTokenizer, Trainer

    torch.set_num_threads(1)
    data = _blocks()
    model = ds_model.from_config(CONFIG if arch == "llama" else V3_CONFIG, seed=0)
    lora = None
    if mode == "lora":
        targets = "all-linear" if arch == "llama" else V3_LORA_TARGETS
        lora = ds_model.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
    stamps: list[float] = []

    class Timed(Trainer):
        def _log(self, path, record, ctx):
            stamps.append(time.perf_counter())
            super()._log(path, record, ctx)

    _preimport(compile)
    base = _rss_kib("VmRSS")
    with tempfile.TemporaryDirectory() as out:
        trainer = Timed(
            model=model,
            train_dataset=data,
            lora_config=lora,
            tokenizer=ByteTokenizer(),
            output_dir=out,
            per_device_train_batch_size=BATCH,
            max_seq_len=SEQ,
            learning_rate=1e-3,
            max_steps=steps,
            progress_bar=False,
            plot=False,
            save_final=False,
            shuffle=False,
            max_grad_norm=1.0,
            torch_compile=compile,
            precision=precision,
            lean_backward=lean_backward,
        )
        if memory:
            return {"peak_tensor_mib": peak_tensor_mib(trainer.train)}
        trainer.train()
    return _result(stamps, warmup, base)


def _hf_v3(tmp: str):
    """transformers' DeepSeek-V3 with ds-model's seed-0 initial weights."""
    import ds_model
    from transformers import DeepseekV3ForCausalLM

    ds_model.from_config(V3_CONFIG, seed=0).save_pretrained(tmp)
    return DeepseekV3ForCausalLM.from_pretrained(tmp, dtype="float32")


def run_hf(
    mode: str,
    steps: int,
    warmup: int,
    arch: str = "llama",
    compile: bool = False,
    memory: bool = False,
    precision: str = "fp32",
) -> dict:
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.set_num_threads(1)
    data = _blocks()
    items = [
        {
            "input_ids": data[i]["input_ids"],
            "labels": data[i]["labels"],
            "attention_mask": data[i]["attention_mask"],
        }
        for i in range(len(data))
    ]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=CONFIG["vocab_size"],
        hidden_size=CONFIG["hidden_size"],
        intermediate_size=CONFIG["intermediate_size"],
        num_hidden_layers=CONFIG["num_hidden_layers"],
        num_attention_heads=CONFIG["num_attention_heads"],
        max_position_embeddings=CONFIG["max_position_embeddings"],
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    if arch == "v3":
        with tempfile.TemporaryDirectory() as tmp:
            model = _hf_v3(tmp)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
                target_modules=V3_LORA_TARGETS
                if arch == "v3"
                else [
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                ],
            ),
        )
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    _preimport(compile)
    base = _rss_kib("VmRSS")
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            max_steps=steps,
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            optim="adamw_torch_fused",  # its default; GroupedAdamW fuses on CPU too
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            max_grad_norm=1.0,
            disable_tqdm=True,
            torch_compile=compile,
            bf16=precision == "bf16",  # CPU autocast, as ds-model's precision="bf16"
        )
        trainer = Trainer(model=model, args=args, train_dataset=items, callbacks=[Stamp()])
        if memory:
            return {"peak_tensor_mib": peak_tensor_mib(trainer.train)}
        trainer.train()
    return _result(stamps, warmup, base)


def _result(stamps: list[float], warmup: int, base_kib: int) -> dict:
    steps = len(stamps) - warmup
    seconds = stamps[-1] - stamps[warmup - 1]
    return {
        "tokens_per_s": steps * BATCH * SEQ / seconds,
        "peak_mib": (_rss_kib("VmHWM") - base_kib) / 1024,
    }


def run_scaling_rank(steps: int, warmup: int, strategy: str = "ddp") -> dict:
    """Under torchrun (or alone), on gloo; rank 0 reports the global tokens/s over the
    steady steps. ``ddp``: per-process batch BATCH. ``pipeline``: one stage per process,
    every step BATCH sequences in 4 accumulation micro-batches (1F1B's), the same run
    in one process as the baseline. ``interleaved``: the same with two stages per
    process (interleaved 1F1B)."""
    import ds_model
    import torch
    from ds_model.training import ByteTokenizer, Trainer

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = _blocks()
    batch, accum, replicas = BATCH, 1, world
    virtual = 2 if strategy == "interleaved" else 1
    if strategy in ("pipeline", "interleaved"):
        batch, accum, replicas = BATCH // 4, 4, 1  # the stages share one batch
    stamps: list[float] = []

    class Timed(Trainer):
        def _log(self, path, record, ctx):
            stamps.append(time.perf_counter())
            super()._log(path, record, ctx)

    with tempfile.TemporaryDirectory() as out:
        Timed(
            model=ds_model.from_config(CONFIG, seed=0),
            train_dataset=data,
            tokenizer=ByteTokenizer(),
            output_dir=out,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            max_seq_len=SEQ,
            max_steps=steps,
            progress_bar=False,
            plot=False,
            save_final=False,
            distributed_strategy=("pipeline" if virtual > 1 else strategy) if world > 1 else "none",
            pp_virtual_stages=virtual if world > 1 else 1,
        ).train()
    seconds = stamps[-1] - stamps[warmup - 1]
    return {"tokens_per_s": (len(stamps) - warmup) * BATCH * SEQ * replicas / seconds}


def _child(args: list[str], torchrun: int = 0) -> dict:
    cmd = [sys.executable, __file__, *args]
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={torchrun}",
            "--master_addr=127.0.0.1",
            f"--master_port={29600 + os.getpid() % 300}",
            __file__,
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{cmd} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def _worker_flags(a, worker: str, mode: str, common: list[str]) -> list[str]:
    compiled = a.compile == "both" or (a.compile == "ds" and worker == "ds")
    flags = ["--worker", worker, "--mode", mode, "--arch", a.arch, "--precision", a.precision]
    flags += common + ["--no-lean-backward"] * a.no_lean_backward
    return flags + ["--compiled"] * compiled


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--worker", choices=["ds", "hf", "scale"])
    p.add_argument("--mode", choices=["full", "lora"], default="full")
    p.add_argument("--arch", choices=["llama", "v3"], default="llama")
    p.add_argument("--no-scaling", action="store_true", help="skip the 1 vs 2 process runs")
    p.add_argument("--only-scaling", action="store_true", help="only the 1 vs 2 process runs")
    p.add_argument("--compile", choices=["none", "ds", "both"], default="none")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: autocast on both sides (float32 master weights)",
    )
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)  # worker
    p.add_argument("--scale-strategy", default="ddp", help=argparse.SUPPRESS)  # worker
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)  # worker
    p.add_argument(
        "--no-lean-backward",
        action="store_true",
        help="ds-model trains with TrainingConfig(lean_backward=False): autograd's graph",
    )
    a = p.parse_args()
    if a.worker:
        fn = {"ds": run_ds, "hf": run_hf}.get(a.worker)
        if fn:
            extra = {"lean_backward": not a.no_lean_backward} if fn is run_ds else {}
            args = (a.mode, a.steps, a.warmup, a.arch, a.compiled, a.memory, a.precision)
            result = fn(*args, **extra)
        else:
            result = run_scaling_rank(a.steps, a.warmup, a.scale_strategy)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
        return
    common = ["--steps", str(a.steps), "--warmup", str(a.warmup)]
    rows = []
    for mode in () if a.only_scaling else ("full", "lora"):
        ds_runs, hf_runs = [], []
        for _ in range(a.repeats):  # interleaved, so load drift hits both alike
            for worker, runs in (("ds", ds_runs), ("hf", hf_runs)):
                runs.append(_child(_worker_flags(a, worker, mode, common)))
        med = {
            k: (statistics.median(r[k] for r in ds_runs), statistics.median(r[k] for r in hf_runs))
            for k in ("tokens_per_s", "peak_mib")
        }
        # Tensor memory is deterministic: one short profiled run per side.
        short = ["--steps", "5", "--warmup", "1", "--memory"]
        med["peak_tensor_mib"] = tuple(
            _child(_worker_flags(a, worker, mode, short))["peak_tensor_mib"]
            for worker in ("ds", "hf")
        )
        rows.append((mode, med))
    scaling: dict[str, tuple[list[float], list[float]]] = {
        k: ([], []) for k in ("ddp", "pipeline", "interleaved")
    }
    for _ in range(0 if a.no_scaling else a.repeats):
        for strategy, (one, two) in scaling.items():
            flags = ["--worker", "scale", "--scale-strategy", strategy, *common]
            one.append(_child(flags)["tokens_per_s"])
            two.append(_child(flags, torchrun=2)["tokens_per_s"])
    load = os.getloadavg()
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads 1 per process, load average {load[0]:.1f}; {a.repeats} repeats, "
        f"medians; model {a.arch} "
        f"{(CONFIG if a.arch == 'llama' else V3_CONFIG)['hidden_size']}d x "
        f"{(CONFIG if a.arch == 'llama' else V3_CONFIG)['num_hidden_layers']} layers, "
        f"batch {BATCH} x {SEQ} tokens, {a.steps} steps ({a.warmup} warm-up), "
        f"torch.compile: {a.compile}, precision: {a.precision}\n"
    )
    if rows:
        print(
            "| run | ds-model tokens/s | HF Trainer tokens/s | speed ratio | ds-model peak "
            "tensor MiB | HF peak tensor MiB | tensor memory ratio | ds-model peak RSS MiB "
            "| HF peak RSS MiB | RSS ratio |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode, med in rows:
        label = "full fine-tune" if mode == "full" else "LoRA r=8 (HF: + PEFT)"
        cells = []
        for key, fmt in (("tokens_per_s", ".0f"), ("peak_tensor_mib", ".0f"), ("peak_mib", ".0f")):
            ours, theirs = med[key]
            cells += [f"{ours:{fmt}}", f"{theirs:{fmt}}", f"{ours / theirs:.2f}x"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if a.no_scaling:
        return
    print(
        f"\n| strategy (gloo, CPU; the llama shape, {CONFIG['num_hidden_layers']} layers) "
        "| 1 process tokens/s | 2 processes tokens/s | scaling |"
    )
    print("| --- | --- | --- | --- |")
    for strategy, (one, two) in scaling.items():
        o, t = statistics.median(one), statistics.median(two)
        label = {
            "ddp": f"DDP, batch {BATCH} per process",
            "pipeline": f"pipeline, 2 stages, batch {BATCH} in 4 micro-batches",
            "interleaved": f"pipeline, 2 x 2 interleaved stages, batch {BATCH} in 4",
        }
        print(f"| {label[strategy]} | {o:.0f} | {t:.0f} | {t / o:.2f}x |")


if __name__ == "__main__":
    main()
