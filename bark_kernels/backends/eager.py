"""Eager backend: plain PyTorch matmul + softmax. Always available; the ground truth for the other backends.

The most accurate backend: float16/bfloat16 inputs are upcast to float32 and the whole attention (scores, scale,
softmax, probabilities x values) runs in float32, rounded to the input dtype once, at the output (float32 and float64
inputs compute in their own dtype). Its error against a float64 reference is therefore at most the kernels' (which
round the probabilities to the input dtype before the second matmul); it is the baseline of the 2x rule in
``bark_kernels.testing``. Cost: q, k, v and the (B, H, Sq, Sk) scores in float32, which is what a ground truth is for.
A query row that sees no key returns 0.

:func:`transformers_bark_attention` is the other path: transformers' eager ``BarkSelfAttention._attn`` op for op
(scores rounded in the input dtype and then scaled, ``finfo.min`` masks, an additive padding mask, softmax in the
input dtype). It is not an op of the table; the transformers integration uses it when attention weights are asked
for, so they equal transformers' own bit for bit.
"""

from __future__ import annotations

import torch

from . import _common

NAME = "eager"


def availability() -> str | None:
    return None


def supports(op: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    return None


_UPCAST = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _masked_attention(q, k, v, mask, softmax_scale, dropout_p=0.0, return_attn_weights=False):
    """q (B, H, Sq, D), k/v (B, H, Sk, D), mask broadcastable to (B, H, Sq, Sk) or None -> (B, H, Sq, D) in q's dtype
    (and the probabilities (B, H, Sq, Sk) in q's dtype). Computed in float32 for float16/bfloat16 inputs."""
    dtype = q.dtype
    compute = _UPCAST.get(dtype, dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    scores = torch.matmul(q, k.transpose(-1, -2)) * softmax_scale  # (B, H, Sq, Sk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)  # rows that see no key: 0, not NaN
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, v).to(dtype)
    return (out, probs.to(dtype)) if return_attn_weights else out


def attention(q, k, v, causal, softmax_scale, dropout_p=0.0, return_attn_weights=False):
    mask = _common.dense_mask(q.shape[1], k.shape[1], causal, q.device)  # (Sq, Sk) or None
    res = _masked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, softmax_scale,
                            dropout_p, return_attn_weights)
    if return_attn_weights:
        out, probs = res
        return out.transpose(1, 2), probs  # (B, Sq, H, D), (B, H, Sq, Sk)
    return res.transpose(1, 2)  # (B, Sq, H, D)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return _common.varlen_by_padding(_masked_attention, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, causal, softmax_scale)


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale):
    return _common.kvcache_by_mask(_masked_attention, q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale)


def transformers_bark_attention(q, k, v, causal, softmax_scale, attention_mask=None, dropout=None):
    """transformers' eager Bark attention (``BarkSelfAttention._attn``), op for op: its weights, bit for bit.

    q (B, Sq, H, D), k/v (B, Sk, H, D); causal bottom-right (the last Sq rows of Bark's lower-triangular ``bias``).
    ``attention_mask``: None; a bool (B, Sk) key padding mask, True where a key is kept, turned into the additive
    mask transformers' eager path gets (0 kept, ``finfo(dtype).min`` padded); or a 4-D mask broadcastable to
    (B, H, Sq, Sk), added as it is (as eager adds whatever 4-D mask it is given). As transformers computes it: scores
    ``matmul(q, kᵀ)`` in the input dtype, then ``* softmax_scale`` (rounded twice in float16/bfloat16); causal
    positions filled with ``finfo(dtype).min``; the mask added; softmax in the input dtype; ``dropout`` (a module or
    None) on the weights; weights x values. Rows whose keys are all masked come out as transformers' do, not as 0.
    Returns out (B, Sq, H, D) and weights (B, H, Sq, Sk), both in the input dtype. Cost: the scores of every head,
    (B, H, Sq, Sk) in the input dtype, as eager.
    """
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
    weights = torch.matmul(qt, kt.transpose(-1, -2)) * softmax_scale  # (B, H, Sq, Sk)
    min_value = torch.finfo(weights.dtype).min
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if causal:
        visible = _common.dense_mask(seqlen_q, seqlen_k, True, q.device)  # (Sq, Sk)
        weights = weights.masked_fill(~visible, min_value)
    if attention_mask is not None:
        if attention_mask.dim() == 2 and attention_mask.dtype == torch.bool:
            additive = torch.zeros(attention_mask.shape, dtype=weights.dtype, device=weights.device)
            attention_mask = additive.masked_fill(~attention_mask, min_value)[:, None, None, :]  # (B, 1, 1, Sk)
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1).to(vt.dtype)
    if dropout is not None:
        weights = dropout(weights)
    out = torch.matmul(weights, vt)  # (B, H, Sq, D)
    return out.transpose(1, 2), weights


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
