"""Eager backend: plain PyTorch matmul + softmax. Always available; the ground truth for the other backends.

Scores are computed in the input dtype, the softmax in float32 (then cast back), as transformers' eager Bark attention
does up to the softmax's upcast. A query row that sees no key returns 0.
"""

from __future__ import annotations

import torch

from . import _common

NAME = "eager"


def availability() -> str | None:
    return None


def supports(op: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    return None


def _masked_attention(q, k, v, mask, softmax_scale, dropout_p=0.0, return_attn_weights=False):
    """q (B, H, Sq, D), k/v (B, H, Sk, D), mask broadcastable to (B, H, Sq, Sk) or None -> (B, H, Sq, D)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * softmax_scale  # (B, H, Sq, Sk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if mask is not None:
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)  # rows that see no key: 0, not NaN
    probs = probs.to(q.dtype)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, v)
    return (out, probs) if return_attn_weights else out


def attention(q, k, v, causal, softmax_scale, dropout_p=0.0, return_attn_weights=False):
    mask = _common.dense_mask(q.shape[1], k.shape[1], causal, q.device)  # (Sq, Sk) or None
    res = _masked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, softmax_scale,
                            dropout_p, return_attn_weights)
    if return_attn_weights:
        out, probs = res
        return out.transpose(1, 2), probs  # (B, Sq, H, D), (B, H, Sq, Sk)
    return res.transpose(1, 2)  # (B, Sq, H, D)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    qp = _common.varlen_to_padded(q, cu_seqlens_q, max_seqlen_q)  # (B, Mq, H, D)
    kp = _common.varlen_to_padded(k, cu_seqlens_k, max_seqlen_k)  # (B, Mk, H, D)
    vp = _common.varlen_to_padded(v, cu_seqlens_k, max_seqlen_k)
    len_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    len_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    mask = _common.visible_keys_mask(len_q, len_k, max_seqlen_q, max_seqlen_k, causal).unsqueeze(1)  # (B,1,Mq,Mk)
    out = _masked_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), mask, softmax_scale)
    return _common.padded_to_varlen(out.transpose(1, 2), cu_seqlens_q, q.shape[0])  # (total_q, H, D)


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale):
    seqlen_new = 0
    if k is not None:
        _common.append_to_cache(k_cache, v_cache, k, v, cache_seqlens)
        seqlen_new = k.shape[1]
    used = _common.used_cache_length(cache_seqlens, seqlen_new, k_cache.shape[1])  # slots past it are never seen
    k_cache, v_cache = k_cache[:, :used], v_cache[:, :used]  # (B, used, H, D) views
    mask = _common.kvcache_mask(cache_seqlens, q.shape[1], seqlen_new, used, causal).unsqueeze(1)
    out = _masked_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), mask, softmax_scale)
    return out.transpose(1, 2)  # (B, Sq, H, D)


def gather_rows(x, indices):
    return x.index_select(0, indices)  # (nnz, F)


def scatter_rows(x, indices, n):
    out = x.new_zeros((n, x.shape[1]))  # (N, F)
    out.index_copy_(0, indices, x)
    return out


OPS = {
    "attention": attention,
    "attention_varlen": attention_varlen,
    "attention_with_kvcache": attention_with_kvcache,
    "gather_rows": gather_rows,
    "scatter_rows": scatter_rows,
}
