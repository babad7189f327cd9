"""ds-lora versus PEFT on the same random Llama, in the same run: injection time,
training step time (forward + backward + AdamW step) and memory.

Memory: bytes autograd saves for the backward (activations, measured with
saved_tensors_hooks) on every device, plus peak allocated memory on CUDA. Parameters and
optimizer state are the same in both libraries (same trainable parameters).

    uv run --frozen python packages/ds-lora/benchmarks/bench_vs_peft.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import gc
import warnings

import ds_lora
import torch
from _common import SavedTensorBytes, add_threads_arg, interleaved_median_times, llama, machine


def _peft_model(model, kwargs):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**kwargs))


def _ours(model, kwargs):
    return ds_lora.get_peft_model(model, ds_lora.LoraConfig(**kwargs))


def injection(base, kwargs, repeat):
    pools = {name: [copy.deepcopy(base) for _ in range(repeat + 1)] for name in ("PEFT", "ds-lora")}
    makers = {"PEFT": _peft_model, "ds-lora": _ours}
    iters = {name: iter(pool) for name, pool in pools.items()}
    fns = {
        name: (lambda make=makers[name], it=iters[name]: make(next(it), kwargs)) for name in pools
    }
    times = interleaved_median_times(fns, repeat)
    return [("injection (ms)", times["PEFT"] * 1e3, times["ds-lora"] * 1e3)]


def training(base, kwargs, batch, seq, repeat, device):
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), device=device)
    steps, saved, peaks = {}, {}, {}
    for name, make in (("PEFT", _peft_model), ("ds-lora", _ours)):
        model = make(copy.deepcopy(base).to(device), kwargs)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt):
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        with SavedTensorBytes() as counter:
            model(ids, labels=ids).loss.backward()
        opt.zero_grad(set_to_none=True)
        saved[name] = counter.total / 2**20
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step()
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20
        steps[name] = step
    times = interleaved_median_times(steps, repeat)
    rows = [
        ("training step (ms)", times["PEFT"] * 1e3, times["ds-lora"] * 1e3),
        ("saved activations (MiB)", saved["PEFT"], saved["ds-lora"]),
    ]
    if peaks:
        rows.append(("peak CUDA memory (MiB)", peaks["PEFT"], peaks["ds-lora"]))
    gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    add_threads_arg(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        hidden, layers, batch, seq, repeat = 64, 2, 2, 16, 3
    else:
        hidden, layers, batch, seq, repeat = 128, 4, 4, 64, 11
    print(f"machine: {machine()}")
    print(
        f"model: random Llama, hidden {hidden}, {layers} layers; batch {batch} x seq {seq}; "
        f"median of {repeat}, measured round-robin\n"
    )
    for label, kwargs in (
        (
            "q_proj,v_proj r=16",
            dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        ),
        (
            "all-linear r=16 dropout 0.1",
            dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.1),
        ),
        (
            "all-linear r=16 DoRA",
            dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, use_dora=True),
        ),
    ):
        inject_base = llama(hidden, layers * 4)
        base = llama(hidden, layers)
        rows = injection(inject_base, kwargs, repeat)
        rows += training(base, kwargs, batch, seq, repeat, device)
        print(f"### {label}\n")
        print("| metric | PEFT | ds-lora | PEFT / ds-lora |")
        print("| --- | ---: | ---: | ---: |")
        for metric, theirs, ours in rows:
            print(f"| {metric} | {theirs:.2f} | {ours:.2f} | {theirs / ours:.2f}x |")
        print(f"\n(injection measured on a {layers * 4}-layer model of the same width)\n")


if __name__ == "__main__":
    main()
