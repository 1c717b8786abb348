"""PyTorch ``scaled_dot_product_attention`` backend (FlashAttention-2 / memory-efficient / cuDNN / math kernels).

Dense causal attention with Sq == Sk uses ``is_causal``; every other causal case passes a bottom-right boolean mask.
Varlen and KV-cache calls are served by padding to the longest row with a per-row mask (no host sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _common
from .eager import gather_rows, scatter_rows

NAME = "sdpa"


def availability() -> str | None:
    if not hasattr(F, "scaled_dot_product_attention"):
        return f"torch {torch.__version__} has no scaled_dot_product_attention"
    return None


def supports(op: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    return None


def _sdpa(q, k, v, mask, softmax_scale, dropout_p=0.0, is_causal=False):
    """q (B, H, Sq, D), k/v (B, H, Sk, D), mask bool broadcastable to (B, H, Sq, Sk) or None -> (B, H, Sq, D)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                         scale=softmax_scale)
    if mask is not None:
        out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)  # rows that see no key: 0
    return out


def attention(q, k, v, causal, softmax_scale, dropout_p=0.0):
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
    if causal and seqlen_q == seqlen_k:
        out = _sdpa(qt, kt, vt, None, softmax_scale, dropout_p, is_causal=True)
    else:
        mask = _common.dense_mask(seqlen_q, seqlen_k, causal, q.device)  # (Sq, Sk) or None
        out = _sdpa(qt, kt, vt, mask, softmax_scale, dropout_p)
    return out.transpose(1, 2)  # (B, Sq, H, D)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return _common.varlen_by_padding(_sdpa, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                     softmax_scale)


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale):
    return _common.kvcache_by_mask(_sdpa, q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale)


OPS = {
    "attention": attention,
    "attention_varlen": attention_varlen,
    "attention_with_kvcache": attention_with_kvcache,
    "gather_rows": gather_rows,
    "scatter_rows": scatter_rows,
}
