"""Triton backend: our flash-attention kernels (dense, varlen, KV-cache decode with fused append and split-K) and the
unpad/pad row kernels, registered as torch custom ops in the ``bark_kernels_triton`` namespace.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported; that is how CI tests it). Under the interpreter bfloat16 is made exact by ``_interpreter_bf16`` (Triton's
interpreter otherwise computes on raw uint16 bits). Kernels are imported on first use, so importing this module is
cheap and works without triton installed (availability() then says why the backend is unusable).
"""

from __future__ import annotations

import functools

import torch

from ._env import interpreter_enabled

NAME = "triton"

HEAD_DIMS = (16, 32, 64, 128)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROWS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ATTENTION_OPS = ("attention", "attention_varlen", "attention_with_kvcache")
ROWS_OPS = ("gather_rows", "scatter_rows")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # not installed, or broken
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


@functools.cache
def _bf16_interpreter_error() -> str | None:
    """None when bfloat16 is computed correctly under the interpreter (the patch applied), else why not."""
    from ._interpreter_bf16 import apply

    return apply()


def availability() -> str | None:
    reason = _triton_import_error()
    if reason is not None:
        return reason
    if interpreter_enabled() or torch.cuda.is_available():
        return None
    return "no CUDA device, and TRITON_INTERPRET=1 (Triton's CPU interpreter) is not set"


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
    if op in ROWS_OPS:
        if dtype not in ROWS_DTYPES:
            return f"{op} handles {[str(d) for d in ROWS_DTYPES]}, got {dtype}"
        return None
    if op not in ATTENTION_OPS:
        return f"unknown op {op!r}"
    if dtype not in ATTENTION_DTYPES:
        return f"attention kernels handle {[str(d) for d in ATTENTION_DTYPES]}, got {dtype}"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} is not supported (supported: {list(HEAD_DIMS)})"
    if dtype == torch.bfloat16 and interpreter_enabled():
        reason = _bf16_interpreter_error()
        if reason is not None:
            return f"bfloat16 under the Triton interpreter would compute wrong values: {reason}"
    return None


@functools.cache
def _load_ops():
    if interpreter_enabled():
        _bf16_interpreter_error()  # patch the interpreter's bfloat16 handling before any kernel runs
    from . import _ops as ops

    return ops


def attention(q, k, v, causal, softmax_scale):
    return _load_ops().attention(q, k, v, bool(causal), float(softmax_scale))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return _load_ops().attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                   bool(causal), float(softmax_scale))


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale):
    return _load_ops().attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, bool(causal), float(softmax_scale))


def gather_rows(x, indices):
    return _load_ops().gather_rows(x, indices)


def scatter_rows(x, indices, n):
    return _load_ops().scatter_rows(x, indices, int(n))


OPS = {
    "attention": attention,
    "attention_varlen": attention_varlen,
    "attention_with_kvcache": attention_with_kvcache,
    "gather_rows": gather_rows,
    "scatter_rows": scatter_rows,
}
