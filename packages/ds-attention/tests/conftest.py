"""Run the Triton kernels in the interpreter on machines without CUDA.

TRITON_INTERPRET must be set before any kernel is decorated, i.e. before
ds_attention.kernels is imported; the kernels module is imported lazily, so setting it
here (before test modules import it) is enough.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import sys
from pathlib import Path

# Test modules share attn_testutils.py; importlib mode does not put this folder on sys.path.
sys.path.insert(0, str(Path(__file__).parent))
