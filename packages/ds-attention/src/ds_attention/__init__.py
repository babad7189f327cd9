"""ds-attention: flash-attention kernels for dense, windowed and block-sparse attention.

Layout everywhere: ``(batch, seqlen, heads, head_dim)``, as in flash-attn.
"""

from ds_attention.api import attention
from ds_attention.backends import ReferenceBackend, SDPABackend, TritonBackend, get_backend
from ds_attention.decode import paged_decode_attention
from ds_attention.masks import dynamic_attention_mask, dynamic_window
from ds_attention.modules.attention import Attention
from ds_attention.modules.cache import KVCache
from ds_attention.modules.dynamic import DynamicAttention
from ds_attention.modules.nsa import NativeSparseAttention
from ds_attention.modules.selection import select_blocks
from ds_attention.modules.sparse import SparseAttention
from ds_attention.protocol import AttentionBackend, MaskSpec
from ds_attention.reference import attention_reference, paged_decode_reference
from ds_attention.validate import make_mask_spec

__version__ = "0.2.0"

__all__ = [
    "Attention",
    "AttentionBackend",
    "DynamicAttention",
    "KVCache",
    "MaskSpec",
    "NativeSparseAttention",
    "ReferenceBackend",
    "SDPABackend",
    "SparseAttention",
    "TritonBackend",
    "__version__",
    "attention",
    "attention_reference",
    "dynamic_attention_mask",
    "dynamic_window",
    "get_backend",
    "make_mask_spec",
    "paged_decode_attention",
    "paged_decode_reference",
    "select_blocks",
]
