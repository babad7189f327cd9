"""Which W4A16 kernel a layer uses for an input: chosen per call from device and dtype.

``auto``: CUDA input and triton importable -> ``triton``; CPU rows the kernel takes
(outside autograd, where it is built) -> ``cpu_gemv`` (``kernels.cpu_gemv``); a CPU input
the packed CPU op accepts -> ``cpu_packed``; otherwise ``reference`` (dequantize, then
matmul).
"""

from __future__ import annotations

import importlib.util

import torch

from ds_quant.kernels.cpu import int4_cpu_supported
from ds_quant.kernels.cpu_gemv import int4_takes

HAS_TRITON = importlib.util.find_spec("triton") is not None
W4A16_BACKENDS = ("auto", "triton", "cpu_gemv", "cpu_packed", "reference")
# Inputs with at most this many rows take triton_gemv's matrix-vector kernels on a GPU:
# each row is its own program row re-reading the weight, which a tiled matmul beats past
# a few. (Here, not there, so CPU users need not import triton to read it.)
GEMV_MAX_ROWS = 4


def choose_w4a16_backend(
    x: torch.Tensor, out_features: int, group_size: int, requested: str = "auto"
) -> str:
    """The backend that will run ``x`` through a W4A16 layer (see module doc)."""
    if requested not in W4A16_BACKENDS:
        raise ValueError(f"backend must be one of {W4A16_BACKENDS}, got {requested!r}")
    if requested == "triton" and not HAS_TRITON:
        raise RuntimeError("backend 'triton' requested but triton is not installed")
    if requested == "cpu_packed" and not int4_cpu_supported(x, out_features, group_size):
        raise ValueError(
            "backend 'cpu_packed' needs a CPU float32/bfloat16/float16 input, "
            "out_features % 16 == 0, group_size in (32, 64, 128, 256) and in_features a "
            "multiple of group_size or leaving a last group of at least 32; got device "
            f"{x.device}, dtype {x.dtype}, out_features {out_features}, group_size "
            f"{group_size}, in_features {x.shape[-1]}"
        )
    if requested == "cpu_gemv" and not int4_takes(x, group_size):
        raise ValueError(
            "backend 'cpu_gemv' needs CPU float rows outside autograd, a built kernel "
            "(kernels.cpu_gemv.available()) and a group size it steps; got "
            f"{tuple(x.shape)} on {x.device}, group_size {group_size}"
        )
    if requested != "auto":
        return requested
    if x.is_cuda and HAS_TRITON:
        return "triton"
    if int4_takes(x, group_size):
        return "cpu_gemv"
    if int4_cpu_supported(x, out_features, group_size):
        return "cpu_packed"
    return "reference"
