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
from _common import SavedTensorBytes, llama, machine, median_time


def _peft_model(model, kwargs):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**kwargs))


def _ours(model, kwargs):
    return ds_lora.get_peft_model(model, ds_lora.LoraConfig(**kwargs))


def injection(base, kwargs, repeat):
    rows = []
    times = {}
    for name, make in (("PEFT", _peft_model), ("ds-lora", _ours)):
        copies = [copy.deepcopy(base) for _ in range(repeat + 1)]
        it = iter(copies)
        times[name] = median_time(lambda make=make, it=it: make(next(it), kwargs), repeat)
        del copies
    rows.append(("injection (ms)", times["PEFT"] * 1e3, times["ds-lora"] * 1e3))
    return rows


def training(base, kwargs, batch, seq, repeat, device):
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), device=device)
    results = {}
    for name, make in (("PEFT", _peft_model), ("ds-lora", _ours)):
        model = make(copy.deepcopy(base).to(device), kwargs)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(model=model, opt=opt):
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        with SavedTensorBytes() as saved:
            model(ids, labels=ids).loss.backward()
        opt.zero_grad(set_to_none=True)
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step()
            peak = torch.cuda.max_memory_allocated() / 2**20
        results[name] = (median_time(step, repeat), saved.total / 2**20, peak)
        del model, opt
        gc.collect()
    rows = [
        ("training step (ms)", results["PEFT"][0] * 1e3, results["ds-lora"][0] * 1e3),
        ("saved activations (MiB)", results["PEFT"][1], results["ds-lora"][1]),
    ]
    if device.type == "cuda":
        rows.append(("peak CUDA memory (MiB)", results["PEFT"][2], results["ds-lora"][2]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        hidden, layers, batch, seq, repeat = 64, 2, 2, 16, 3
    else:
        hidden, layers, batch, seq, repeat = 256, 4, 4, 64, 7
    print(f"machine: {machine()}")
    print(
        f"model: random Llama, hidden {hidden}, {layers} layers; batch {batch} x seq {seq}; "
        f"median of {repeat}\n"
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
