"""flash-attn (Dao-AILab) backend: wraps ``flash_attn_func``, ``flash_attn_varlen_func`` and
``flash_attn_with_kvcache`` (flash-attn >= 2.1, whose causal mask is aligned bottom-right like ours).

Only importable where flash-attn is installed (it has no binary wheel in our registry); tested where it is.
"""

from __future__ import annotations

import torch

from .._versions import version_tuple
from . import eager

NAME = "flash_attn"

try:  # flash-attn is optional
    import flash_attn as _fa
    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the machine
    _fa = None
    _IMPORT_ERROR = f"flash-attn is not importable ({type(exc).__name__}: {exc})"


def availability() -> str | None:
    if _fa is None:
        return _IMPORT_ERROR
    if version_tuple(getattr(_fa, "__version__", "0")) < (2, 1):
        return f"flash-attn {_fa.__version__} < 2.1 aligns causal masks top-left"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def supports_head_dim(head_dim: int) -> str | None:
    if head_dim > 256 or head_dim % 8 != 0:
        return f"needs head_dim a multiple of 8 up to 256, got {head_dim}"
    return None


def supports(op: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    if device.type != "cuda":
        return f"needs a CUDA tensor, got {device.type}"
    if op in ("gather_rows", "scatter_rows"):
        return None
    if dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16, got {dtype}"
    return supports_head_dim(head_dim)


def attention(q, k, v, causal, softmax_scale, dropout_p=0.0):
    return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  softmax_scale=softmax_scale, causal=causal)


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale):
    return flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                   softmax_scale=softmax_scale, causal=causal)


OPS = {
    "attention": attention,
    "attention_varlen": attention_varlen,
    "attention_with_kvcache": attention_with_kvcache,
    "gather_rows": eager.gather_rows,
    "scatter_rows": eager.scatter_rows,
}
