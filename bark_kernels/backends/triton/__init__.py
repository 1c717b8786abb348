"""Triton backend: our flash-attention kernels (dense, varlen, KV-cache decode with fused append and split-K) and the
unpad/pad row kernels, registered as torch custom ops in the ``bark_kernels_triton`` namespace.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported; that is how CI tests it). Under the interpreter bfloat16 is made exact by ``_interpreter_bf16`` (Triton's
interpreter otherwise computes on raw uint16 bits). The registry imports this module lazily; without triton installed
the import still succeeds and availability() says why the backend is unusable.
"""

from __future__ import annotations

import torch

from .._common import head_dim_capability, kernel_capability
from ._env import interpreter_enabled

NAME = "triton"

# any head_dim up to 256: the kernels pad the head block to a power of two (16, 32, 64, 128, 256 need no padding)
HEAD_DIMS = range(1, 257)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROWS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # not installed, or broken
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


_IMPORT_ERROR = _triton_import_error()
_BF16_INTERPRETER_ERROR: str | None = None
if _IMPORT_ERROR is None:
    # registers the custom ops (namespace bark_kernels_triton); kernels compile on first launch
    from . import _ops

    if interpreter_enabled():
        # loop bounds under older interpreters with NumPy >= 2.4; then make bfloat16 arithmetic right (None when it
        # is) before any kernel runs
        from ._interpreter_bf16 import apply as _apply_bf16_patch
        from ._interpreter_compat import apply as _apply_compat_patch

        _apply_compat_patch()

        _BF16_INTERPRETER_ERROR = _apply_bf16_patch()


def availability() -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if interpreter_enabled() or torch.cuda.is_available():
        return None
    return "no CUDA device, and TRITON_INTERPRET=1 (Triton's CPU interpreter) is not set"


def supports_head_dim(head_dim: int) -> str | None:
    """None when the attention kernels serve ``head_dim`` (on some device and dtype): checked when a model is built."""
    return head_dim_capability(head_dim, HEAD_DIMS)


def supports(op: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    reason = availability()
    if reason is not None:
        return reason
    if device.type == "cpu":
        if not interpreter_enabled():
            return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)"
    elif device.type != "cuda":
        return f"device type {device.type!r} is not supported (cuda, or cpu under TRITON_INTERPRET=1)"
    elif not interpreter_enabled() and not torch.cuda.is_available():
        return "CUDA is not available"
    reason = kernel_capability(op, dtype, head_dim, ATTENTION_DTYPES, HEAD_DIMS, ROWS_DTYPES)
    if reason is not None:
        return reason
    if dtype == torch.bfloat16 and interpreter_enabled():
        if _BF16_INTERPRETER_ERROR is not None:
            return f"bfloat16 under the Triton interpreter would compute wrong values: {_BF16_INTERPRETER_ERROR}"
    return None


def attention(q, k, v, causal, softmax_scale):
    return _ops.attention(q, k, v, bool(causal), float(softmax_scale))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return _ops.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                   bool(causal), float(softmax_scale))


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale):
    return _ops.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, bool(causal), float(softmax_scale))


def gather_rows(x, indices):
    return _ops.gather_rows(x, indices)


def scatter_rows(x, indices, n):
    return _ops.scatter_rows(x, indices, int(n))


OPS = {
    "attention": attention,
    "attention_varlen": attention_varlen,
    "attention_with_kvcache": attention_with_kvcache,
    "gather_rows": gather_rows,
    "scatter_rows": scatter_rows,
}
