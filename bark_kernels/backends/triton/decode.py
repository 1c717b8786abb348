"""The fused decode step's kernels (Triton) for a model above this library (bark.session's ``fused`` mode): five
launches per transformer layer, and the embeddings and token-head kernels around them. See ``_decode_kernels`` for
what each kernel computes and ``_decode_ops`` for the custom ops (all write into caller-owned buffers).

``problem(device, dtype, head_dim)`` says why the fused kernels cannot run here (None: they can);
``pdl_problem(device)`` why they launch without programmatic dependent launch (None: PDL on).
"""

from __future__ import annotations

import torch

from . import _IMPORT_ERROR, supports

__all__ = ["problem", "pdl_problem", "attention_splits", "fused_embed", "fused_ln_qkv", "fused_attention",
           "fused_linear_residual", "fused_ln_linear", "fused_pick", "head_dim_pad"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the fused decode kernels cannot run on ``device`` in ``dtype`` at ``head_dim``, or None. They serve what
    the Triton attention kernels serve (CUDA, or CPU under Triton's interpreter; fp16, bf16, fp32; head_dim 1-256)."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
    return supports("attention_with_kvcache", device, dtype, head_dim)


if _IMPORT_ERROR is None:
    from ._decode_ops import (
        attention_splits,
        fused_attention,
        fused_embed,
        fused_linear_residual,
        fused_ln_linear,
        fused_ln_qkv,
        fused_pick,
        head_dim_pad,
    )
    from ._decode_ops import pdl_problem as _pdl_problem

    def pdl_problem(device: torch.device) -> str | None:
        return _pdl_problem(device.type, device.index)
