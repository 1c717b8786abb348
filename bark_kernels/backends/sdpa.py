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
    qp = _common.varlen_to_padded(q, cu_seqlens_q, max_seqlen_q)  # (B, Mq, H, D)
    kp = _common.varlen_to_padded(k, cu_seqlens_k, max_seqlen_k)  # (B, Mk, H, D)
    vp = _common.varlen_to_padded(v, cu_seqlens_k, max_seqlen_k)
    len_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    len_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    mask = _common.visible_keys_mask(len_q, len_k, max_seqlen_q, max_seqlen_k, causal).unsqueeze(1)  # (B,1,Mq,Mk)
    out = _sdpa(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), mask, softmax_scale)
    return _common.padded_to_varlen(out.transpose(1, 2), cu_seqlens_q, q.shape[0])  # (total_q, H, D)


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale):
    seqlen_new = 0
    if k is not None:
        _common.append_to_cache(k_cache, v_cache, k, v, cache_seqlens)
        seqlen_new = k.shape[1]
    used = _common.used_cache_length(cache_seqlens, seqlen_new, k_cache.shape[1])  # slots past it are never seen
    k_cache, v_cache = k_cache[:, :used], v_cache[:, :used]  # (B, used, H, D) views
    mask = _common.kvcache_mask(cache_seqlens, q.shape[1], seqlen_new, used, causal).unsqueeze(1)
    out = _sdpa(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), mask, softmax_scale)
    return out.transpose(1, 2)  # (B, Sq, H, D)


OPS = {
    "attention": attention,
    "attention_varlen": attention_varlen,
    "attention_with_kvcache": attention_with_kvcache,
    "gather_rows": gather_rows,
    "scatter_rows": scatter_rows,
}
