"""Plain-PyTorch building blocks shared by the eager and sdpa backends (and the float64 reference).

Everything here is vectorised over the batch and free of host syncs, so the same code serves ragged batches on any
device.
"""

from __future__ import annotations

import torch

ATTENTION_OPS = ("attention", "attention_varlen", "attention_with_kvcache")
ROW_OPS = ("gather_rows", "scatter_rows")


def describe_head_dims(head_dims) -> str:
    """'1..256' for a range, '[16, 32, 64]' for a list."""
    if isinstance(head_dims, range) and head_dims.step == 1:
        return f"{head_dims.start}..{head_dims.stop - 1}"
    return str(list(head_dims))


def head_dim_capability(head_dim: int, head_dims) -> str | None:
    """None when ``head_dim`` is in ``head_dims``, else the reason (shared by supports() and supports_head_dim())."""
    if head_dim not in head_dims:
        return f"head_dim {head_dim} is not supported (supported: {describe_head_dims(head_dims)})"
    return None


def kernel_capability(op: str, dtype: torch.dtype, head_dim: int, attention_dtypes, head_dims,
                      row_dtypes=None) -> str | None:
    """The dtype/head_dim part of a kernel backend's ``supports()``: None when it serves (op, dtype, head_dim), else
    the reason. ``head_dims`` is a collection (a ``range`` for "any from .. to"); ``row_dtypes`` None means the row
    ops take any dtype."""
    if op in ROW_OPS:
        if row_dtypes is not None and dtype not in row_dtypes:
            return f"{op} handles {' or '.join(str(d) for d in row_dtypes)}, got {dtype}"
        return None
    if op not in ATTENTION_OPS:
        return f"unknown op {op!r}"
    if dtype not in attention_dtypes:
        return f"dtype {dtype} is not supported (the attention kernels take {' or '.join(str(d) for d in attention_dtypes)})"
    return head_dim_capability(head_dim, head_dims)


def visible_keys_mask(len_q: torch.Tensor, len_k: torch.Tensor, max_q: int, max_k: int, causal: bool) -> torch.Tensor:
    """Boolean mask (B, max_q, max_k): query i of row b sees key j.

    Row b has ``len_q[b]`` queries and ``len_k[b]`` keys; causal masks are aligned bottom-right, so query i sees key
    j <= i + len_k[b] - len_q[b]. Padding queries (i >= len_q[b]) see nothing.
    """
    device = len_q.device
    i = torch.arange(max_q, device=device).view(1, max_q, 1)  # (1, Mq, 1)
    j = torch.arange(max_k, device=device).view(1, 1, max_k)  # (1, 1, Mk)
    lq = len_q.view(-1, 1, 1).to(torch.int64)  # (B, 1, 1)
    lk = len_k.view(-1, 1, 1).to(torch.int64)
    mask = (j < lk) & (i < lq)
    if causal:
        mask = mask & (j <= i + lk - lq)
    return mask


def dense_mask(seqlen_q: int, seqlen_k: int, causal: bool, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (Sq, Sk) for dense attention, or None when every query sees every key."""
    if not causal:
        return None
    i = torch.arange(seqlen_q, device=device).view(-1, 1)
    j = torch.arange(seqlen_k, device=device).view(1, -1)
    return j <= i + (seqlen_k - seqlen_q)


def varlen_to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """Packed (total, H, D) -> padded (B, max_seqlen, H, D); pad slots hold arbitrary rows of x (mask them)."""
    total = x.shape[0]
    starts = cu_seqlens[:-1].to(torch.int64).view(-1, 1)  # (B, 1)
    idx = starts + torch.arange(max_seqlen, device=x.device).view(1, -1)  # (B, M)
    idx = idx.clamp(max=max(total - 1, 0))
    if total == 0:
        return x.new_zeros((idx.shape[0], max_seqlen) + tuple(x.shape[1:]))
    return x[idx]  # (B, M, H, D)


def padded_to_varlen(y: torch.Tensor, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Padded (B, M, H, D) -> packed (total, H, D), taking row i of sequence b for packed token cu_seqlens[b] + i."""
    t = torch.arange(total, device=y.device)
    b = torch.searchsorted(cu_seqlens[1:].to(torch.int64), t, right=True)  # (total,) sequence of each token
    i = t - cu_seqlens.to(torch.int64)[b]
    return y[b, i]


def append_to_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cache_seqlens: torch.Tensor) -> None:
    """Write k/v (B, Sq, H, D) into the caches (B, S_max, H, D) at rows cache_seqlens[b] + i, in place."""
    batch, seqlen_new = k.shape[0], k.shape[1]
    rows = torch.arange(batch, device=k.device).view(-1, 1)  # (B, 1)
    pos = cache_seqlens.to(torch.int64).view(-1, 1) + torch.arange(seqlen_new, device=k.device).view(1, -1)  # (B, Sq)
    k_cache[rows, pos] = k
    v_cache[rows, pos] = v


def kvcache_mask(cache_seqlens: torch.Tensor, seqlen_q: int, seqlen_new: int, max_seqlen_k: int,
                 causal: bool) -> torch.Tensor:
    """Boolean mask (B, Sq, S_max) for attention over a cache whose row b holds cache_seqlens[b] + seqlen_new keys."""
    len_k = cache_seqlens.to(torch.int64) + seqlen_new
    len_q = torch.full_like(len_k, seqlen_q)
    return visible_keys_mask(len_q, len_k, seqlen_q, max_seqlen_k, causal)


def used_cache_length(cache_seqlens: torch.Tensor, seqlen_new: int, max_seqlen: int) -> int:
    """How many leading cache slots any row attends to: max(cache_seqlens) + seqlen_new on a CPU tensor (reading it
    costs no device sync there), else the whole cache (no host sync on a GPU, and none while torch.compile traces)."""
    compiling = hasattr(torch, "compiler") and torch.compiler.is_compiling()
    if cache_seqlens.device.type != "cpu" or compiling or cache_seqlens.numel() == 0:
        return max_seqlen
    return min(int(cache_seqlens.max()) + seqlen_new, max_seqlen)


def varlen_by_padding(masked_attention, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                      softmax_scale):
    """``attention_varlen`` of a backend whose core is ``masked_attention(q, k, v, mask, softmax_scale)`` on
    (B, H, S, D) tensors with a boolean mask (True: the key is seen) broadcastable to (B, H, Sq, Sk): every sequence
    padded to the longest, a per-row mask (no host sync). q (total_q, H, D), k/v (total_k, H, D) -> (total_q, H, D)."""
    qp = varlen_to_padded(q, cu_seqlens_q, max_seqlen_q)  # (B, Mq, H, D)
    kp = varlen_to_padded(k, cu_seqlens_k, max_seqlen_k)  # (B, Mk, H, D)
    vp = varlen_to_padded(v, cu_seqlens_k, max_seqlen_k)
    len_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    len_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    mask = visible_keys_mask(len_q, len_k, max_seqlen_q, max_seqlen_k, causal).unsqueeze(1)  # (B, 1, Mq, Mk)
    out = masked_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), mask, softmax_scale)
    return padded_to_varlen(out.transpose(1, 2), cu_seqlens_q, q.shape[0])  # (total_q, H, D)


def kvcache_by_mask(masked_attention, q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale):
    """``attention_with_kvcache`` of a backend whose core is ``masked_attention`` (see :func:`varlen_by_padding`): the
    new k/v appended in place, then attention over the used part of the cache with a per-row mask.
    q (B, Sq, H, D), caches (B, S_max, H, D), k/v (B, Sq, H, D) or None -> (B, Sq, H, D)."""
    seqlen_new = 0
    if k is not None:
        append_to_cache(k_cache, v_cache, k, v, cache_seqlens)
        seqlen_new = k.shape[1]
    used = used_cache_length(cache_seqlens, seqlen_new, k_cache.shape[1])  # slots past it are never seen
    k_cache, v_cache = k_cache[:, :used], v_cache[:, :used]  # (B, used, H, D) views
    mask = kvcache_mask(cache_seqlens, q.shape[1], seqlen_new, used, causal).unsqueeze(1)  # (B, 1, Sq, used)
    out = masked_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), mask, softmax_scale)
    return out.transpose(1, 2)  # (B, Sq, H, D)
