"""The Triton kernels as torch custom ops (namespace ``bark_kernels_triton``), with fake implementations.

torch.compile (fullgraph) and CUDA-graph capture see each kernel as one opaque op whose output shapes come from the
fake implementation; ``attention_with_kvcache`` declares that it mutates the caches.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _launchers

NAMESPACE = "bark_kernels_triton"


@torch.library.custom_op(f"{NAMESPACE}::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float) -> torch.Tensor:
    """q (B, Sq, H, D), k/v (B, Sk, H, D) -> (B, Sq, H, D)."""
    return _launchers.attention_fwd(q, k, v, causal, softmax_scale)


@attention.register_fake
def _attention_fake(q, k, v, causal, softmax_scale):
    return q.new_empty(q.shape)  # (B, Sq, H, D) contiguous, as the kernel's output


@torch.library.custom_op(f"{NAMESPACE}::attention_varlen", mutates_args=())
def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                     softmax_scale: float) -> torch.Tensor:
    """Packed q (total_q, H, D), k/v (total_k, H, D), cu_seqlens int32 (B + 1,) -> (total_q, H, D)."""
    return _launchers.attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                           softmax_scale)


@attention_varlen.register_fake
def _attention_varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return q.new_empty(q.shape)  # (total_q, H, D)


@torch.library.custom_op(f"{NAMESPACE}::attention_with_kvcache", mutates_args=("k_cache", "v_cache"))
def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k: Optional[torch.Tensor], v: Optional[torch.Tensor],  # noqa: UP045 (torch's schema parser)
                           cache_seqlens: torch.Tensor, causal: bool,
                           softmax_scale: float) -> torch.Tensor:
    """q (B, Sq, H, D), caches (B, S_max, H, D) (appended in place when k/v (B, Sq, H, D) are given) -> (B, Sq, H, D)."""
    return _launchers.attention_kvcache_fwd(q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale)


@attention_with_kvcache.register_fake
def _attention_with_kvcache_fake(q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale):
    return q.new_empty(q.shape)  # (B, Sq, H, D)


@torch.library.custom_op(f"{NAMESPACE}::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x (N, F), indices int64 (nnz,) -> (nnz, F)."""
    return _launchers.gather_rows(x.contiguous(), indices.contiguous())


@gather_rows.register_fake
def _gather_rows_fake(x, indices):
    return x.new_empty((indices.shape[0], x.shape[1]))  # (nnz, F)


@torch.library.custom_op(f"{NAMESPACE}::scatter_rows", mutates_args=())
def scatter_rows(x: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """x (nnz, F), indices int64 (nnz,) -> (n, F), zeros where no row lands."""
    return _launchers.scatter_rows(x.contiguous(), indices.contiguous(), n)


@scatter_rows.register_fake
def _scatter_rows_fake(x, indices, n):
    return x.new_empty((n, x.shape[1]))  # (N, F)
