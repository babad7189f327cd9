"""Without CUDA, run the Triton kernels in the interpreter on CPU tensors.

Set before any test module imports triton (through ds_quant's kernels)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
