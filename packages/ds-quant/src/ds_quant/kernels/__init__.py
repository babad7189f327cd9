"""Matmul kernels for quantized weights and the plain-torch references beside them.

``reference``: dequantize-then-matmul, the ground truth. ``cpu``: torch's packed
INT4 / INT8 CPU ops. ``cpu_gemv``: the C decode kernels (a few rows, x86), with the
stacked-experts form ``experts_gemv`` that ds-model's MoE decode calls. ``triton_w4a16``: the Triton W4A16 dequant-matmul (GPU, or CPU
under ``TRITON_INTERPRET=1``). ``select``: which one a layer uses for a given input.
"""

from ds_quant.kernels.cpu_gemv import available as cpu_gemv_available
from ds_quant.kernels.cpu_gemv import experts_gemv, experts_gemv_takes
from ds_quant.kernels.reference import int8_weight_matmul_reference, w4a16_matmul_reference
from ds_quant.kernels.select import HAS_TRITON, W4A16_BACKENDS, choose_w4a16_backend

__all__ = [
    "HAS_TRITON",
    "W4A16_BACKENDS",
    "choose_w4a16_backend",
    "cpu_gemv_available",
    "experts_gemv",
    "experts_gemv_takes",
    "int8_weight_matmul_reference",
    "w4a16_matmul_reference",
]
