"""CPU time per decode token: eager ``generate`` against ``generate(compile=True)``.

Wall-clock tokens/s on a machine whose cores other work shares mostly measure that
work; the CPU time of this thread (``time.thread_time``) does not count the time the
process waited for a core, so it compares two versions of the code run at different
moments far better. Per batch size: (CPU time of generating 33 tokens - of 1 token) /
32, median of ``--repeats``, fp32, EOS off, one thread. The eager step is the baseline
in the same run (the ratio column). Run:

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-model/benchmarks/bench_decode_cpu_time.py \\
        [--model models/ds-tiny-coder] [--batches 1 8] [--repeats 3] [--without NAME]

``--without`` turns one of the decode step's measured choices off for the whole run,
to show what it buys (compare with a run without the option): ``guard-skip`` (compiled
steps after a generation's first check torch.compile's guards too), ``input-major``
(the compiled CPU step keeps row-major Linear weights), ``mla-direct-decode`` (MLA's
single-token decode goes through ds-attention, eager and compiled).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch


def _cpu(model, prompts, compile: bool, n: int) -> float:
    """CPU seconds of this thread to generate ``n`` tokens."""
    t0 = time.thread_time()
    model.generate(prompts, n, compile=compile)
    return time.thread_time() - t0


def _turn_off(choices: list[str]) -> None:
    import ds_model.cuda_graph as cuda_graph
    import ds_model.mla as mla

    if "guard-skip" in choices:
        cuda_graph.SKIP_GUARDS = False
    if "input-major" in choices:
        cuda_graph.input_major_weights = lambda model: 0
    if "mla-direct-decode" in choices:
        mla._plain_decode = mla._masked_decode = lambda *args: False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/ds-tiny-coder")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        choices=["guard-skip", "input-major", "mla-direct-decode"],
        help="turn one measured decode choice off (repeatable)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    import ds_model

    _turn_off(args.without)

    model = ds_model.from_pretrained(args.model, dtype=torch.float32)
    model.config = dataclasses.replace(model.config, eos_token_id=None)
    print(f"machine: {platform.machine()} {platform.processor() or ''}; torch {torch.__version__}")
    print("\n| batch | eager ms / token | compile=True ms / token | compiled / eager speed |")
    print("| ---: | ---: | ---: | ---: |")
    for batch in args.batches:
        prompts = [[5 + i, 6, 7, 8, 9, 10, 11, 12] for i in range(batch)]
        cells = []
        for compile in (False, True):
            run = (model, prompts, compile)
            _cpu(*run, 33), _cpu(*run, 2)  # warm-up (and the compile)
            per_token = [(_cpu(*run, 33) - _cpu(*run, 1)) / 32 * 1e3 for _ in range(args.repeats)]
            cells.append(statistics.median(per_token))
        eager, compiled = cells
        print(f"| {batch} | {eager:.2f} | {compiled:.2f} | {eager / compiled:.2f}x |")


if __name__ == "__main__":
    main()
