"""ds-optim: grouped-parameter AdamW and 4-bit gradient communication.

- :class:`GroupedAdamW`: AdamW (foreach, decoupled weight decay, optional BF16 moments)
  whose checkpoints load by parameter name, so they survive regrouping.
- :func:`group_parameters` and the policies (``"static"``, ``"sensitivity"``,
  ``"uniform"``); :class:`SensitivityRegrouper` moves tensors between lr tiers.
- :class:`Int4GradientCompressor` / :class:`Int8GradientCompressor`: block-wise
  quantization with stochastic rounding and error feedback (the ``GradientCompressor``
  protocol).
- :func:`int4_allreduce_hook` / :func:`int8_allreduce_hook` with
  :class:`QuantizedAllreduceState`: DDP communication hooks.
- :func:`zero_grouped_adamw`: ZeRO-1 sharding through ``ZeroRedundancyOptimizer``.
"""

from ds_optim.adamw import GroupedAdamW
from ds_optim.blockquant import QuantizedTensor, dequantize_blockwise, quantize_blockwise
from ds_optim.comm_hook import (
    CommStats,
    QuantizedAllreduceState,
    int4_allreduce_hook,
    int8_allreduce_hook,
    quantized_allreduce_hook,
)
from ds_optim.compressor import (
    BlockwiseGradientCompressor,
    Int4GradientCompressor,
    Int8GradientCompressor,
)
from ds_optim.grouping import (
    SensitivityPolicy,
    StaticPolicy,
    UniformPolicy,
    get_policy,
    group_parameters,
    register_policy,
)
from ds_optim.protocol import GradientCompressor
from ds_optim.sensitivity import SensitivityRegrouper
from ds_optim.zero import zero_grouped_adamw

__version__ = "0.2.0"

__all__ = [
    "BlockwiseGradientCompressor",
    "CommStats",
    "GradientCompressor",
    "GroupedAdamW",
    "Int4GradientCompressor",
    "Int8GradientCompressor",
    "QuantizedAllreduceState",
    "QuantizedTensor",
    "SensitivityPolicy",
    "SensitivityRegrouper",
    "StaticPolicy",
    "UniformPolicy",
    "__version__",
    "dequantize_blockwise",
    "get_policy",
    "group_parameters",
    "int4_allreduce_hook",
    "int8_allreduce_hook",
    "quantize_blockwise",
    "quantized_allreduce_hook",
    "register_policy",
    "zero_grouped_adamw",
]
