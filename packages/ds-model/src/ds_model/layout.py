"""Weight layouts for CPU decoding.

``nn.Linear`` stores its weight row-major as (out_features, in_features), so
``F.linear(x, w)`` multiplies by a transposed operand. For the few rows of a decode
step, MKL's float32 matrix multiply on x86 CPUs reads a weight stored input-major,
(in_features, out_features) row-major, faster. The fixed-shape CPU decode step
(``generate(compile=True)``, ``ds_model.cuda_graph``) of more than one row calls
``input_major_weights``, and so does a batch-1 step where ds-quant's CPU kernel is not
built (where it is, its ``fp32_gemv`` reads row-major weights faster still); the eager
serving runner keeps row-major weights (no gain measured there). Figures:
docs/benchmarks.md, "Decode paths" and "CPU decode by weight format".

``input_major_weights`` re-lays weights in place: same Parameter objects, shapes, values
and state-dict entries, only the strides change (``weight.stride() == (1,
out_features)``), so optimizers and hooks keep working. What needs row-major weights
makes them so: ds-quant's quantizers, FSDP2 and the other distributed wrappers
(``row_major_weights``), safetensors saving, and the Trainer before training. The
re-layout stays with the model object, so eager steps after a compiled CPU
``generate`` run on input-major weights too.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["input_major_weights", "row_major_weights"]


def input_major_weights(model: nn.Module) -> int:
    """Re-lay the float32 CPU weight of every plain ``nn.Linear`` in ``model`` as
    (in, out) row-major; returns how many changed. Skipped: weights shared between
    modules (tied embeddings: an embedding lookup wants rows), views into a larger
    tensor (``RoutedExperts.stack_weights``' stacked experts), tensor subclasses
    (DTensor) and weights already re-laid. Idempotent. The change stays with the model
    (``row_major_weights`` restores the usual layout, as the Trainer does) and is made
    outside inference mode, so a model re-laid inside ``torch.inference_mode()`` can
    still be trained."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    changed = 0
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        w = module.weight
        if not (
            type(w) is nn.Parameter
            and type(w.data) is torch.Tensor
            and w.is_cpu
            and w.dtype == torch.float32
            and w.dim() == 2
            and w.is_contiguous()
            and min(w.shape) > 1
            and counts.get(id(w)) == 1
            and w.storage_offset() == 0
            and w.untyped_storage().nbytes() == w.numel() * w.element_size()
        ):
            continue
        with torch.inference_mode(False), torch.no_grad():
            w.data = w.data.t().contiguous().t()
        changed += 1
    return changed


def row_major_weights(model: nn.Module) -> int:
    """Make every parameter of ``model`` contiguous again (what FSDP2 requires, and the
    layout DDP's gradient buckets assume); returns how many changed."""
    changed = 0
    for p in model.parameters():
        if not p.is_contiguous():
            with torch.inference_mode(False), torch.no_grad():
                p.data = p.data.contiguous()
            changed += 1
    return changed
