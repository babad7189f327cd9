"""Weight layouts for CPU decoding.

``nn.Linear`` stores its weight row-major as (out_features, in_features), so
``F.linear(x, w)`` multiplies by a transposed operand. For the few rows of a decode
step, MKL's float32 matrix multiply on x86 CPUs reads a weight that is stored
input-major, (in_features, out_features) row-major, faster: measured on the 2-core
development VM, a (16384, 256) LM head took 0.86 instead of 1.36 ms at batch 1 and a
(32000, 512) one 3.9 instead of 5.2 ms, both streamed from memory. Whole compiled
decode steps (A/B in separate processes): batch 8 19-27% faster for a 14M V3 shape and
the shipped model, batch 1 10% for a 100M one, batch 1 of the small models within 3%
(slower by that much, this machine's noise). The eager serving runner's steps
measured 0.93-1.04x, so it keeps row-major weights. ``input_major_weights`` re-lays
weights that way in place: same Parameter objects, shapes, values and state-dict entries, only the
strides change (``weight.stride() == (1, out_features)``), so optimizers and hooks keep
working. What needs row-major weights makes them so: ds-quant's quantizers, FSDP2 and
the other distributed wrappers (``row_major_weights``), safetensors saving. The
re-layout stays with the model object: after a compiled CPU ``generate`` its eager
steps run on input-major weights too (a 512-token prefill of the shipped model's
architecture, byte vocabulary, measured 3% faster), while the Trainer restores row-major weights before training (the shipped
model's shape trained 3.6% slower input-major, forward + backward).
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
