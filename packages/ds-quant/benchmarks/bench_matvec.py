"""Decode products on the CPU against the memory's read stream: GB/s of weight per format.

A batch-1 decode step multiplies one row by every weight, so each layer's time is at
best its weight bytes over the memory bandwidth. For each shape, ``--megabytes`` of
distinct layers (so the weights come from memory, not cache) of every format run one
row (``--rows``) eagerly and, where marked, compiled (``torch.compile`` of one module running the
row through every layer). ds-quant's INT8 / INT4 layers run their CPU decode kernel
(``kernels.cpu_gemv``) and, as the baseline in the same run, torch's packed ops
(``backend="cpu_packed"``: compiled one-row INT8 steps then take inductor's
multiply-and-sum over the int8 weight); bfloat16 layers run oneDNN's matmul and
ds-quant's ``bf16_gemv``, float32 layers torch's matmul (MKL) and ds-quant's
``fp32_gemv``. The figure is weight bytes
(scales included) per second, and its share of a read stream timed in the same repeat
(a compiled sum over a 256 MiB float32 tensor: what one core reads when reading is all
it does; this host's stream moves by a third from one minute to the next). "us per layer"
is the time of one layer's call: with small shapes (``--shapes 64x64 --megabytes 1
--calls 50``) the fixed cost of a call, as a decode step pays it for each layer (a
compiled bank's own entry cost is shared by its layers). The formats
and the stream interleave in every repeat; medians of ``--repeats`` (the share: of the
per-repeat shares). Last, each eager quantized path's relative error against the
product with its own dequantized weight in float64 (the rounding a kernel adds). Run:

    OMP_NUM_THREADS=1 uv run --frozen python packages/ds-quant/benchmarks/bench_matvec.py \
        [--shapes 2048x512 768x2048 32000x768] [--megabytes 64] [--repeats 5] \
        [--rows 1] [--formats fp32 bf16 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine
from ds_quant import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    quantize_,
)
from ds_quant.kernels import cpu_gemv
from torch import nn

INT8, INT4 = Int8WeightOnlyConfig(), Int4WeightOnlyConfig(group_size=128)
# (label, dtype of the float layer, ds-quant config or None, compiled, layer backend).
# "auto" runs the decode kernel (kernels.cpu_gemv) where it is built; "cpu_packed" is
# torch's packed op, and in a compiled one-row INT8 step inductor's multiply-and-sum.
# "input-major": the weight re-laid as ds_model.layout lays float32 layers for torch's
# few-row matmul (the serving runner's compiled steps), read in that layout.
FORMATS = [
    ("fp32", torch.float32, None, False, None),
    ("fp32, ds-quant's fp32_gemv", torch.float32, None, False, "fp32_gemv"),
    ("fp32 input-major", torch.float32, None, False, "input-major"),
    ("fp32 input-major, ds-quant's fp32_gemv", torch.float32, None, False, "fp32_gemv input-major"),
    ("bf16", torch.bfloat16, None, False, None),
    ("bf16, ds-quant's bf16_gemv", torch.bfloat16, None, False, "bf16_gemv"),
    ("INT8 weight-only", torch.float32, INT8, False, "auto"),
    ("INT8 weight-only, compiled", torch.float32, INT8, True, "auto"),
    ("INT8 weight-only, torch's op", torch.float32, INT8, False, "cpu_packed"),
    ("INT8 weight-only, torch's op, compiled", torch.float32, INT8, True, "cpu_packed"),
    ("INT8 W8A8 dynamic", torch.float32, Int8DynamicActivationInt8WeightConfig(), False, None),
    ("INT4 g128", torch.float32, INT4, False, "auto"),
    ("INT4 g128, compiled", torch.float32, INT4, True, "auto"),
    ("INT4 g128, torch's op", torch.float32, INT4, False, "cpu_packed"),
    ("INT4 g128, torch's op, compiled", torch.float32, INT4, True, "cpu_packed"),
]


class ReadStream:
    """A compiled sum over 256 MiB of float32: one call, one pass of reading."""

    def __init__(self) -> None:
        self.data = torch.randn(64 * 2**20)
        self.total = torch.compile(torch.sum)
        self.total(self.data)

    def gbps(self) -> float:
        start = time.perf_counter()
        self.total(self.data)
        return self.data.numel() * 4 / (time.perf_counter() - start) / 1e9


class KernelGemv(nn.Module):
    """A float layer through ``kernels.cpu_gemv.bf16_gemv`` or ``fp32_gemv``, as
    ds-model's eager decode runs plain layers of a few rows."""

    def __init__(self, layer: nn.Linear, kernel) -> None:
        super().__init__()
        self.weight, self.kernel = layer.weight, kernel

    def forward(self, row: torch.Tensor) -> torch.Tensor:
        return self.kernel(row, self.weight)


class Bank(nn.Module):
    """Distinct layers fed the same row: one call reads every weight once."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, row: torch.Tensor) -> list[torch.Tensor]:
        return [layer(row) for layer in self.layers]


def relative_error(layer: nn.Module, row: torch.Tensor) -> float:
    """|y - y_exact| / |y_exact| of one quantized layer's output, y_exact the product in
    float64 with its own dequantized weight: what the kernel's rounding of the
    activations (and its sums) adds to the weight quantization."""
    exact = row.double() @ layer.dequantize(torch.float64).t()
    return float((layer(row).double() - exact).norm() / exact.norm())


def bank_of(fmt, out_features: int, in_features: int, count: int):
    """A ``Bank`` of ``count`` layers of one format (compiled where marked), and the
    bytes of one layer's state (weights and scales)."""
    _, dtype, config, compiled, backend = fmt
    input_major = backend is not None and backend.endswith("input-major")
    if input_major:
        backend = backend.removesuffix("input-major").strip() or None
    layers = []
    for _ in range(count):
        layer = nn.Linear(in_features, out_features, bias=False).to(dtype)
        if input_major:
            layer.weight.data = layer.weight.data.t().contiguous().t()
        if config is not None:
            holder = nn.Sequential(layer)
            quantize_(holder, config)
            layer = holder[0]
            if backend is not None:
                layer.backend = backend
        elif backend in ("bf16_gemv", "fp32_gemv"):
            layer = KernelGemv(layer, getattr(cpu_gemv, backend))
        layers.append(layer.eval())
    bank = Bank(layers)
    nbytes = sum(t.numel() * t.element_size() for t in layers[0].state_dict().values())
    # Static shapes, as a compiled decode step's layers have.
    return (torch.compile(bank, dynamic=False) if compiled else bank), nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["2048x512", "768x2048", "32000x768"])
    parser.add_argument("--megabytes", type=float, default=64.0, help="fp32 weight per format")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1, help="activation rows (batch)")
    parser.add_argument(
        "--formats", nargs="+", default=None, help="only the formats whose label starts so"
    )
    parser.add_argument(
        "--calls", type=int, default=1, help="bank calls per timing (small shapes: 20 or more)"
    )
    args = parser.parse_args()
    formats = [f for f in FORMATS if not args.formats or f[0].startswith(tuple(args.formats))]
    torch.manual_seed(0)
    print(f"{machine()}; {args.rows} row(s)\n")
    print(
        "| weight (out x in) | format | weight bytes per layer | us per layer | GB/s "
        "| of the read stream |"
    )
    print("|---|---|---:|---:|---:|---:|")
    streams: list[float] = []
    errors: dict[str, list[float]] = {}
    for shape in args.shapes:
        out_features, in_features = map(int, shape.split("x"))
        count = max(2, round(args.megabytes * 2**20 / (out_features * in_features * 4)))
        # Every bank's forward is one code object: without a reset, the compiled banks
        # of earlier shapes count toward dynamo's recompile limit (then it runs eagerly).
        torch.compiler.reset()
        built = {fmt[0]: bank_of(fmt, out_features, in_features, count) for fmt in formats}
        rates: dict[str, list[float]] = {name: [] for name in built}
        shares: dict[str, list[float]] = {name: [] for name in built}
        calls: dict[str, list[float]] = {name: [] for name in built}
        with torch.inference_mode():
            stream = ReadStream()  # compiled in the mode it is timed in
            rows = {
                dtype: torch.randn(args.rows, in_features, dtype=dtype) for _, dtype, *_ in formats
            }
            for name, dtype, *_ in formats:  # warm up: compile, prepack, caches
                built[name][0](rows[dtype])
            for _ in range(args.repeats):
                streams.append(stream.gbps())
                for name, dtype, *_ in formats:
                    bank, nbytes = built[name]
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        bank(rows[dtype])
                    seconds = (time.perf_counter() - start) / args.calls
                    calls[name].append(seconds / count * 1e6)
                    rates[name].append(nbytes * count / seconds / 1e9)
                    shares[name].append(rates[name][-1] / streams[-1])
            for name, dtype, config, compiled, _ in formats:
                if config is not None and not compiled:
                    errors.setdefault(name, []).append(
                        relative_error(built[name][0].layers[0], rows[dtype])
                    )
        for name, *_ in formats:
            gbps, share = statistics.median(rates[name]), statistics.median(shares[name])
            micros = statistics.median(calls[name])
            print(
                f"| {shape} | {name} | {built[name][1]:,} | {micros:.1f} | {gbps:.1f} "
                f"| {share:.0%} |"
            )
    print(
        f"\nread stream: {min(streams):.1f}-{max(streams):.1f} GB/s, median "
        f"{statistics.median(streams):.1f} (compiled sum over 256 MiB of float32)"
    )
    print("\n| format | relative error against its dequantized weight (per shape) |")
    print("|---|---|")
    for name, values in errors.items():
        print(f"| {name} | {' / '.join(f'{v:.1e}' for v in values)} |")


if __name__ == "__main__":
    main()
