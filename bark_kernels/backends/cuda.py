"""CUDA C++ backend: the kernels of csrc/ (tensor-core flash-attention forward, split-K KV-cache decode, row
gather/scatter) compiled into the optional extension ``bark_kernels._C``.

The extension registers the ops ``torch.ops.bark_kernels_cuda.*`` (schemas in csrc/bindings.cpp); this module adds
their fake (meta) implementations so torch.compile and CUDA-graph capture can trace them, and exposes the backend
contract (NAME, availability, supports, OPS). When the extension is not built, ``availability()`` says why; with
``BARK_KERNELS_CUDA_JIT=1`` it is built on first use from the source tree (see bark_kernels/_jit.py).

Served: float16/bfloat16 attention with head_dim in HEAD_DIMS on CUDA devices (sm_80+); gather/scatter of any dtype.
float32/float64 attention is not served (the registry falls back to another backend).
"""

from __future__ import annotations

import logging
import os

import torch

from .. import _jit
from ._common import ROW_OPS, head_dim_capability, kernel_capability

logger = logging.getLogger("bark_kernels")

NAME = "cuda"
NAMESPACE = "bark_kernels_cuda"
HEAD_DIMS = (16, 32, 64, 96, 128)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
MIN_COMPUTE_CAPABILITY = (8, 0)

_state: dict[str, object] = {"loaded": False, "error": None, "fakes": False}


# ----------------------------------------------------------------------------------------------------------------------
# fake (meta) implementations: output shapes only; they must match the schemas in csrc/bindings.cpp


def _attention_fake(q, k, v, causal, softmax_scale):
    return q.new_empty(q.shape)  # (B, Sq, H, D)


def _attention_varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return q.new_empty(q.shape)  # (total_q, H, D)


def _attention_with_kvcache_fake(q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale):
    return q.new_empty(q.shape)  # (B, Sq, H, D); the caches are mutated in place (schema: Tensor(a!))


def _gather_rows_fake(x, indices):
    return x.new_empty((indices.shape[0], x.shape[1]))  # (nnz, F)


def _scatter_rows_fake(x, indices, n):
    return x.new_empty((n, x.shape[1]))  # (n, F)


FAKES = {
    "attention": _attention_fake,
    "attention_varlen": _attention_varlen_fake,
    "attention_with_kvcache": _attention_with_kvcache_fake,
    "gather_rows": _gather_rows_fake,
    "scatter_rows": _scatter_rows_fake,
}


def register_fakes(namespace: str = NAMESPACE, lib=None) -> None:
    """Register FAKES for the ops of ``namespace`` (the extension's, or a test namespace with the same schemas)."""
    for name, fn in FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fn, lib=lib)


# ----------------------------------------------------------------------------------------------------------------------
# loading


def _load_extension() -> str | None:
    """Load the compiled ops once; None on success, else the reason (cached)."""
    if _state["loaded"]:
        return None
    if _state["error"] is not None:
        return _state["error"]
    error = None
    try:
        from .. import _C  # noqa: F401  (registers torch.ops.bark_kernels_cuda.*)
    except (ImportError, OSError) as exc:
        error = f"bark_kernels._C not built: {type(exc).__name__}: {exc}"
        if _jit.env_flag(os.environ, _jit.ENV_JIT):
            try:
                _jit.build_cuda_extension()
            except Exception as jit_exc:  # report why, never crash the dispatcher
                error += f"; the JIT build ({_jit.ENV_JIT}=1) failed: {type(jit_exc).__name__}: {jit_exc}"
            else:
                error = None
        else:
            error += (" (build it with `pip install --no-build-isolation -e .` where torch has CUDA and nvcc exists, "
                      f"or set {_jit.ENV_JIT}=1 to build on first use)")
    if error is not None:
        _state["error"] = error
        return error
    if not _state["fakes"]:
        register_fakes()
        _state["fakes"] = True
    _state["loaded"] = True
    return None


def availability() -> str | None:
    reason = _load_extension()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def supports_head_dim(head_dim: int) -> str | None:
    """None when the attention kernels serve ``head_dim`` (on some device and dtype): checked when a model is built."""
    return head_dim_capability(head_dim, HEAD_DIMS)


def supports(op: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    if device.type != "cuda":
        return f"runs on CUDA devices only, got device type {device.type!r}"
    reason = kernel_capability(op, dtype, head_dim, ATTENTION_DTYPES, HEAD_DIMS)
    if reason is not None or op in ROW_OPS:
        return reason
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_COMPUTE_CAPABILITY:
        return f"needs compute capability >= 8.0 (mma.sync bf16), device {index} has {capability[0]}.{capability[1]}"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# the op table (inputs are validated by bark_kernels.interface; the binding checks again and raises clear errors)


def attention(q, k, v, causal, softmax_scale):
    return torch.ops.bark_kernels_cuda.attention(q, k, v, bool(causal), float(softmax_scale))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return torch.ops.bark_kernels_cuda.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                                        int(max_seqlen_k), bool(causal), float(softmax_scale))


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale):
    return torch.ops.bark_kernels_cuda.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, bool(causal),
                                                              float(softmax_scale))


def gather_rows(x, indices):
    return torch.ops.bark_kernels_cuda.gather_rows(x, indices)


def scatter_rows(x, indices, n):
    return torch.ops.bark_kernels_cuda.scatter_rows(x, indices, int(n))


OPS = {
    "attention": attention,
    "attention_varlen": attention_varlen,
    "attention_with_kvcache": attention_with_kvcache,
    "gather_rows": gather_rows,
    "scatter_rows": scatter_rows,
}
